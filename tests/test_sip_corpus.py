"""Malformed and hostile SIP (tests/helpers/sip_corpus.py: the RFC 4475 torture tests, delayed-offer and oversized
INVITEs to refused and open numbers, scanner sweeps) sent over UDP and TCP to a real `personagate gateway` with a
real echo worker: each message gets the answer the RFCs and the SIP guard give it (docs/sip.md), an odd but valid one
is answered as a valid one is (the open number's call is set up, then hung up), and after every message the gateway
still runs and answers OPTIONS, with nothing in its log that only a bug prints."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import sip_corpus
from tests.helpers.logs import assert_alive_and_clean, log_size
from tests.helpers.processes import udp_free_port
from tests.helpers.sip import (
    Peer,
    ack_messages,
    final,
    header,
    options,
    peer,
    private_rtp_ports,
    reason_of,
    request,
    status_of,
    statuses,
)
from tests.helpers.sip_corpus import ANSWERED, NO_ANSWER, Case
from tests.helpers.stack import echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")

SLOTS = 2


@pytest.fixture(scope="module")
def stack(tenants: Path) -> Iterator[dict]:
    """The echo stack (two slots) admitting trunks from 127.0.0.1 only (127.0.0.2 is the refused source), with no
    INVITE rate limit to speak of (a sweep's answers are then the routing's, not the flood guard's 503)."""
    env = {"PERSONAGATE_GATEWAY_SIP_ALLOW": '["127.0.0.1/32"]',
           "PERSONAGATE_GATEWAY_SIP_MAX_INVITES_PER_SECOND": "10000"} | private_rtp_ports()
    with echo_stack(tenants, env, slots=SLOTS) as (addresses, _, gateway_proc):
        yield addresses | {"proc": gateway_proc, "gateway": ("127.0.0.1", int(addresses["port"]))}
    # (the log is checked by the last test, below, while the process still runs)


def _matches(token: str):
    def check(message: str) -> bool:
        with contextlib.suppress(KeyError):
            return token in header(message, "Call-ID")
        return False
    return check


def _exchange(stack: dict, p: Peer, case: Case, data: bytes, token: str, expected: object) -> list[str]:
    """Send ``data`` (the rendered case) and read its answers: everything up to its final response (a little longer
    for a stray second answer), or for a case that must get none, until OPTIONS sent after it is answered (UDP: one
    socket's datagrams are handled in order) or a while (TCP)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the gateway may close a connection mid-send
        p.send(data)
    if expected == NO_ANSWER:
        if p.transport == "UDP" and not p.closed:
            sentinel, call_id, _ = request(p.sock, stack["sip"])
            p.send(sentinel)
            return [m for m in p.receive(3.0, until=call_id) if _matches(token)(m) or call_id not in m]
        return p.receive(0.5, tail=0.0) if not p.closed else []
    got: list[str] = []
    deadline = time.monotonic() + 5.0
    mine = _matches(token) if "Call-ID" in case.message or "\ni:" in case.message.lower() else (lambda _: True)
    while time.monotonic() < deadline and not p.closed:
        got += p.receive(deadline - time.monotonic(), tail=0.0)
        if any(final(m) and mine(m) for m in got):
            got += p.receive(0.05, tail=0.0)  # a second final answer would be a bug
            break
    return got


def _finish_dialog(stack: dict, p: Peer, data: bytes, response: str) -> None:
    """ACK a final answer to an INVITE; after a 2xx, BYE, and wait until the gateway has no call."""
    status = status_of(response) or 0
    try:
        messages = ack_messages(p.local, p.transport, data, response)
    except KeyError:  # an INVITE whose own From or Via the gateway could not have answered
        return
    for message in messages:
        with contextlib.suppress(OSError):
            p.send(message)
    if status < 300:
        bye = statuses(p.receive(3.0, tail=0.0))
        assert 200 in bye, f"the BYE was answered {bye}"
        until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")


def _check(case: Case, transport: str, got: list[str], token: str) -> str:
    """The assertion for ``case``'s answers; returns what was observed, for the log."""
    expected = case.expected(transport)
    mine = [m for m in got if _matches(token)(m)] or ([m for m in got if status_of(m)] if "Call-ID" not in
                                                      case.message else [])
    finals = [m for m in mine if final(m)]
    observed = f"{case.name} over {transport}: {[status_of(m) for m in mine]}"
    if finals:
        observed += f" {reason_of(finals[0])!r}"
    if expected == NO_ANSWER:
        assert not mine, f"{observed}; expected no answer ({case.why})"
        return observed
    assert finals, f"{observed}; expected {expected} ({case.why})"
    codes = {status_of(m) for m in finals}
    assert len(codes) == 1, f"{observed}: two different final answers ({case.why})"
    code = codes.pop()
    if expected != ANSWERED:
        allowed = expected if isinstance(expected, frozenset) else {expected}
        assert code in allowed, f"{observed}; expected {sorted(allowed)} ({case.why})"
    if case.reason:
        assert case.reason.lower() in reason_of(finals[0]).lower(), f"{observed}; expected a reason with {case.reason!r}"
    for extra in case.extra_calls:
        assert not [m for m in got if extra in m], f"{observed}: the trailing request ({extra}) was answered"
    if code == 200 and case.message.startswith("INVITE"):
        assert "m=audio" in finals[0], f"{observed}: a 200 to an INVITE without an SDP answer"
    if case.answer_has:
        assert case.answer_has in finals[0], f"{observed}: the answer has no {case.answer_has!r}:\n{finals[0]}"
    return observed


def test_corpus_case_names_are_unique() -> None:
    """Each case is one test ID per transport: a name used twice would hide one of them."""
    assert sip_corpus.names_unique()


# A case the gateway is known to answer otherwise (``Case.bug``) is an expected failure, strictly: once the bug is
# fixed the test passes, is reported XPASS as a failure, and the mark is to be removed.
CASES = [pytest.param(case, transport, id=f"{case.name}-{transport.lower()}",
                      marks=[pytest.mark.xfail(strict=True, reason=f"known bug: {case.bug}")] if case.bug else [])
         for case in sip_corpus.cases() for transport in case.transports]


@pytest.mark.parametrize(("case", "transport"), CASES)
def test_corpus_message_gets_its_answer_and_the_gateway_keeps_serving(stack: dict, case: Case, transport: str) -> None:
    """One corpus message over one transport: the answer the RFC (and the SIP guard) gives it; then, whatever the
    answer, the gateway still answers OPTIONS."""
    if case.call:
        until(lambda: readyz(stack["http"])["slots_free"] == SLOTS, "the worker's slots are free")
    wrong_answer: AssertionError | None = None
    logged = log_size(stack["proc"])
    with peer(transport, stack["gateway"], case.source) as p:
        data, token = case.render(local=p.local, transport=transport, target=stack["sip"], rtp=udp_free_port())
        got = _exchange(stack, p, case, data, token, case.expected(transport))
        try:
            print(_check(case, transport, got, token))
        except AssertionError as exc:
            wrong_answer = exc
        responses = [m for m in got if _matches(token)(m) and final(m)]
        if case.message.startswith("INVITE") and responses:
            _finish_dialog(stack, p, data, responses[0])
    assert_alive_and_clean(stack["proc"], f"{case.name} over {transport}", since=logged)
    assert options("UDP", stack["gateway"]) == 200, f"no 200 to OPTIONS after {case.name} over {transport}"
    if transport == "TCP":
        assert options("TCP", stack["gateway"]) == 200, f"no 200 to OPTIONS over TCP after {case.name}"
    if wrong_answer is not None:
        raise wrong_answer


SWEEP_TRANSPORTS = [pytest.param(name, transport, id=f"{name}-{transport.lower()}")
                    for name in sip_corpus.SWEEPS for transport in ("UDP", "TCP")]


@pytest.mark.parametrize(("name", "transport"), SWEEP_TRANSPORTS)
def test_scanner_sweep_learns_nothing_and_the_gateway_keeps_serving(stack: dict, name: str, transport: str) -> None:
    """A scanner's sweep, sent as fast as it would be (one socket or connection, no waiting): every probe gets its
    answer (OPTIONS 200, REGISTER 405, INVITE 404, or 403 for every number from a source outside sip_allow, so a
    stranger cannot tell which numbers exist); the gateway still answers OPTIONS."""
    sweep = sip_corpus.SWEEPS[name]
    source = sweep[0].source
    with peer(transport, stack["gateway"], source) as p:
        sent: dict[str, tuple[Case, bytes]] = {}
        for case in sweep:
            data, token = case.render(local=p.local, transport=transport, target=stack["sip"], rtp=udp_free_port())
            sent[token] = (case, data)
            p.send(data)
        answers: dict[str, str] = {}
        deadline = time.monotonic() + 10
        while len(answers) < len(sent) and time.monotonic() < deadline and not p.closed:
            for message in p.receive(0.5, tail=0.0):
                with contextlib.suppress(KeyError):
                    token = header(message, "Call-ID")
                    if final(message) and token in sent and token not in answers:
                        answers[token] = message
                        case, data = sent[token]
                        if data.startswith(b"INVITE"):
                            _finish_dialog(stack, p, data, message)
    observed = {sent[token][0].name: status_of(message) for token, message in answers.items()}
    by_status: dict[int | None, int] = {}
    for status in observed.values():
        by_status[status] = by_status.get(status, 0) + 1
    print(f"{name} over {transport}: {len(sent)} probes, answers {by_status}")
    missing = [sent[token][0].name for token in sent if token not in answers]
    assert not missing, f"no answer to {missing}"
    wrong = {case_name: status for case_name, status in observed.items() if status != sweep[0].expect}
    assert not wrong, f"expected {sweep[0].expect} for every probe: {wrong}"
    assert stack["proc"].poll() is None
    assert options("UDP", stack["gateway"]) == 200 and options("TCP", stack["gateway"]) == 200


def test_zz_the_gateway_log_has_no_traceback_after_the_corpus(stack: dict) -> None:
    """After the whole corpus: the same gateway process (no crash, no restart), and no traceback, AttributeError or
    assertion in its log. (Named to run last in this module.)"""
    assert_alive_and_clean(stack["proc"], "after the SIP corpus")
    metrics = scrape_metrics(stack["http"])
    answered = {name: value for name, value in metrics.items() if name.startswith("personagate_gateway_sip_responses")}
    dropped = {name: value for name, value in metrics.items() if "requests_dropped" in name}
    print("\n".join(f"{name} {value:.0f}" for name, value in sorted((answered | dropped).items())))
