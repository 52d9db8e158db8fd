"""Escalation when the caller's side refuses the REFER: the gateway calls the human itself and bridges the two
calls. Real peers on loopback: a `personagate worker` (echo), a `personagate gateway` answering SIP,
`personagate call` as the caller (a pjsua2 UA refusing REFER, 603, as many trunks do), and sipp as the human
(scenarios written to the test's folder; `-rtp_echo` sends the RTP it receives back)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from tests.helpers.processes import udp_free_port
from tests.helpers.programs import needs
from tests.helpers.sipp import Human
from tests.helpers.stack import echo_stack, escalating_tenant, readyz, scrape_metrics
from tests.helpers.wait import until
from tests.helpers.worker import WORKER_AUTH_HEADERS

pytest.importorskip("pjsua2")
pytestmark = needs("sipp")

ROOT = Path(__file__).resolve().parent.parent
NUMBER = "+14155550186"  # harbor-mutual's catastrophe line: answered at any hour; escalation digit 0
RATE = 16_000
RING_SECONDS = 3.0
CALL_TIMEOUT = 30
TONE_HZ = 1000.0
TONE_AFTER = 5.0  # seconds from the answer to the tone the caller plays once bridged

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A one-slot echo worker and a SIP gateway whose tenant escalates digit 0 to a loopback URI (where each
    test runs sipp as the human), with a ring timeout of 3 s for the gateway's own call."""
    folder = tmp_path_factory.mktemp("tenants")
    target = escalating_tenant(folder)
    with echo_stack(folder, {"PERSONAGATE_GATEWAY_SIP_TRANSFER_RING_SECONDS": str(RING_SECONDS)}) as (addresses, _, _):
        yield addresses | target


