"""The admin API's own OpenAPI schema, fuzzed (schemathesis): every operation, as the operator and as a tenant
admin, with generated paths, queries and bodies (path parameters often aimed at real tenants and personas, so
that requests reach the validators rather than stop at 403/404), against a real ``personagate gateway`` process.
No answer may be a 5xx, and the gateway's event loop must stay free throughout: a probe thread asks /healthz
every 100 ms and every answer must come quickly.

Bounded for CI: a few examples per operation and token (``EXAMPLES``), no shrinking, no example database.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time

import httpx
import hypothesis
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error

from tests.helpers.admin import gateway_process

# per operation and token: ~13 operations x 2 tokens, well under a minute on a busy 2-core machine; set
# PERSONAGATE_TEST_FUZZ_EXAMPLES for a deeper run by hand
EXAMPLES = int(os.environ.get("PERSONAGATE_TEST_FUZZ_EXAMPLES", "25"))
DERANDOMIZE = "PERSONAGATE_TEST_FUZZ_EXAMPLES" not in os.environ  # CI: the same cases every run; by hand: new ones
STALL_SECONDS = 3.0  # a healthz answer slower than this is a stalled event loop (generous: CI machines are busy)
TARGETS = {"tenant": ["acme", "bank"], "persona": ["claims", "billing", "cards"],
           "path": ["voices/a.wav", "voices/b.flac"], "version": [1, 2]}


@schemathesis.serializer("audio/wav", "audio/flac", "text/yaml")
def _raw_body(ctx: object, value: object) -> bytes:
    """Clip and persona bodies are sent as they are: bytes, or text as UTF-8 (a JSON value as its text)."""
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8", "surrogatepass")


class LoopProbe(threading.Thread):
    """Asks ``url`` every 100 ms until stopped; keeps the slowest answer (a timeout counts as its full wait)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="healthz-probe", daemon=True)
        self.url = url
        self.slowest = 0.0
        self.failures: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=STALL_SECONDS * 2) as client:
            while not self._done.wait(0.1):
                started = time.monotonic()
                try:
                    status = client.get(self.url).status_code
                    if status != 200:
                        self.failures.append(f"healthz {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.monotonic() - started)

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def _aimed(case: schemathesis.Case, mask: int) -> schemathesis.Case:
    """Some path parameters replaced by real names (each by its own bit of ``mask``), so that requests get past
    403/404 to the checks of the others: a real tenant with a generated clip path, for instance."""
    for bit, name in enumerate(sorted(case.path_parameters or {})):
        if name in TARGETS and mask >> bit & 1:
            case.path_parameters[name] = TARGETS[name][mask >> 4 & 1]
    return case


def _fuzz(operation: APIOperation, base: str, who: str, token: str, failures: list[str],
          answered: collections.Counter[int]) -> None:
    """EXAMPLES generated requests to ``operation`` with ``token``; 5xx answers appended to ``failures``."""
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=st.builds(_aimed, cases, st.integers(0, 31)))
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[hypothesis.Phase.generate],
                         derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        answered[response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except AssertionError:  # schemathesis' failure group is an AssertionError
            failures.append(f"{who} {case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")

    run()


def test_the_admin_api_never_answers_5xx_nor_stalls_its_event_loop(tmp_path):
    """Generated requests to every admin operation, with an operator token and with acme's admin token: each is
    answered below 500, and /healthz keeps answering within STALL_SECONDS all along."""
    # Fuzzed Authorization headers must not get the test's own address throttled (that would hide the rest).
    with gateway_process(tmp_path, env={"PERSONAGATE_GATEWAY_ADMIN_AUTH_FAILURE_BURST": "10000"}) as (base, tokens):
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json").include(path_regex="^/v1/admin/")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 13, [op.label for op in operations]
        probe = LoopProbe(f"{base}/healthz")
        probe.start()
        failures: list[str] = []
        answered: collections.Counter[int] = collections.Counter()
        try:
            for who in ("operator", "acme"):
                for operation in operations:
                    _fuzz(operation, base, who, tokens[who], failures, answered)
        finally:
            probe.stop()
        assert not failures, "\n".join(failures)
        assert not probe.failures, probe.failures
        assert probe.slowest < STALL_SECONDS, f"/healthz took {probe.slowest:.2f} s: the event loop stalled"
        assert answered[200] and answered[422], answered  # requests got past the token and reached the checks
