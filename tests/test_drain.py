"""Stopping a worker without cutting calls: SIGTERM drains, SIGINT (or a second SIGTERM) stops at once; a worker
whose model cannot load exits with status 3 instead of staying up unready.

Each test runs its own `personagate worker` process (tiny model, greedy) on loopback, since it stops it.
Timing bounds are loose (a loaded 2-core machine), except the one the feature is about: a call in
progress keeps receiving agent audio without a gap of more than 0.5 s while its worker drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent_runtime.drain import MODEL_LOAD_FAILED_EXIT
from tests.helpers.processes import free_port, stop_process
from tests.helpers.wait import scaled, until_async
from tests.helpers.worker import WORKER_AUTH_HEADERS, TalkingSession, exit_status, own_worker

pytestmark = pytest.mark.e2e  # every test drains a worker process of its own

FRAME_BYTES = 3840
DRAINING = (1013, "the worker is draining")
SHUTTING_DOWN = (1001, "the worker is shutting down")

async def _refusal(base: str) -> tuple[int | None, str | None]:
    """Ask for a new session; the close code and reason the worker answers with."""
    ws = await connect(f"ws://{base}/v1/sessions", open_timeout=10, additional_headers=WORKER_AUTH_HEADERS)
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps({"type": "start", "persona": {"prompt": "x", "voice": "tiny-low"}}))
        message = await asyncio.wait_for(ws.recv(), 10)
        pytest.fail(f"a draining worker started a session: {message!r}")
    return ws.close_code, ws.close_reason


async def test_sigterm_drains_calls_in_progress_and_refuses_new_ones():
    """SIGTERM: readiness fails at once (liveness stays), a new session is refused with 1013 so the gateway
    tries another worker, the call in progress keeps its audio, and when it ends the process exits 0."""
    with own_worker() as (base, proc):
        async with httpx.AsyncClient(base_url=f"http://{base}", timeout=5, headers=WORKER_AUTH_HEADERS) as http:
            call = await TalkingSession.start(base, "call-drain-1")
            await asyncio.sleep(1.0)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)

            async def draining() -> httpx.Response | None:
                response = await http.get("/readyz")
                return response if response.status_code == 503 else None

            ready = await until_async(draining, "/readyz answers 503", timeout=2.0)
            assert ready.json() == {"ready": False, "reason": "draining"}
            health = await http.get("/healthz")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            info = (await http.get("/v1/info")).json()
            assert info["draining"] is True and info["ready"] is False
            assert info["active_sessions"] == ["call-drain-1"]
            assert "personagate_worker_draining 1.0" in (await http.get("/metrics")).text
            assert await _refusal(base) == DRAINING

            await asyncio.sleep(3.0)
            assert proc.poll() is None, "the worker exited with a call in progress"
            gap = call.largest_gap(since=signalled)
            assert gap < 0.5, f"the call went {gap:.2f} s without agent audio while the worker drained"
            assert len([t for t in call.arrivals if t > signalled]) >= 30

            assert await call.end() == (1000, "session ended: client_end")
            ended = time.monotonic()
            assert await exit_status(proc, 10.0) == 0
            assert time.monotonic() - ended < 5.0


async def test_a_call_still_running_at_the_drain_deadline_is_closed_with_1001():
    """With ``drain_seconds`` 2, a call that does not end is closed with 1001 after about 2 s and the
    process exits 0."""
    with own_worker(drain_seconds="2") as (base, proc):
        call = await TalkingSession.start(base, "call-straggler")
        await asyncio.sleep(0.5)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await call.closed(within=15) == SHUTTING_DOWN
        closed_after = time.monotonic() - signalled
        assert 1.5 < closed_after < 8, closed_after
        assert call.largest_gap(since=signalled) < 2.5  # audio flowed until the deadline
        assert len([t for t in call.arrivals if t > signalled]) >= 10
        assert await exit_status(proc, 10.0) == 0


async def test_a_second_sigterm_stops_at_once():
    """During a drain, a second SIGTERM closes the calls with 1001 and exits 0 at once."""
    with own_worker() as (base, proc):
        call = await TalkingSession.start(base, "call-hurried")
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert proc.poll() is None and not call.ws.close_code
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await call.closed(within=10) == SHUTTING_DOWN
        assert await exit_status(proc, 10.0) == 0
        assert time.monotonic() - stopped < 6


async def test_sigint_stops_at_once_without_a_drain():
    """Ctrl-C is "stop now": no drain, the call is closed with 1001 and the process exits 0."""
    with own_worker() as (base, proc):
        call = await TalkingSession.start(base, "call-ctrl-c")
        proc.send_signal(signal.SIGINT)
        assert await call.closed(within=10) == SHUTTING_DOWN
        assert await exit_status(proc, 10.0) == 0



# ------------------------------------------------------------------------------------ a model that cannot load


@pytest.mark.parametrize("weights", ["missing-folder", "empty-folder"])
def test_a_worker_whose_model_cannot_load_exits_3_naming_the_reason(tmp_path, weights):
    """A wrong weights path or a folder without the checkpoint: the worker logs why and exits with status 3 within
    seconds, instead of staying up unready (Kubernetes then restarts it and shows CrashLoopBackOff with the reason,
    where an unready pod sat out a 15-minute startup probe)."""
    folder = tmp_path / "personaplex-7b-v1"
    if weights == "empty-folder":
        folder.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "personagate", "worker", "--model", "personaplex", "--weights", str(folder),
               "--device", "cpu", "--port", str(port)]
    log_file = tmp_path / "worker.log"
    with log_file.open("wb") as log:
        proc = subprocess.Popen(command, env=os.environ | {"NO_TORCH_COMPILE": "1"}, stdout=subprocess.DEVNULL,
                                stderr=log)
        try:
            status = proc.wait(scaled(90))  # importing torch and moshi on a busy machine; the failure is immediate
        except subprocess.TimeoutExpired:
            stop_process(proc)
            pytest.fail(f"the worker is still running with a model that cannot load: {log_file.read_text()[-3000:]}")
    text = log_file.read_text()
    assert status == MODEL_LOAD_FAILED_EXIT == 3, text[-3000:]
    # CheckpointError's own words (agent_runtime/model/personaplex.py): the path and what is wrong with it
    reason = re.compile(re.escape(str(folder)) + (": not a folder" if weights == "missing-folder" else "/[^:]+: missing"))
    lines = text.splitlines()
    assert any("model load failed" in line and reason.search(line) for line in lines), text[-3000:]
    assert any("exiting with status 3" in line and reason.search(line) for line in lines), text[-3000:]
