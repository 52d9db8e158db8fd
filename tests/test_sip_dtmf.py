"""DTMF and escalation by REFER on live SIP calls, with real peers on loopback: a `personagate worker` (echo),
a `personagate gateway` answering SIP, `personagate call` sending RFC 4733 digits (and answering the REFER),
sipp as the transfer target (a plain UAS) and as a caller sending a digit by SIP INFO."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import udp_free_port
from tests.helpers.programs import needs
from tests.helpers.sipp import SCENARIOS, sipp_caller
from tests.helpers.stack import echo_stack, escalating_tenant, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")

NUMBER = "+14155550186"  # harbor-mutual's catastrophe line: answered at any hour; escalation digit 0
CALL_TIMEOUT = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A one-slot echo worker and a SIP gateway whose tenant escalates digit 0 to a loopback URI (where a
    test may run a sipp UAS)."""
    folder = tmp_path_factory.mktemp("tenants")
    target = escalating_tenant(folder)
    with echo_stack(folder) as (addresses, _, _):
        yield addresses | target


def call(stack: dict[str, str], *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "personagate", "call", f"sip:{NUMBER}@{stack['sip']}", "--timeout",
                           str(CALL_TIMEOUT), *args], check=False, capture_output=True, text=True,
                          timeout=CALL_TIMEOUT + 30)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return json.loads(done.stdout)


def _count(metrics: dict[str, float], name: str) -> float:
    return metrics.get(name, 0.0)


def test_refused_refer_keeps_the_caller_with_the_agent(stack: dict[str, str]) -> None:
    """Digit 5 is counted and does nothing; digit 0 makes the gateway REFER the caller to the tenant's
    transfer_to; the caller refuses (603): the call goes on with the agent until the caller hangs up."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    report = call(stack, "--seconds", "4", "--dtmf", "5@0.5", "--dtmf", "0@1.5")
    assert report["status"] == 200 and report["answered"], report
    assert [r["refer_to"] for r in report.get("refers", [])] == [stack["target"]], report
    assert report["refers"][0]["answer"] == 603
    assert report["hung_up"] == "caller", report  # the gateway kept the call
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    rfc = 'personagate_gateway_front_end_dtmf_total{front_end="sip",method="rfc4733"}'
    assert _count(after, rfc) - _count(before, rfc) == 2  # one count per key press, not per RTP packet
    failed = 'personagate_gateway_front_end_transfers_total{front_end="sip",method="refer",result="failed"}'
    assert _count(after, failed) - _count(before, failed) == 1
    hangup = 'personagate_gateway_calls_ended_total{reason="hangup"}'
    assert _count(after, hangup) - _count(before, hangup) == 1


@needs("sipp")
def test_accepted_refer_ends_the_call_with_transfer(stack: dict[str, str], tmp_path: Path) -> None:
    """The caller accepts the REFER (202) and calls the target (a sipp UAS); the NOTIFY's 200 makes the
    gateway end its call (reason transfer, the agent session released)."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    target = subprocess.Popen(
        ["sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", stack["target_port"], "-mp", str(udp_free_port()),
         "-m", "1", "-timeout", "45", "-nostdin"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The caller would stay 30 s: the gateway's BYE after the NOTIFY ends it long before, even on a busy machine
        # (8 s was too short at load 8).
        report = call(stack, "--seconds", "30", "--dtmf", "0@1.0", "--accept-refer")
    finally:
        try:
            target.wait(timeout=10)
        except subprocess.TimeoutExpired:
            target.kill()
            target.wait(timeout=5)
    assert report["status"] == 200 and report["answered"], report
    assert report.get("refer_to") == stack["target"], report
    assert report["hung_up"] == "gateway", report
    until(lambda: readyz(stack["http"])["calls"] == 0 and readyz(stack["http"])["slots_free"] == 1,
          "the agent session is released")
    after = scrape_metrics(stack["http"])
    success = 'personagate_gateway_front_end_transfers_total{front_end="sip",method="refer",result="success"}'
    assert _count(after, success) - _count(before, success) == 1
    ended = 'personagate_gateway_calls_ended_total{reason="transfer"}'
    assert _count(after, ended) - _count(before, ended) == 1


@needs("sipp")
def test_dtmf_by_sip_info_is_counted(stack: dict[str, str], tmp_path: Path) -> None:
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    done = subprocess.run(sipp_caller(SCENARIOS / "info_dtmf_call.xml", stack["sip"], NUMBER),
                          cwd=tmp_path, capture_output=True, text=True, timeout=40, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    info = 'personagate_gateway_front_end_dtmf_total{front_end="sip",method="info"}'
    assert _count(scrape_metrics(stack["http"]), info) - _count(before, info) == 1


def test_transfer_without_a_final_notify_times_out_and_keeps_the_caller(stack: dict[str, str]) -> None:
    """The caller accepts the REFER but the target never answers (a socket that swallows the INVITE): no final
    NOTIFY within the gateway's 10 s, so the transfer counts as a timeout and the caller stays with the agent."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", int(stack["target_port"])))
        report = call(stack, "--seconds", "13", "--dtmf", "0@0.5", "--accept-refer")
    assert report["status"] == 200 and report["answered"], report
    assert report.get("refer_to") == stack["target"], report
    assert report["hung_up"] == "caller", report
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    timeout = 'personagate_gateway_front_end_transfers_total{front_end="sip",method="refer",result="timeout"}'
    assert _count(after, timeout) - _count(before, timeout) == 1
