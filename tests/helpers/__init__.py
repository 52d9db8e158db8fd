"""Helpers shared by several test modules: raw SIP peers (``sip``), the SIP corpus (``sip_corpus``), a measuring
live call (``live_call``) and the checks on a server process's log (``logs``)."""
