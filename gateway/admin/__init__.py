"""The tenant admin API: tokens, endpoints."""