def _caller(stack: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "personagate", "call", f"sip:{NUMBER}@{stack['sip']}",
                             "--timeout", str(CALL_TIMEOUT), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _report(caller: subprocess.Popen) -> dict:
    out, err = caller.communicate(timeout=CALL_TIMEOUT + 30)
    assert caller.returncode in (0, 1), err[-3000:]
    return json.loads(out)


def _tone_file(path: Path, silence: float, tone: float) -> Path:
    """``silence`` seconds of silence, then ``tone`` seconds of a 1 kHz tone at −10 dBFS."""
    t = np.arange(int(tone * RATE)) / RATE
    soundfile.write(path, np.concatenate([np.zeros(int(silence * RATE)), 0.3 * np.sin(2 * np.pi * TONE_HZ * t)]),
                    RATE)
    return path


def _level(audio: np.ndarray, start: float, end: float) -> tuple[float, float]:
    """The dBFS level of ``audio[start:end]`` (seconds) and the share of its energy within 100 Hz of the tone."""
    piece = audio[int(start * RATE):int(end * RATE)].astype(np.float64)
    rms = float(np.sqrt(np.mean(piece**2))) + 1e-9
    spectrum = np.abs(np.fft.rfft(piece)) ** 2
    freqs = np.fft.rfftfreq(len(piece), 1 / RATE)
    share = float(spectrum[np.abs(freqs - TONE_HZ) < 100].sum() / (spectrum.sum() + 1e-9))
    return 20 * np.log10(rms), share


def _count(metrics: dict[str, float], name: str) -> float:
    return metrics.get(name, 0.0)


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return _count(after, name) - _count(before, name)


def _transfers(result: str, method: str) -> str:
    return f'personagate_gateway_front_end_transfers_total{{front_end="sip",method="{method}",result="{result}"}}'


def _active_sessions(stack: dict[str, str]) -> int:
    return len(httpx.get(f"{stack['worker']}/v1/info", timeout=5, headers=WORKER_AUTH_HEADERS).json()["active_sessions"])


def test_refused_refer_bridges_the_caller_to_the_human(stack: dict[str, str], tmp_path: Path) -> None:
    """The caller's side refuses the REFER; the gateway calls the human (sipp, echoing RTP) and bridges them:
    the agent session is released while the caller is still on the line, the caller's audio reaches the human
    and comes back (a tone played only after the agent is gone), and the caller's BYE makes the gateway BYE
    the human."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    human = Human(stack, tmp_path, "answers")
    caller = _caller(stack, "--seconds", "7.5", "--dtmf", "0@0.5", "--play",
                     str(_tone_file(tmp_path / "in.wav", TONE_AFTER, 1.5)),
                     "--record", str(tmp_path / "out.wav"))
    began = time.monotonic()
    try:
        # bridged: the worker's session is gone and the slot free, while the caller's SIP call goes on
        until(lambda: _active_sessions(stack) == 0 and readyz(stack["http"])["slots_free"] == 1
              and scrape_metrics(stack["http"])['personagate_gateway_front_end_calls_active{front_end="sip"}'] == 1,
              "the agent session is released with the caller still on the line", timeout=10)
        released_after = time.monotonic() - began
        report = _report(caller)
    finally:
        if caller.poll() is None:
            caller.kill()
    assert human.finished() == 0, human.errors()  # the gateway sent the human its BYE
    assert report["status"] == 200 and report["answered"], report
    assert report["refers"][0]["answer"] == 603, report
    assert report["hung_up"] == "caller", report
    assert released_after < TONE_AFTER, released_after  # before the tone starts (measured from before the answer)
    audio, rate = soundfile.read(tmp_path / "out.wav")
    assert rate == RATE
    quiet, _ = _level(audio, 1.5, TONE_AFTER - 0.5)
    tone, share = _level(audio, TONE_AFTER + 0.5, TONE_AFTER + 1.4)
    print(f"bridged: agent released {released_after:.2f} s after dialing; before the tone {quiet:.1f} dBFS, "
          f"tone back through the human {tone:.1f} dBFS ({share:.0%} at {TONE_HZ:g} Hz)")
    assert quiet < -45, quiet  # no agent (and no ringback) once bridged
    assert tone > -25 and share > 0.8, (tone, share)  # the caller's tone went to the human and came back
    until(lambda: scrape_metrics(stack["http"])['personagate_gateway_front_end_calls_active{front_end="sip"}'] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    assert _delta(before, after, _transfers("failed", "refer")) == 1
    assert _delta(before, after, _transfers("success", "bridge")) == 1
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="transfer"}') == 1


def test_human_hanging_up_ends_the_callers_leg(stack: dict[str, str], tmp_path: Path) -> None:
    """Once bridged, the human's BYE makes the gateway BYE the caller: the caller sees the gateway hang up."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    human = Human(stack, tmp_path, "hangs_up", pause_ms=2000)
    report = _report(_caller(stack, "--seconds", "10", "--dtmf", "0@0.5"))
    assert human.finished() == 0, human.errors()
    assert report["status"] == 200 and report["answered"], report
    assert report["hung_up"] == "gateway", report
    until(lambda: scrape_metrics(stack["http"])['personagate_gateway_front_end_calls_active{front_end="sip"}'] == 0
          and readyz(stack["http"])["slots_free"] == 1, "the call is over, the slot free")


@pytest.mark.parametrize(("answer", "result"), [("486 Busy Here", "busy"), ("503 Service Unavailable", "failed")])
def test_busy_human_keeps_the_caller_with_the_agent(stack: dict[str, str], tmp_path: Path, answer: str,
                                                    result: str) -> None:
    """The human side answers 486 (or an error): the caller stays with the agent (the echo agent still returns
    the caller's tone afterwards) until the caller hangs up."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    human = Human(stack, tmp_path, "refuses", status=answer)
    report = _report(_caller(stack, "--seconds", "4", "--dtmf", "0@0.5", "--play",
                             str(_tone_file(tmp_path / "in.wav", 2, 1.5)), "--record", str(tmp_path / "out.wav")))
    assert human.finished() == 0, human.errors()
    assert report["status"] == 200 and report["hung_up"] == "caller", report
    audio, _ = soundfile.read(tmp_path / "out.wav")
    tone, share = _level(audio, 2.5, 3.4)
    assert tone > -25 and share > 0.8, (tone, share)  # the agent (echo) is still there
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    assert _delta(before, after, _transfers(result, "bridge")) == 1
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="hangup"}') == 1


def test_unanswered_human_is_cancelled_after_the_ring_timeout(stack: dict[str, str], tmp_path: Path) -> None:
    """The human's phone rings and nobody answers: after the ring timeout (3 s here) the gateway cancels its
    INVITE and the caller stays with the agent."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    human = Human(stack, tmp_path, "no_answer")
    report = _report(_caller(stack, "--seconds", "6", "--dtmf", "0@0.5"))
    assert human.finished() == 0, human.errors()  # the CANCEL came (sipp answered it 200, then 487)
    assert report["status"] == 200 and report["hung_up"] == "caller", report
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    assert _delta(before, after, _transfers("no_answer", "bridge")) == 1
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="hangup"}') == 1


