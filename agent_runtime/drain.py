"""Running the worker process, and stopping it without cutting calls.

- **SIGTERM** (Kubernetes, systemd, ``kill``) starts a drain: at once new session requests are refused
  (close 1013, ``the worker is draining``), ``/readyz`` answers 503 ``{"ready": false, "reason":
  "draining"}`` while ``/healthz`` stays 200, and a heartbeat tells the routing store (if any) that the
  worker is draining. Calls in progress go on until they end or until ``drain_seconds`` have passed; then
  the ones left are closed with 1001 ``the worker is shutting down`` and the process exits 0.
- **SIGINT** (Ctrl-C), or a second SIGTERM during a drain, stops at once: sessions are closed with 1001
  and the process exits 0.

uvicorn's own handling would close every WebSocket with 1012 on the first signal, so ``WorkerServer``
takes the signals over (``handle_exit``, which uvicorn installs for SIGINT and SIGTERM) and sets
uvicorn's ``should_exit`` only once the sessions are gone. The signals are not re-raised afterwards (as
uvicorn would do): the exit status stays 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

from .config import WorkerSettings
from .server import Worker, create_app

log = logging.getLogger(__name__)

CLOSE_WAIT_SECONDS = 5.0  # for sessions told to close to send their close frames


class WorkerServer(uvicorn.Server):
    """uvicorn's server with the worker's signal handling (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self.worker = worker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's signal handler (main thread, between two bytecodes): hand the signal to the loop."""
        if self._loop is None or self._loop.is_closed():
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if sig == signal.SIGTERM and self._drain is None and self._stopping is None:
            self._drain = asyncio.create_task(self.drain(self.worker.settings.drain_seconds), name="drain")
            return
        if self._stopping is None:
            log.warning("%s: stopping at once", name, extra={"sessions": self.worker.busy})
            if self._drain is not None:
                self._drain.cancel()
            self._stopping = asyncio.create_task(self.stop_now(), name="stop")

    async def drain(self, deadline_seconds: float) -> None:
        """Refuse new sessions, wait up to ``deadline_seconds`` for those in progress to end, close the
        rest with 1001, then let uvicorn shut down."""
        worker = self.worker
        worker.start_draining()
        started = time.monotonic()
        log.info("drain started: new sessions are refused; waiting up to %g s for %d session(s) to end",
                 deadline_seconds, worker.busy,
                 extra={"sessions": worker.active_session_ids, "starting": worker.starting,
                        "deadline_seconds": deadline_seconds})
        await worker.announce()  # a heartbeat now, not at the next interval: no new claims come here
        if await _wait_idle(worker, started + deadline_seconds):
            log.info("drain finished: no sessions left", extra={"seconds": round(time.monotonic() - started, 2)})
        else:
            stragglers = worker.active_session_ids
            log.warning("drain deadline passed: closing %d session(s) with 1001", worker.busy,
                        extra={"sessions": stragglers, "starting": worker.starting})
            worker.close_sessions("shutdown")
            await _wait_idle(worker, time.monotonic() + CLOSE_WAIT_SECONDS)
            log.info("drain finished: stragglers closed", extra={
                "sessions": stragglers, "seconds": round(time.monotonic() - started, 2)})
        self.should_exit = True

    async def stop_now(self) -> None:
        worker = self.worker
        worker.start_draining()
        closed = worker.close_sessions("shutdown")
        await worker.announce()
        if closed or worker.starting:
            await _wait_idle(worker, time.monotonic() + CLOSE_WAIT_SECONDS)
        log.info("stopped: %d session(s) closed", closed)
        self.should_exit = True


async def _wait_idle(worker: Worker, deadline: float) -> bool:
    """Until no session is in progress or starting (True), or ``deadline`` (monotonic) passes (False)."""
    changed = worker.changed()
    while worker.busy:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        changed.clear()
        try:
            async with asyncio.timeout(left):
                await changed.wait()
        except TimeoutError:
            return worker.busy == 0
    return True


def serve(settings: WorkerSettings) -> int:
    """Run the worker until it is stopped (see the module docstring); the exit status."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        ws_max_size=settings.max_voice_bytes * 2,
        ws_ping_interval=10,
        ws_ping_timeout=10,
        timeout_graceful_shutdown=CLOSE_WAIT_SECONDS,
    )
    server = WorkerServer(config, app.state.worker)
    server.run()
    return 0 if server.started else 1
