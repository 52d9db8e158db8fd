"""The admin API under attack, against real processes: known attacks (a flood of wrong tokens from one
address, clips whose header lies, a NUL in a clip path), then its own OpenAPI schema fuzzed (schemathesis): every
operation, as the operator and as a tenant admin, with generated paths, queries and bodies (path parameters often
aimed at real tenants and personas, so that requests reach the validators rather than stop at 403/404).

No answer may be a 5xx, and the gateway's event loop must stay free throughout: a probe thread asks /healthz every
100 ms and every answer must come within STALL_SECONDS; where pjsua2 is installed (CI) the gateway runs with an echo
worker and a live SIP call's audio must keep flowing both ways all along (``tests/helpers/live_call.py``).

Bounded for CI: a few examples per operation and token (``EXAMPLES``), no shrinking, no example database.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error

from gateway.admin.tokens import new_token
from tests.helpers.admin_api import PLAIN_ACME, gateway_process, speech_like_wav, write_tenants, write_tokens

pytestmark = pytest.mark.e2e  # a gateway process under attack

# per operation and token: ~13 operations x 2 tokens, well under a minute on a busy 2-core machine; set
# PERSONAGATE_TEST_FUZZ_EXAMPLES for a deeper run by hand
EXAMPLES = int(os.environ.get("PERSONAGATE_TEST_FUZZ_EXAMPLES", "25"))
DERANDOMIZE = "PERSONAGATE_TEST_FUZZ_EXAMPLES" not in os.environ  # CI: the same cases every run; by hand: new ones
STALL_SECONDS = 5.0  # a healthz answer slower than this is a stalled event loop (generous: CI machines are busy)
SHIPPED_TENANTS = Path(__file__).resolve().parent.parent / "tenants"
ATTACKER = "127.0.0.2"  # wrong tokens come from here (loopback takes any 127/8 source), the fuzzing from 127.0.0.1


@dataclass
class Target:
    """The gateway under attack: its HTTP base URL, the operator's and one tenant admin's tokens, real names to aim
    path parameters at, and the live call (None without pjsua2)."""

    base: str
    tokens: dict[str, str]  # operator, tenant → token
    tenant: str  # the tenant admin's
    names: dict[str, list[object]]
    call: object | None


@contextlib.contextmanager
def _target(tmp_path: Path) -> Iterator[Target]:
    if importlib.util.find_spec("pjsua2") is None:
        root = write_tenants(tmp_path / "tenants", acme=PLAIN_ACME)
        tokens = write_tokens(tmp_path / "tokens.yaml")
        with gateway_process(root, tokens.path) as base:
            yield Target(base, {"operator": tokens.operator, "tenant": tokens.acme}, "acme",
                         {"tenant": ["acme", "bank"], "persona": ["claims", "billing", "cards"],
                          "path": ["voices/a.wav", "voices/b.flac"], "version": [1, 2]}, None)
        return
    from tests.helpers.live_call import LiveCall
    from tests.helpers.sip import private_rtp_ports
    from tests.helpers.stack import echo_stack

    root = tmp_path / "tenants"
    for tenant in ("harbor-mutual", "northwind-bank"):
        shutil.copytree(SHIPPED_TENANTS / tenant, root / tenant)
    (operator, operator_hash), (admin, admin_hash) = new_token(), new_token()
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(f"operator:\n  - {operator_hash}\ntenants:\n  harbor-mutual:\n    - {admin_hash}\n")
    env = {"PERSONAGATE_GATEWAY_ADMIN_TOKENS_FILE": str(tokens_file)} | private_rtp_ports()
    with echo_stack(root, env) as (addresses, _, _), LiveCall(("127.0.0.1", int(addresses["port"]))) as call:
        yield Target(addresses["http"], {"operator": operator, "tenant": admin}, "harbor-mutual",
                     {"tenant": ["harbor-mutual", "northwind-bank"], "persona": ["claims", "after-hours", "lost-stolen"],
                      "path": ["voices/claims.flac", "voices/a.wav"], "version": [1, 2]}, call)


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


def _aimed(names: dict[str, list[object]], case: schemathesis.Case, mask: int) -> schemathesis.Case:
    """Some path parameters replaced by real names (each by its own bit of ``mask``), so that requests get past
    403/404 to the checks of the others: a real tenant with a generated clip path, for instance."""
    for bit, name in enumerate(sorted(case.path_parameters or {})):
        if name in names and mask >> bit & 1:
            case.path_parameters[name] = names[name][mask >> 4 & 1]
    return case


def _fuzz(operation: APIOperation, target: Target, who: str, failures: list[str],
          answered: collections.Counter[int]) -> None:
    """EXAMPLES generated requests to ``operation`` with ``who``'s token; 5xx answers appended to ``failures``."""
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    headers = {"Authorization": f"Bearer {target.tokens[who]}"}

    @given(case=st.builds(_aimed, st.just(target.names), cases, st.integers(0, 31)))
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[hypothesis.Phase.generate],
                         derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=target.base, headers=headers, timeout=30)
        answered[response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except AssertionError:  # schemathesis' failure group is an AssertionError
            failures.append(f"{who} {case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")

    run()


def _known_attacks(target: Target) -> None:
    """Known attacks, each answered with a 4xx: 300 wrong tokens from one address (throttled after
    the burst, the right token too from there, not from elsewhere), a wav whose header claims 5 s in 3.8 MB, a NUL
    in a clip path."""
    operator = {"Authorization": f"Bearer {target.tokens['operator']}"}
    attacker = httpx.Client(base_url=target.base, timeout=30, transport=httpx.HTTPTransport(local_address=ATTACKER))
    with attacker, httpx.Client(base_url=target.base, timeout=30) as client:
        statuses = collections.Counter(
            attacker.get("/v1/admin/tenants", headers={"Authorization": f"Bearer {new_token()[0]}"}).status_code
            for _ in range(300))
        assert statuses == {401: 10, 429: 290}, statuses
        held = attacker.get("/v1/admin/tenants", headers=operator)
        assert held.status_code == 429 and int(held.headers["retry-after"]) >= 1
        assert client.get("/v1/admin/tenants", headers=operator).status_code == 200
        clips = f"/v1/admin/tenants/{target.tenant}/clips"
        lying = speech_like_wav(5.0) + os.urandom(3_640_000)
        for _ in range(3):
            r = client.put(f"{clips}/voices/lying.wav", content=lying, headers=operator)
            assert r.status_code == 422 and "declares 5.00 s of audio" in r.text, r.text
        for path in ("voices/a%00.wav", "voices%00/b.wav"):
            assert client.put(f"{clips}/{path}", content=speech_like_wav(), headers=operator).status_code == 422


def test_attacks_and_fuzzing_get_4xx_with_the_event_loop_free(tmp_path):
    """The known attacks, then generated requests to every admin operation with an operator token and with a tenant
    admin's token: each is answered below 500, /healthz keeps answering within STALL_SECONDS all along, and a live
    call (where pjsua2 is installed) keeps its audio."""
    with _target(tmp_path) as target:
        schema = schemathesis.openapi.from_url(f"{target.base}/openapi.json").include(path_regex="^/v1/admin/")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 13, [op.label for op in operations]
        probe = LoopProbe(f"{target.base}/healthz")
        probe.start()
        began = target.call.mark() if target.call is not None else 0
        failures: list[str] = []
        answered: collections.Counter[int] = collections.Counter()
        try:
            _known_attacks(target)
            for who in ("operator", "tenant"):
                for operation in operations:
                    _fuzz(operation, target, who, failures, answered)
        finally:
            probe.stop()
        assert not failures, "\n".join(failures)
        assert not probe.failures, probe.failures
        assert probe.slowest < STALL_SECONDS, f"/healthz took {probe.slowest:.2f} s: the event loop stalled"
        assert answered[200] and answered[422], answered  # requests got past the token and reached the checks
        if target.call is not None:
            window = target.call.window(began)
            print(f"live call through the attacks: {window}")
            assert window.flowing(), f"the live call's audio stopped during the attacks: {window}"
