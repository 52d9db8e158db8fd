"""`personagate up`, the README's main job: one command brings up a worker and the gateway with the
shipped tenants, makes a local operator token, says how to use them, and stops both on Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port, udp_free_port

REPO = Path(__file__).resolve().parents[1]


def _start_up(tmp_path: Path, slots: int) -> tuple[subprocess.Popen, int, int, int]:
    """`personagate up` with the shipped tenants in ``tmp_path`` on free ports: (process, worker port,
    HTTP port, SIP port). Read its ready message with ``_ready_lines``."""
    shutil.copytree(REPO / "tenants", tmp_path / "tenants")
    worker_port, http_port, sip_port = free_port(), free_port(), udp_free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "up", "--worker-port", str(worker_port), "--http-port", str(http_port),
         "--sip-port", str(sip_port), "--slots", str(slots)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)}, start_new_session=True,  # its own group: see _kill
    )
    return up, worker_port, http_port, sip_port


def _kill(up: subprocess.Popen) -> None:
    """After a failed test: `up` and the worker and gateway it started (killing `up` alone leaves them running)."""
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()


def _ready_lines(up: subprocess.Popen) -> list[str]:
    """What `up` printed up to the end of its ready message."""
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while "Ctrl-C stops everything." not in lines:
        assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
        lines.append(up.stdout.readline().strip())
    return lines


def test_up_serves_a_worker_and_the_admin_api_and_stops_both_on_ctrl_c(tmp_path):
    up, worker_port, http_port, sip_port = _start_up(tmp_path, slots=2)
    try:
        lines = _ready_lines(up)
        token = (tmp_path / ".personagate" / "operator-token").read_text().strip()
        assert any(token in line for line in lines)  # the token is printed for the person who ran it
        assert (tmp_path / ".personagate" / "operator-token").stat().st_mode & 0o077 == 0

        assert httpx.get(f"http://127.0.0.1:{worker_port}/readyz").json()["ready"] is True
        # The gateway routes to the worker it was started with (embedded store, polling /v1/info).
        deadline = time.monotonic() + 10
        while (ready := httpx.get(f"http://127.0.0.1:{http_port}/readyz").json())["workers_alive"] != 1:
            assert time.monotonic() < deadline, ready
            time.sleep(0.2)
        assert ready["ready"] is True and ready["slots_free"] == 2
        tenants = httpx.get(f"http://127.0.0.1:{http_port}/v1/admin/tenants",
                            headers={"Authorization": f"Bearer {token}"}).json()
        assert sorted(t["id"] for t in tenants) == ["harbor-mutual", "northwind-bank"]

        talk = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "session", f"ws://127.0.0.1:{worker_port}/v1/sessions",
             "--persona", "northwind-bank/card-services", "--seconds", "0.5"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )
        assert talk.returncode == 0, talk.stderr
        assert json.loads(talk.stdout)["close"] == [1000, "session ended: client_end"]

        # The printed SIP call works: a real pjsua2 caller through the gateway to the tiny model and back.
        assert any(f"personagate call sip:+14155550186@127.0.0.1:{sip_port}" in line for line in lines)
        dialed = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "call", f"sip:+14155550186@127.0.0.1:{sip_port}", "--seconds", "1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )
        assert dialed.returncode == 0, dialed.stderr[-3000:]
        report = json.loads(dialed.stdout)
        assert report["status"] == 200 and report["seconds_received"] >= 0.9, report
        # harbor-mutual records its calls (after a consent notice): in the state folder, as the message says
        assert any(str(tmp_path / ".personagate" / "recordings") in line for line in lines)
        deadline = time.monotonic() + 10
        while not list((tmp_path / ".personagate" / "recordings" / "harbor-mutual").glob("*/*.flac")):
            assert time.monotonic() < deadline, "no recording of the call to harbor-mutual"
            time.sleep(0.2)

        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        for port in (worker_port, http_port):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                raise AssertionError(f"port {port} still answers after Ctrl-C")
            except httpx.HTTPError:
                pass
    finally:
        _kill(up)


def test_sigterm_on_up_drains_both_and_exits(tmp_path):
    """SIGTERM (systemd, kill) is passed on as a drain: with no calls in progress both processes
    finish at once and `up` exits 0."""
    up, _, _, _ = _start_up(tmp_path, slots=1)
    try:
        _ready_lines(up)
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
    finally:
        _kill(up)
