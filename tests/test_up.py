"""`personagate up`, the README's main job: one command brings up a worker and the gateway with the
shipped tenants, makes a local operator token, says how to use them, restarts either one when it crashes
(the other keeps running), and stops both on Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.up import HEALTHY_SECONDS, Component, describe_exit, restart_delay, stopped_on_purpose
from personagate_common.plane import bearer
from tests.helpers.processes import free_port, udp_free_port
from tests.helpers.wait import until
from tests.helpers.worker import WORKER_AUTH_HEADERS

REPO = Path(__file__).resolve().parents[1]
RESTART_WITHIN = 120.0  # seconds for `up` to restart a process it supervises (a cold worker start)


def _start_up(tmp_path: Path, slots: int, *, env: dict[str, str] | None = None,
              ports: tuple[int, int, int] | None = None) -> tuple[subprocess.Popen, int, int, int]:
    """`personagate up` with the shipped tenants in ``tmp_path`` on free ports (or ``ports``): (process, worker
    port, HTTP port, SIP port). Read its ready message with ``_ready_lines``, and its log (its stderr and its
    children's) with ``_log``."""
    shutil.copytree(REPO / "tenants", tmp_path / "tenants")
    worker_port, http_port, sip_port = ports or (free_port(), free_port(), udp_free_port())
    # The log is a file, not a pipe: an unread pipe would block them once full.
    with (tmp_path / "up.log").open("wb") as log, _no_core_files():
        up = subprocess.Popen(
            [sys.executable, "-m", "personagate", "up", "--worker-port", str(worker_port), "--http-port",
             str(http_port), "--sip-port", str(sip_port), "--slots", str(slots)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=log, text=True,
            env=os.environ | {"PYTHONPATH": str(REPO)} | (env or {}),
            start_new_session=True,  # its own group: see _kill
        )
    return up, worker_port, http_port, sip_port


@contextlib.contextmanager
def _no_core_files() -> Iterator[None]:
    """Processes started meanwhile (and theirs) write no core file when a test crashes them: a worker's would
    be hundreds of megabytes. The limit is inherited at fork, so setting it around the start is enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


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


def _log(tmp_path: Path) -> str:
    """What `up`, the worker and the gateway have written to stderr so far."""
    return (tmp_path / "up.log").read_text(errors="replace")


def _crashes(tmp_path: Path) -> list[str]:
    """The crashes `up` has reported so far, one line each."""
    return [line for line in _log(tmp_path).splitlines() if line.startswith("personagate up: ") and " crashed " in line]


def _children(up: subprocess.Popen) -> dict[str, int]:
    """The PIDs of the processes `up` runs now, by component (``worker``, ``gateway``): its child processes,
    known by their command line (``python -m personagate worker|gateway …``)."""
    children: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == up.pid and argv[1:3] == [b"-m", b"personagate"] and len(argv) > 3:
            children[argv[3].decode()] = int(stat.parent.name)
    return children


def _metric(port: int, name: str) -> float:
    """The value of an unlabelled metric on the ``/metrics`` of the server on ``port``."""
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on :{port}/metrics")


def _call(tmp_path: Path, sip_port: int) -> dict:
    """A one-second SIP call to harbor-mutual through the gateway (a real pjsua2 caller): its report."""
    dialed = subprocess.run(
        [sys.executable, "-m", "personagate", "call", f"sip:+14155550186@127.0.0.1:{sip_port}", "--seconds", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    assert dialed.returncode == 0, dialed.stderr[-3000:]
    return json.loads(dialed.stdout)


@pytest.mark.e2e  # starts a process
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

        # The worker serves only the gateway: up made a shared secret of their own (0600), not one it inherited.
        secret_file = tmp_path / ".personagate" / "worker-secret"
        assert secret_file.stat().st_mode & 0o077 == 0
        info = f"http://127.0.0.1:{worker_port}/v1/info"
        assert httpx.get(info).status_code == 401
        assert httpx.get(info, headers=WORKER_AUTH_HEADERS).status_code == 401  # the tests' secret, in up's env
        assert httpx.get(info, headers=bearer(secret_file.read_text().strip())).status_code == 200
        # The README's command, with nothing set up: personagate session finds up's secret by itself.
        talk = subprocess.run(
            [sys.executable, "-m", "personagate", "session", f"ws://127.0.0.1:{worker_port}/v1/sessions",
             "--persona", "northwind-bank/card-services", "--seconds", "0.5"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("PERSONAGATE_GATEWAY_WORKER_SECRET")},
        )
        assert talk.returncode == 0, talk.stderr
        assert json.loads(talk.stdout)["close"] == [1000, "session ended: client_end"]

        # The printed SIP call works: a real pjsua2 caller through the gateway to the tiny model and back.
        assert any(f"personagate call sip:+14155550186@127.0.0.1:{sip_port}" in line for line in lines)
        report = _call(tmp_path, sip_port)
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


@pytest.mark.e2e  # starts a process
def test_sigterm_on_up_drains_both_and_exits(tmp_path):
    """SIGTERM (systemd, kill) is passed on as a drain: with no calls in progress both processes
    finish at once and `up` exits 0."""
    up, _, _, _ = _start_up(tmp_path, slots=1)
    try:
        _ready_lines(up)
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        assert _crashes(tmp_path) == []  # the children's exits during the drain are no crashes
    finally:
        _kill(up)


@pytest.mark.e2e  # starts a process
def test_a_crashed_gateway_is_restarted_while_the_worker_keeps_running(tmp_path):
    up, worker_port, http_port, sip_port = _start_up(tmp_path, slots=1)
    try:
        _ready_lines(up)
        before = _children(up)
        assert set(before) == {"worker", "gateway"}, before
        os.kill(before["gateway"], signal.SIGSEGV)

        until(lambda: "personagate up: the gateway is back (restart 1)" in _log(tmp_path), "the gateway back",
              timeout=RESTART_WITHIN)
        after = _children(up)
        assert after["worker"] == before["worker"]  # the worker, its model and primed personas, stayed
        assert after["gateway"] != before["gateway"]
        crash = ("personagate up: the gateway crashed (killed by SIGSEGV); restarting it in 1 s "
                 "(restart 1 since up started)")
        assert _crashes(tmp_path) == [crash]
        assert _metric(http_port, "personagate_gateway_restarts_total") == 1
        assert _metric(worker_port, "personagate_worker_restarts_total") == 0

        # The restarted gateway takes calls, to the worker that kept running.
        report = _call(tmp_path, sip_port)
        assert report["status"] == 200 and report["seconds_received"] >= 0.9, report
        assert _children(up) == after

        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        assert "personagate is up." not in up.stdout.read()  # said once, in full; the return is one line
    finally:
        _kill(up)


@pytest.mark.e2e  # starts a process
def test_a_crashed_worker_is_restarted_while_the_gateway_keeps_running(tmp_path):
    up, worker_port, http_port, sip_port = _start_up(tmp_path, slots=1)
    try:
        _ready_lines(up)
        before = _children(up)
        os.kill(before["worker"], signal.SIGKILL)

        until(lambda: "personagate up: the worker is back (restart 1)" in _log(tmp_path), "the worker back",
              timeout=RESTART_WITHIN)
        after = _children(up)
        assert after["gateway"] == before["gateway"]
        assert after["worker"] != before["worker"]
        crash = ("personagate up: the worker crashed (killed by SIGKILL); restarting it in 1 s "
                 "(restart 1 since up started)")
        assert _crashes(tmp_path) == [crash]
        assert _metric(worker_port, "personagate_worker_restarts_total") == 1
        assert _metric(http_port, "personagate_gateway_restarts_total") == 0

        # "Back" means the stack takes calls again: the gateway that kept running sees the new worker.
        assert httpx.get(f"http://127.0.0.1:{http_port}/readyz").json()["workers_alive"] == 1
        report = _call(tmp_path, sip_port)
        assert report["status"] == 200 and report["seconds_received"] >= 0.9, report

        up.send_signal(signal.SIGTERM)  # a drain: the restarted worker drains too
        assert up.wait(60) == 0
        assert "personagate is up." not in up.stdout.read()
    finally:
        _kill(up)


@pytest.mark.e2e  # starts a process
@pytest.mark.parametrize("failure", ["invalid gateway setting", "worker port in use"])
def test_a_component_that_fails_at_start_stops_up_with_its_error(tmp_path, failure):
    """Restarting a misconfiguration would only fail again: `up` stops, exit status 1, and says why."""
    ports = (free_port(), free_port(), udp_free_port())
    with socket.socket() as taken:
        env = None
        if failure == "invalid gateway setting":
            env, name, error = {"PERSONAGATE_GATEWAY_HISTORY_VERSIONS": "0"}, "gateway", "history_versions"
        else:
            taken.bind(("127.0.0.1", ports[0]))
            taken.listen()
            name, error = "worker", "address already in use"
        up, _, http_port, _ = _start_up(tmp_path, slots=1, env=env, ports=ports)
        try:
            assert up.wait(120) == 1
        finally:
            _kill(up)
    log = _log(tmp_path)
    assert error in log
    # The worker whose port is taken exits 1, or is killed by SIGABRT when its model was still loading.
    assert f"personagate up: the {name} exited (" in log
    assert "before it was ever ready: not restarted" in log
    assert _crashes(tmp_path) == [] and "personagate is up." not in up.stdout.read()
    with pytest.raises(httpx.HTTPError):  # the rest was stopped
        httpx.get(f"http://127.0.0.1:{http_port if name == 'worker' else ports[0]}/healthz", timeout=1)


def test_restart_delays_double_up_to_a_cap_and_start_again_after_a_healthy_run():
    assert [restart_delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert restart_delay(10_000) == 30
    gateway = Component("gateway", ("true",), {}, "http://127.0.0.1:1/readyz")
    # Crashes soon after each restart (or before it was ready again) back off; a long healthy run resets that.
    assert [gateway.crashed(100.0, 110.0), gateway.crashed(None, 112.0), gateway.crashed(113.0, 120.0)] == [1, 2, 4]
    assert gateway.crashed(125.0, 125.0 + HEALTHY_SECONDS) == 1
    assert gateway.crashed(190.0, 191.0) == 2
    assert gateway.restarts == 5


def test_exits_read_as_people_say_them_and_clean_stops_are_no_crashes():
    assert describe_exit(1) == "exit 1"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(-signal.SIGABRT) == "killed by SIGABRT"
    assert [stopped_on_purpose(rc) for rc in (0, -signal.SIGINT, -signal.SIGTERM)] == [True] * 3
    assert [stopped_on_purpose(rc) for rc in (1, 2, -signal.SIGKILL, -signal.SIGSEGV)] == [False] * 4