def test_caller_hanging_up_while_the_human_rings_cancels_the_humans_call(stack: dict[str, str],
                                                                         tmp_path: Path) -> None:
    """The caller gives up while the human's phone rings: the gateway cancels its INVITE at once (not after
    the ring timeout) and counts the attempt as abandoned."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = scrape_metrics(stack["http"])
    human = Human(stack, tmp_path, "no_answer")
    report = _report(_caller(stack, "--seconds", "1.2", "--dtmf", "0@0.5"))
    assert report["status"] == 200 and report["hung_up"] == "caller", report
    assert human.finished() == 0, human.errors()  # the CANCEL came
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    after = scrape_metrics(stack["http"])
    assert _delta(before, after, _transfers("abandoned", "bridge")) == 1
    assert _delta(before, after, _transfers("no_answer", "bridge")) == 0


def test_transfer_settings_are_validated() -> None:
    """A ring timeout of zero (or over 5 minutes) is refused at start with the setting's name; the fallback
    is on by default."""
    from gateway.config import GatewaySettings, SettingsError, load_gateway_settings

    assert GatewaySettings().sip_transfer_bridge_fallback is True
    for bad in (0, 301):
        with pytest.raises(SettingsError) as err:
            load_gateway_settings(sip_transfer_ring_seconds=bad)
        assert "sip_transfer_ring_seconds" in str(err.value)


@pytest.mark.e2e  # starts a process
def test_without_the_fallback_a_refused_refer_keeps_the_caller_with_the_agent(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """sip_transfer_bridge_fallback off: after the refused REFER the gateway calls nobody (no INVITE reaches
    the target) and the caller stays with the agent."""
    folder = tmp_path_factory.mktemp("tenants")
    shutil.copytree(ROOT / "tenants" / "harbor-mutual", folder / "harbor-mutual")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        yaml = folder / "harbor-mutual" / "tenant.yaml"
        yaml.write_text(re.sub(r"transfer_to: \S+", f"transfer_to: sip:humans@127.0.0.1:{target.getsockname()[1]}",
                               yaml.read_text()))
        with echo_stack(folder, {"PERSONAGATE_GATEWAY_SIP_TRANSFER_BRIDGE_FALLBACK": "false"}) as (stack, _, _):
            report = _report(_caller(stack, "--seconds", "2.5", "--dtmf", "0@0.5"))
            assert report["refers"][0]["answer"] == 603 and report["hung_up"] == "caller", report
            until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
            metrics = scrape_metrics(stack["http"])
        target.settimeout(0.1)
        with pytest.raises(TimeoutError):
            target.recv(65535)  # the gateway never called the target
    assert _count(metrics, _transfers("failed", "refer")) == 1
    assert not any('method="bridge"' in name for name in metrics), metrics


@pytest.mark.e2e  # starts a process
def test_gateway_drain_keeps_a_bridged_call_until_it_ends(tmp_path: Path) -> None:
    """SIGTERM while the caller talks to the human: the bridged call has no agent session, yet the drain waits
    for it; the human hanging up ends it (the gateway BYEs the caller) and only then the gateway exits, 0."""
    folder = tmp_path / "tenants"
    target = escalating_tenant(folder)
    with echo_stack(folder) as (addresses, _, gateway):
        stack = addresses | target
        human = Human(stack, tmp_path, "hangs_up", pause_ms=6000)
        caller = _caller(stack, "--seconds", "20", "--dtmf", "0@0.5")
        try:
            until(lambda: _active_sessions(stack) == 0
                  and scrape_metrics(stack["http"])['personagate_gateway_front_end_calls_active{front_end="sip"}'] == 1,
                  "the caller is bridged to the human", timeout=10)
            gateway.send_signal(signal.SIGTERM)
            time.sleep(2.0)
            assert gateway.poll() is None, "the drain ended with a bridged call in progress"
            report = _report(caller)
        finally:
            if caller.poll() is None:
                caller.kill()
        assert human.finished() == 0, human.errors()
        assert report["answered"] and report["hung_up"] == "gateway", report
        assert gateway.wait(15) == 0


@pytest.mark.e2e  # starts a process
def test_key_presses_reach_the_human_once_bridged(tmp_path: Path) -> None:
    """A PBX queue or menu on the human's side may ask the caller for keys: once bridged, the caller's key
    presses are passed on. The human here is the gateway itself, answering its own number with a second echo
    agent, so the key arrives as a real RFC 4733 event at a real SIP call (3 calls: the wheel allows 4)."""
    folder = tmp_path / "tenants"
    sip_port = udp_free_port()
    escalating_tenant(folder)
    yaml = folder / "harbor-mutual" / "tenant.yaml"
    yaml.write_text(re.sub(r"transfer_to: \S+", f"transfer_to: sip:{NUMBER}@127.0.0.1:{sip_port}", yaml.read_text()))
    with echo_stack(folder, slots=2, sip_port=sip_port) as (stack, _, _):
        before = scrape_metrics(stack["http"])
        report = _report(_caller(stack, "--seconds", "7", "--dtmf", "0@0.5", "--dtmf", "5@4.5"))
        assert report["answered"] and report["refers"][0]["answer"] == 603, report
        until(lambda: scrape_metrics(stack["http"])['personagate_gateway_front_end_calls_active{front_end="sip"}'] == 0, "both calls are over")
        after = scrape_metrics(stack["http"])
    assert _delta(before, after, _transfers("success", "bridge")) == 1
    # the caller's 0 (escalation) and 5, and the 5 again as the human's call received it
    assert _delta(before, after, 'personagate_gateway_front_end_dtmf_total{front_end="sip",method="rfc4733"}') == 3
