"""Tenant personas: the schema of tenant.yaml, loading with positioned errors, live reload."""
