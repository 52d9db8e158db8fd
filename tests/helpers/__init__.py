"""Helpers shared by the test modules (fixtures are in tests/conftest.py; test modules import no other test module):

- ``processes``: free loopback ports, a server process run until it is ready, and its stop
- ``worker``: the internal plane's secret the tests' workers accept, and the shared worker's size
- ``wait``: ``until``, polling until something is true
- ``programs``: the system programs tests start (``needs("sipp")``), with one skip reason each
- ``stack``: the SIP test stack (an echo worker and a gateway), its tenants, /readyz and /metrics readers
- ``caller``, ``sipp``: `personagate call` and sipp (the scenarios in tests/sipp/) as SIP callers
- ``redis_server``: a real redis-server (the ``redis_server`` fixture)
- ``sip``, ``sip_corpus``, ``sip_fuzz``: raw SIP peers, the SIP corpus and its fuzzing
- ``live_call``: a measuring live call; ``logs``: the checks on a server process's log
- ``admin``, ``hostile_yaml``, ``loop_watch``, ``tls``: the admin API under test, hostile YAML, event-loop
  stalls, certificates
"""
