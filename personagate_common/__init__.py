"""What the gateway and the worker share: the worker protocol, the routing store, the internal plane's secrets
and TLS, settings files, bounded YAML, voices and personas, logs, and graceful serving.

``gateway`` and ``agent_runtime`` both import from here and never from each other; this package imports
neither, and no torch, moshi, pjsua2 or aiortc (tests/test_import_rules.py).
"""
