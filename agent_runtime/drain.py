"""Running the worker process, and stopping it without cutting calls.

- **SIGTERM** (Kubernetes, systemd, ``kill``) starts a drain: at once new session requests are refused
  (close 1013, ``the worker is draining``), ``/readyz`` answers 503 ``{"ready": false, "reason":
  "draining"}`` while ``/healthz`` stays 200, and a heartbeat tells the routing store (if any) that the
  worker is draining. Calls in progress go on until they end or until ``drain_seconds`` have passed; then
  the ones left are closed with 1001 ``the worker is shutting down`` and the process exits 0.
- **SIGINT** (Ctrl-C), or a second SIGTERM during a drain, stops at once: sessions are closed with 1001
  and the process exits 0.

uvicorn's own handling would close every WebSocket with 1012 on the first signal; ``WorkerServer`` is
the gateway's ``GracefulServer`` (personagate_common/serving.py), which takes the signals over and lets uvicorn stop
only once the drain or stop below is done, with exit status 0.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from personagate_common.serving import GracefulServer, restarts_before_this_process

from .config import WorkerSettings
from .server import Worker, create_app

log = logging.getLogger(__name__)

CLOSE_WAIT_SECONDS = 5.0  # for sessions told to close to send their close frames


class WorkerServer(GracefulServer):
    """uvicorn's server with the worker's drain (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config, drain=lambda: self.drain(worker.settings.drain_seconds), stop=self.stop_now)
        self.worker = worker

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

    async def stop_now(self) -> None:
        worker = self.worker
        worker.start_draining()
        closed = worker.close_sessions("shutdown")
        await worker.announce()
        if closed or worker.starting:
            await _wait_idle(worker, time.monotonic() + CLOSE_WAIT_SECONDS)
        log.info("stopped: %d session(s) closed", closed)


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
    app.state.worker.metrics.restarts.inc(restarts_before_this_process())
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        ws_max_size=settings.max_voice_bytes * 2,
        ws_ping_interval=10,
        ws_ping_timeout=10,
        timeout_graceful_shutdown=CLOSE_WAIT_SECONDS,
        # With a certificate every connection is TLS: https:// probes and wss:// sessions (personagate_common/plane.py).
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
    )
    server = WorkerServer(config, app.state.worker)
    server.run()
    return 0 if server.started else 1
