"""Hold and resume by the caller (RFC 3264) on live SIP calls, with real peers on loopback: a `personagate
worker` (echo), a `personagate gateway` answering SIP with a 2 s media timeout, and sipp as a caller that holds
the call every way carriers and PBXs do and checks the direction of each answer."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.programs import needs
from tests.helpers.sipp import SCENARIOS, caller_tone_wav, sipp_caller
from tests.helpers.stack import echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")
pytestmark = needs("sipp")

ROOT = Path(__file__).resolve().parent.parent
NUMBER = "+14155550186"  # harbor-mutual's catastrophe line: answered at any hour
MEDIA_TIMEOUT = 2
MAX_CALL_SECONDS = 14


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The echo stack with a 2 s media timeout and calls cut at 14 s."""
    folder = tmp_path_factory.mktemp("tenants")
    shutil.copytree(ROOT / "tenants" / "harbor-mutual", folder / "harbor-mutual")
    with echo_stack(folder, {"PERSONAGATE_GATEWAY_SIP_MEDIA_TIMEOUT_SECONDS": str(MEDIA_TIMEOUT),
                             "PERSONAGATE_GATEWAY_SIP_MAX_CALL_SECONDS": str(MAX_CALL_SECONDS)}) as (addresses, _, _):
        yield addresses


def _sipp(stack: dict[str, str], scenario: str, workdir: Path, timeout: float = 40) -> subprocess.CompletedProcess:
    caller_tone_wav(workdir)
    return subprocess.run(sipp_caller(SCENARIOS / scenario, stack["sip"], NUMBER,
                                      sipp_timeout=timeout - 10),
                          cwd=workdir, capture_output=True, text=True, timeout=timeout, check=False)


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _worker_missing_frames(stack: dict[str, str]) -> float:
    for line in httpx.get(f"{stack['worker']}/metrics", timeout=5).text.splitlines():
        if line.startswith("personagate_worker_input_frames_missing_total "):
            return float(line.split()[1])
    raise AssertionError("the worker has no input_frames_missing_total metric")


def test_hold_and_resume_are_answered_per_rfc3264_and_a_hold_is_not_a_media_timeout(
        stack: dict[str, str], tmp_path: Path) -> None:
    """A caller holds by re-INVITE a=sendonly (answered recvonly) and a=inactive (answered inactive), sending no
    RTP for 3 s (longer than the media timeout); resumes by a=sendrecv; holds the RFC 2543 way (c=0.0.0.0:
    answered inactive, never sendrecv, which carriers answer with BYE); resumes; re-INVITEs without SDP (the
    gateway offers sendrecv); holds and resumes by UPDATE. The scenario fails on any wrong direction. The call
    stays up to the caller's BYE, with three holds counted and their seconds measured."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    done = _sipp(stack, "hold_call.xml", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="hangup"}') == 1
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="media_timeout"}') == 0
    assert _delta(before, after, "personagate_gateway_sip_holds_total") == 3
    assert _delta(before, after, "personagate_gateway_sip_held_seconds_count") == 3
    held = _delta(before, after, "personagate_gateway_sip_held_seconds_sum")
    assert 4.0 <= held <= 8.0, held  # 3 s + 1 s by re-INVITE, 1 s by UPDATE
    assert after["personagate_gateway_sip_calls_held"] == 0
    # the call record's RTP count covers every stream the hold and resumes made, not only the first
    assert _delta(before, after, "personagate_gateway_sip_rtp_packets_received_total") >= 150


def test_a_long_hold_pauses_the_agent_and_ends_only_at_the_maximum_duration(
        stack: dict[str, str], tmp_path: Path) -> None:
    """A caller holds right after the answer and plays music on hold until the gateway hangs up: the call
    outlives the 2 s media timeout and is cut only at the 14 s maximum duration; the music never reaches the
    agent (the worker steps the session on caller audio only, so it counts every tick of the hold as a missing
    frame: the session is paused, not fed music or silence)."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    missing_before = _worker_missing_frames(stack)
    began = time.monotonic()
    done = _sipp(stack, "hold_until_bye.xml", tmp_path)
    elapsed = time.monotonic() - began
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert MAX_CALL_SECONDS - 0.5 <= elapsed <= MAX_CALL_SECONDS + 6, elapsed
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="max_duration"}') == 1
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="media_timeout"}') == 0
    assert _delta(before, after, "personagate_gateway_sip_holds_total") == 1
    held = _delta(before, after, "personagate_gateway_sip_held_seconds_sum")
    assert MAX_CALL_SECONDS - 2 <= held <= MAX_CALL_SECONDS + 1, held
    # the worker ticks at 12.5 frames a second; the session heard nothing for (nearly) all of the hold
    missing = _worker_missing_frames(stack) - missing_before
    assert missing >= 0.8 * 12.5 * (MAX_CALL_SECONDS - 2), missing
    rtp = _delta(before, after, "personagate_gateway_sip_rtp_packets_received_total")
    assert rtp >= 0.8 * 50 * (MAX_CALL_SECONDS - 1), rtp  # the music did arrive at the gateway


def test_rfc2543_hold_answer_helpers() -> None:
    """The leg's rewrite of pjsua's answer to a c=0.0.0.0 hold: every direction becomes inactive (one is added
    to a media section without one), and only a 0.0.0.0 connection address counts as that kind of hold."""
    from gateway.sip.leg import add_stream_stats, answer_inactive, is_rfc2543_hold

    answer = "v=0\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=sendrecv\r\na=rtpmap:0 PCMU/8000\r\n"
    assert is_rfc2543_hold(answer) and not is_rfc2543_hold(answer.replace("0.0.0.0", "10.0.0.1"))
    assert answer_inactive(answer) == answer.replace("a=sendrecv", "a=inactive")
    bare = "v=0\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    assert answer_inactive(bare) == bare + "a=inactive\r\n"
    first = {"rtp_packets_received": 50, "rtp_packets_lost": 1, "rx_jitter_ms": {"mean": 1.0, "max": 4.0},
             "jitter_buffer_ms": {"mean": 20, "max": 40}}
    second = {"rtp_packets_received": 100, "rtp_packets_lost": 0, "rx_jitter_ms": {"mean": 0.5, "max": 2.0},
              "jitter_buffer_ms": {"mean": 30, "max": 30}}
    assert add_stream_stats(first, second) == {"rtp_packets_received": 150, "rtp_packets_lost": 1,
                                               "rx_jitter_ms": {"mean": 0.5, "max": 4.0},
                                               "jitter_buffer_ms": {"mean": 30, "max": 40}}
    assert add_stream_stats({}, second) == second and add_stream_stats(first, {}) == first


def test_a_call_that_begins_on_hold_is_held_from_the_answer(stack: dict[str, str], tmp_path: Path) -> None:
    """An INVITE offering a=sendonly is answered a=recvonly; the caller sends no RTP for 4 s (twice the media
    timeout) and hangs up: the call was held from the answer, so it was not cut for lack of media."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    done = _sipp(stack, "held_from_the_invite.xml", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="hangup"}') == 1
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="media_timeout"}') == 0
    assert _delta(before, after, "personagate_gateway_sip_holds_total") == 1
    assert 3.5 <= _delta(before, after, "personagate_gateway_sip_held_seconds_sum") <= 6
