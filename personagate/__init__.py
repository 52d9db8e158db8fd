"""The ``personagate`` command: the one module that sees both sides (``gateway`` and ``agent_runtime``).

Each command imports only the side it runs, inside its function, so the gateway's image (no torch) and the
worker's (no pjsua2, no aiortc) both run it.
"""
