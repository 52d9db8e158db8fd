"""The SIP front end with real peers on loopback: a `personagate worker` (the echo model, one slot), a
`personagate gateway` answering SIP, and `personagate call` (a second pjsua2 endpoint) as the caller."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.helpers.caller import CALL_TIMEOUT, call, call_command
from tests.helpers.programs import needs
from tests.helpers.sipp import SCENARIOS, caller_tone_wav, sipp_caller
from tests.helpers.stack import CLOSED_NUMBER, OPEN_NUMBER, echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")


@pytest.fixture(scope="module")
def stack(tenants: Path) -> Iterator[dict[str, str]]:
    """The echo stack with a media timeout of 2 s and calls cut at 4 s."""
    with echo_stack(tenants, {"PERSONAGATE_GATEWAY_SIP_MEDIA_TIMEOUT_SECONDS": "2",
                              "PERSONAGATE_GATEWAY_SIP_MAX_CALL_SECONDS": "4"}) as (addresses, _, _):
        yield addresses


def test_call_is_answered_when_primed_and_the_echo_comes_back(stack: dict[str, str], tmp_path: Path) -> None:
    rate = 16_000
    t = np.arange(int(1.5 * rate)) / rate
    chirp = 0.3 * np.sin(2 * np.pi * (700 * t + (2700 / 3.0) * t**2))  # 700 -> 3400 Hz: clear of the ringback
    played = np.concatenate([chirp, np.zeros(rate // 2)])
    soundfile.write(tmp_path / "in.wav", played, rate)
    report = call(stack, OPEN_NUMBER, "--play", str(tmp_path / "in.wav"), "--seconds", "2",
                  "--record", str(tmp_path / "out.wav"))
    assert report["status"] == 200 and report["answered"], report
    assert 0 < report["seconds_to_180"] <= report["seconds_to_183"] <= report["seconds_to_200"] < 5, report
    assert report["seconds_to_180"] < 1.0, report
    assert report["hung_up"] == "caller"
    assert report["seconds_received"] >= 1.8, report
    assert report["rtp_packets_lost"] == 0 and report["rtp_packets_received"] >= 90, report
    assert 19 <= report["frame_interval_ms"]["p50"] <= 21, report
    # the echo model returns the caller's audio: the chirp comes back, delayed by the round trip
    recorded, recorded_rate = soundfile.read(tmp_path / "out.wav")
    assert recorded_rate == rate and len(recorded) >= 1.8 * rate
    # the delay of each quarter second of the chirp (the pacer may shed a packet on the way: a 20 ms step)
    delays, matches = [], []
    for start in range(0, len(chirp), rate // 4):
        piece = chirp[start:start + rate // 4]
        correlation = np.correlate(recorded, piece, mode="valid")
        at = int(np.argmax(np.abs(correlation)))
        delays.append((at - start) / rate)
        matches.append(np.abs(correlation[at]) / (np.linalg.norm(piece) * np.linalg.norm(recorded[at:at + len(piece)])))
    delay = float(np.median(delays))
    print(f"echo through SIP: 200 OK after {report['seconds_to_200'] * 1000:.0f} ms, round trip {delay * 1000:.0f} ms, "
          f"first audio {report['seconds_200_to_first_audio'] * 1000:.0f} ms after 200, matches {np.round(matches, 2)}")
    assert sum(m > 0.9 for m in matches) >= len(matches) - 1, (matches, report)
    assert 0.08 <= delay <= 0.6, (delays, report)  # at least the model's 80 ms frame
    assert delay - 0.1 <= report["seconds_200_to_first_audio"] <= delay + 0.05, (delays, report)
    # the caller hung up (BYE): the agent call ends and its slot is free again
    until(lambda: readyz(stack["http"])["calls"] == 0, "the gateway has no call")


def test_unknown_number_is_404(stack: dict[str, str]) -> None:
    report = call(stack, "+15550000000", "--seconds", "1")
    assert report["status"] == 404 and not report["answered"], report
    assert scrape_metrics(stack["http"])['personagate_gateway_sip_invites_total{answer="404"}'] >= 1
    assert "seconds_to_180" not in report


def test_after_hours_gets_the_tenants_answer(stack: dict[str, str]) -> None:
    report = call(stack, CLOSED_NUMBER, "--seconds", "1")
    assert report["status"] == 480, report
    assert report["reason"].startswith("Closed - open Mon-Fri"), report


def test_full_worker_is_503_with_retry_after_and_bye_frees_the_slot(stack: dict[str, str]) -> None:
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    holder = subprocess.Popen(call_command(stack, OPEN_NUMBER, "--seconds", "3"), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        until(lambda: readyz(stack["http"])["calls"] == 1, "the first call holds the only slot")
        refused = call(stack, OPEN_NUMBER, "--seconds", "1")
        assert refused["status"] == 503 and not refused["answered"], refused
        assert int(refused["retry_after"]) >= 1, refused
        assert "seconds_to_180" in refused  # it rang, then was refused
        out, _ = holder.communicate(timeout=CALL_TIMEOUT)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    first = json.loads(out)
    assert first["status"] == 200 and first["hung_up"] == "caller", first
    # the BYE freed the slot: the next call is answered
    until(lambda: readyz(stack["http"])["slots_free"] == 1 and readyz(stack["http"])["calls"] == 0,
          "the slot is free again")
    again = call(stack, OPEN_NUMBER, "--seconds", "1")
    assert again["status"] == 200 and again["answered"], again
    metrics = scrape_metrics(stack["http"])
    assert metrics['personagate_gateway_sip_invites_total{answer="503"}'] >= 1
    assert metrics['personagate_gateway_sip_invites_total{answer="200"}'] >= 2
    assert metrics['personagate_gateway_front_end_setup_seconds_count{front_end="sip"}'] >= 2
    assert metrics['personagate_gateway_front_end_first_agent_audio_seconds_count{front_end="sip"}'] >= 2
    assert metrics['personagate_gateway_front_end_calls_active{front_end="sip"}'] == 0


@pytest.fixture(scope="module")
def stuck_stack(tenants: Path) -> Iterator[dict[str, str]]:
    """A gateway whose only worker never finishes priming, with a 1.5 s answer timeout; trunks from 127.0.0.1 only."""
    env = {"PERSONAGATE_GATEWAY_SIP_ANSWER_TIMEOUT_SECONDS": "1.5", "PERSONAGATE_GATEWAY_SIP_RETRY_AFTER_SECONDS": "7",
           "PERSONAGATE_GATEWAY_SIP_ALLOW": '["127.0.0.1/32"]'}
    with echo_stack(tenants, env, slots=2, worker_command=[sys.executable, "-m", "tests.stuck_worker"]) as (
            addresses, _, _):
        yield addresses


def test_priming_timeout_is_503_and_releases_the_slot(stuck_stack: dict[str, str]) -> None:
    began = time.monotonic()
    report = call(stuck_stack, OPEN_NUMBER, "--seconds", "1")
    assert report["status"] == 503 and report["retry_after"] == "7", report
    assert "seconds_to_180" in report and "seconds_to_183" in report, report
    assert 1.4 <= time.monotonic() - began <= 10, report
    until(lambda: readyz(stuck_stack["http"])["calls"] == 0, "the claim is released", timeout=5)


def test_cancel_before_answer_releases_the_claim(stuck_stack: dict[str, str]) -> None:
    command = [*call_command(stuck_stack, OPEN_NUMBER, "--seconds", "1"), "--timeout", "0.8"]
    caller = subprocess.Popen(command,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        until(lambda: readyz(stuck_stack["http"])["calls"] == 1, "the call is being set up", timeout=5)
        out, _ = caller.communicate(timeout=CALL_TIMEOUT)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    report = json.loads(out)
    assert report["status"] == 487 and not report["answered"], report  # 487 Request Terminated: CANCEL worked
    until(lambda: readyz(stuck_stack["http"])["calls"] == 0, "the claim is released", timeout=3)
    assert scrape_metrics(stuck_stack["http"])['personagate_gateway_sip_invites_total{answer="cancelled"}'] >= 1


def test_a_source_outside_the_allow_list_is_403(stuck_stack: dict[str, str]) -> None:
    report = call(stuck_stack, OPEN_NUMBER, "--seconds", "1", "--host", "127.0.0.2")
    assert report["status"] == 403 and "seconds_to_180" not in report, report
    assert scrape_metrics(stuck_stack["http"])['personagate_gateway_sip_invites_total{answer="403"}'] == 1


def test_sip_helpers() -> None:
    from gateway.sip.inbound import refusal_answer
    from gateway.sip.leg import parse_response
    from gateway.sip.server import AllowList, dialed_number, source_ip
    from personagate_common.routing import Refusal

    assert dialed_number("INVITE sip:+14155550186@10.0.0.1:5060;transport=udp SIP/2.0\r\n") == "+14155550186"
    assert dialed_number("INVITE sip:%2B1-415-555-0186@gw SIP/2.0\r\n") == "+14155550186"
    assert dialed_number("INVITE tel:+442079460318 SIP/2.0\r\n") == "+442079460318"
    assert dialed_number("OPTIONS sip:gw SIP/2.0\r\n") is None
    assert source_ip("127.0.0.1:5060") == "127.0.0.1" and source_ip("[::1]:5060") == "::1"
    allow = AllowList(["127.0.0.0/8", "10.1.0.0/16", "::1/128"])
    assert "127.0.0.1" in allow and "10.1.2.3" in allow and "::1" in allow
    assert "10.2.0.1" not in allow and "not-an-ip" not in allow
    assert refusal_answer(Refusal("tenant_limit", "x")) == (486, "Busy Here", {})
    for reason in ("no_capacity", "unavailable", "draining"):
        status, _, headers = refusal_answer(Refusal(reason, "x", 2.5))
        assert status == 503 and headers == {"Retry-After": "3"}
    response = parse_response("SIP/2.0 503 No Agent\r\nRetry-After: 5\r\nCSeq: 1 INVITE\r\n\r\n")
    assert response is not None and response.status == 503 and response.headers["retry-after"] == "5"
    assert parse_response("INVITE sip:x SIP/2.0\r\n\r\n") is None


def test_agent_call_ending_by_itself_sends_bye(tenants: Path) -> None:
    """The worker dies mid-call and no other worker can take the call (no_worker): the gateway hangs up."""
    with echo_stack(tenants, gateway_first=True) as (stack, worker_proc, _):
        caller = subprocess.Popen(call_command(stack, OPEN_NUMBER, "--seconds", "20"), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            until(lambda: readyz(stack["http"])["calls"] == 1, "the call is up")
            time.sleep(0.5)
            worker_proc.kill()
            out, _ = caller.communicate(timeout=CALL_TIMEOUT)  # the call's rehome deadline is 5 s
        finally:
            if caller.poll() is None:
                caller.kill()
                caller.wait()
    report = json.loads(out)
    assert report["status"] == 200 and report["hung_up"] == "gateway", report
    assert report["seconds_received"] < 15, report


@needs("sipp")
def test_sipp_call_with_pcmu_rtp(stack: dict[str, str], tmp_path: Path) -> None:
    """A third-party UA (sipp) offering PCMU only: answered, its RTP reaches the gateway, BYE answered."""
    before = scrape_metrics(stack["http"])
    caller_tone_wav(tmp_path)
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    done = subprocess.run(sipp_caller(SCENARIOS / "pcmu_call.xml", stack["sip"], OPEN_NUMBER),
                          cwd=tmp_path, capture_output=True, text=True, timeout=40, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    answered = 'personagate_gateway_sip_invites_total{answer="200"}'
    assert after[answered] == before.get(answered, 0) + 1
    received = "personagate_gateway_sip_rtp_packets_received_total"
    assert after[received] - before[received] >= 60, (before[received], after[received])  # 1.5 s at 50 packets/s


@needs("sipp")
def test_no_rtp_from_the_caller_is_hung_up(stack: dict[str, str], tmp_path: Path) -> None:
    """The stack's media timeout is 2 s: a caller that sends no RTP at all gets BYE from the gateway."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    began = time.monotonic()
    done = subprocess.run(sipp_caller(SCENARIOS / "silent_call.xml", stack["sip"], OPEN_NUMBER),
                          cwd=tmp_path, capture_output=True, text=True, timeout=40, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert 1.5 <= time.monotonic() - began <= 8
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    assert scrape_metrics(stack["http"])['personagate_gateway_calls_ended_total{reason="media_timeout"}'] == 1


def test_a_call_is_cut_at_its_maximum_duration(stack: dict[str, str]) -> None:
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    report = call(stack, OPEN_NUMBER, "--seconds", "15")
    assert report["status"] == 200 and report["hung_up"] == "gateway", report
    assert 3.5 <= report["seconds_received"] <= 6, report
    assert scrape_metrics(stack["http"])['personagate_gateway_calls_ended_total{reason="max_duration"}'] == 1
