"""Helpers shared by the test modules. Fixtures are in tests/conftest.py, and no test module imports another one.

- ``processes``: free loopback ports, a server process run until it is ready, and its stop
- ``wait``: ``until`` and ``until_async``, polling until something is true; ``scaled``, every helper's timeout
  stretched by PERSONAGATE_TEST_TIMEOUT_FACTOR
- ``tiers``: the ``e2e`` mark from process-starting fixtures, and the check that the fast tier starts no process
- ``fake_worker``: the worker protocol in the test's event loop, with knobs to refuse, stall or vanish
- ``programs``: the system programs tests start (``needs("sipp")``), with one skip reason each
- ``worker``: the plane's secret the tests' workers accept, a worker of a test's own, a session talking to it
- ``stack``: the SIP test stack (an echo worker and a gateway), its tenants, /readyz and /metrics readers
- ``caller``, ``sipp``: `personagate call` and sipp (the scenarios in tests/sipp/) as SIP callers; sipp as the
  human an escalation reaches
- ``webrtc``: an aiortc browser caller and the WebRTC test stack
- ``calls``: a front end's side of calls through ``gateway.calls``, and the calls' tenants
- ``recording``: the consent notice, tone levels and clip matching in recorded audio
- ``redis_server``: a real redis-server (the ``redis_server`` fixture)
- ``tenant_files``: tenant folders written as an editor saves them; ``admin_api``: the admin API's tenants, tokens
  and gateway, in-process (the ``gw`` fixture, ``admin_gateway``) or as a process
- ``sip``, ``sip_corpus``, ``sip_fuzz``: raw SIP peers, the SIP corpus and its fuzzing
- ``live_call``: a measuring live call; ``logs``: the checks on a server process's log
- ``hostile_yaml``, ``loop_watch``, ``tls``: hostile YAML, event-loop stalls, certificates
"""
