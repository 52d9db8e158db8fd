"""Running the worker process, and stopping it without cutting calls.

- **SIGTERM** (Kubernetes, systemd, ``kill``) starts a drain: at once new session requests are refused
  (close 1013, ``the worker is draining``), ``/readyz`` answers 503 ``{"ready": false, "reason":
  "draining"}`` while ``/healthz`` stays 200, and a heartbeat tells the routing store (if any) that the
  worker is draining. Calls in progress go on until they end or until ``drain_seconds`` have passed; then
  the ones left are closed with 1001 ``the worker is shutting down`` and the process exits 0.
- **SIGINT** (Ctrl-C), or a second SIGTERM during a drain, stops at once: sessions are closed with 1001
  and the process exits 0.
- **The model fails to load** (a wrong weights path, a missing or damaged checkpoint, a device that cannot hold
  it): the reason is logged (``model load failed: …``, then ``exiting with status 3``) and the process exits
  with ``MODEL_LOAD_FAILED_EXIT`` (3) at once, instead of staying up unready: Kubernetes restarts it and shows
  CrashLoopBackOff with the reason in the container's log; ``personagate up`` does not restart it (it was never
  ready: a configuration error). Exit 2 stays "settings refused", 1 "the server could not start".

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
# The exit status of a worker whose model could not be loaded: distinct from 1 (the server could not start) and
# 2 (settings refused), so that an operator, a supervisor or a test can tell the cause without reading the log.
MODEL_LOAD_FAILED_EXIT = 3


class WorkerServer(GracefulServer):
    """uvicorn's server with the worker's drain (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config, drain=lambda: self.drain(worker.settings.drain_seconds), stop=self.stop_now)
        self.worker = worker
        self.load_failed: str | None = None  # why the model could not be loaded: the process exits non-zero
        worker.on_load_failed = self.model_load_failed

    def model_load_failed(self, reason: str) -> None:
        """The model could not be loaded (event loop thread): stop serving and exit with MODEL_LOAD_FAILED_EXIT.
        No session can be in progress (none starts before the model is loaded), so there is nothing to drain."""
        self.load_failed = reason
        log.error("exiting with status %d: the model could not be loaded (%s)", MODEL_LOAD_FAILED_EXIT, reason,
                  extra={"exit_status": MODEL_LOAD_FAILED_EXIT})
        self.should_exit = True

    @property
    def exit_status(self) -> int:
        """What the process exits with once ``run()`` returns: 3 for a model that could not be loaded, 1 if the
        server never started (its port taken, say), else 0 (stopped by a signal, drained)."""
        if self.load_failed is not None:
            return MODEL_LOAD_FAILED_EXIT
        return 0 if self.started else 1

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
    return server.exit_status
