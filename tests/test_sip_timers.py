"""SIP timers on real calls, with real peers on loopback and sipp as the caller: the ringing keep-alive (183
Session Progress repeated while the session is primed) and RFC 4028 session timers (granted, enforced with BYE
and the end reason ``session_timer``, refreshed by re-INVITE and UPDATE, 422 below Min-SE)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import free_port, serve, udp_free_port
from tests.helpers.programs import needs
from tests.helpers.sipp import SCENARIOS, caller_tone_wav, sipp_caller
from tests.helpers.stack import echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")
pytestmark = needs("sipp")

ROOT = Path(__file__).resolve().parent.parent
NUMBER = "+14155550186"  # harbor-mutual's catastrophe line: answered at any hour
ANSWER_TIMEOUT = 3.5


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tenants")
    shutil.copytree(ROOT / "tenants" / "harbor-mutual", folder / "harbor-mutual")
    return folder


def _sipp(sip: str, scenario: str, workdir: Path, *, timeout: float = 40, trace: bool = False
          ) -> subprocess.Popen:
    caller_tone_wav(workdir)
    return subprocess.Popen(sipp_caller(SCENARIOS / scenario, sip, NUMBER, sipp_timeout=timeout,
                                        extra=["-trace_msg"] if trace else ()),
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(sipp: subprocess.Popen, timeout: float) -> None:
    try:
        out, err = sipp.communicate(timeout=timeout)
    finally:
        if sipp.poll() is None:
            sipp.kill()
            sipp.wait()
    assert sipp.returncode == 0, out[-3000:] + err[-2000:]


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_ringing_is_repeated_every_second_while_the_session_is_primed(tenants: Path, tmp_path: Path) -> None:
    """A worker that never finishes priming, a 3.5 s answer timeout: the caller gets 183 Session Progress at
    once and again every second (sip_ringing_interval_seconds, default 1 s), four in all, so a proxy that
    cancels a quiet INVITE keeps it and a 183 lost over UDP is repaired; then 503."""
    env = os.environ | {"PERSONAGATE_GATEWAY_SIP_ANSWER_TIMEOUT_SECONDS": str(ANSWER_TIMEOUT)}
    worker_port, http_port, sip_port = free_port(), free_port(), udp_free_port()
    with serve([sys.executable, "-m", "tests.stuck_worker", str(worker_port)],
               f"http://127.0.0.1:{worker_port}/readyz", env=env), \
            serve([sys.executable, "-m", "personagate", "gateway", "--port", str(http_port), "--tenants", str(tenants),
                   "--worker", f"http://127.0.0.1:{worker_port}", "--sip-port", str(sip_port)],
                  f"http://127.0.0.1:{http_port}/readyz", env=env):
        http = f"http://127.0.0.1:{http_port}"
        until(lambda: readyz(http)["slots_free"] == 2, "the gateway sees the stuck worker's slots")
        began = time.monotonic()
        _finish(_sipp(f"127.0.0.1:{sip_port}", "ringing_call.xml", tmp_path, timeout=20, trace=True), 30)
        elapsed = time.monotonic() - began
        repeated = scrape_metrics(http)["personagate_gateway_sip_provisionals_repeated_total"]
    trace = next(tmp_path.glob("ringing_call_*_messages.log")).read_text()
    received = re.findall(r"message received \[\d+\] bytes :\s+SIP/2\.0 (\d+)", trace)
    sessions = received.count("183")
    assert received[-1] == "503", received
    assert ANSWER_TIMEOUT - 0.2 <= elapsed <= ANSWER_TIMEOUT + 5, elapsed
    assert 3 <= sessions <= 5, received  # at 0, 1, 2, 3 s (the machine may be slow by a tick either way)
    assert repeated == sessions - 1, (repeated, received)


@pytest.fixture(scope="module")
def stack(tenants: Path) -> Iterator[dict[str, str]]:
    """A two-slot echo worker and a SIP gateway with the default session timer settings (Min-SE 90 s)."""
    with echo_stack(tenants, slots=2) as (addresses, _, _):
        yield addresses


def test_session_expires_below_min_se_is_422(stack: dict[str, str], tmp_path: Path) -> None:
    """A caller asking for Session-Expires: 60 gets 422 Session Interval Too Small with Min-SE: 90 (checked by
    the sipp scenario) instead of a session the gateway would have to end every minute."""
    _finish(_sipp(stack["sip"], "session_timer_too_small.xml", tmp_path, timeout=10), 20)
    assert readyz(stack["http"])["calls"] == 0


def test_session_timer_ends_an_unrefreshed_call_and_keeps_a_refreshed_one(
        stack: dict[str, str], tmp_path: Path) -> None:
    """Two callers ask for Session-Expires: 90;refresher=uac and get it in the 200 OK (Require: timer). One
    never refreshes: the gateway sends BYE at 60 s (RFC 4028: a third of the interval before expiry) and the
    call ends with reason session_timer. The other refreshes by re-INVITE at 5 s and by UPDATE at 62 s and is
    still up at 68 s, when it hangs up itself (a BYE from the gateway at 60 or 65 s would fail its scenario).
    90 s is pjsip's and the RFC's floor for Min-SE, so this is the shortest test that proves it (~70 s)."""
    until(lambda: readyz(stack["http"])["slots_free"] == 2, "both slots are free")
    before = scrape_metrics(stack["http"])
    (tmp_path / "idle").mkdir()
    (tmp_path / "refresh").mkdir()
    began = time.monotonic()
    idle = _sipp(stack["sip"], "session_timer_idle.xml", tmp_path / "idle", timeout=85)
    refresh = _sipp(stack["sip"], "session_timer_refresh.xml", tmp_path / "refresh", timeout=85)
    _finish(idle, 90)
    idle_seconds = time.monotonic() - began
    until(lambda: readyz(stack["http"])["calls"] == 1, "the unrefreshed call is over")
    middle = scrape_metrics(stack["http"])
    assert _delta(before, middle, 'personagate_gateway_calls_ended_total{reason="session_timer"}') == 1
    _finish(refresh, 30)
    refresh_seconds = time.monotonic() - began
    until(lambda: readyz(stack["http"])["calls"] == 0, "the refreshed call is over")
    after = scrape_metrics(stack["http"])
    assert 58 <= idle_seconds <= 66, idle_seconds
    assert 67 <= refresh_seconds <= 78, refresh_seconds
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="session_timer"}') == 1
    assert _delta(before, after, 'personagate_gateway_calls_ended_total{reason="hangup"}') == 1


def test_a_session_expiry_below_min_se_is_refused_at_start() -> None:
    """The gateway will not start with a session timer it would itself refuse (422) or pjsip cannot run."""
    from gateway.config import SettingsError, load_gateway_settings

    with pytest.raises(SettingsError, match=r"sip_session_expires_seconds \(100\) is below sip_min_se_seconds \(120\)"):
        load_gateway_settings(sip_session_expires_seconds=100, sip_min_se_seconds=120)
    with pytest.raises(SettingsError, match="sip_min_se_seconds"):
        load_gateway_settings(sip_min_se_seconds=30)  # RFC 4028's floor is 90 s
