"""Running an ASGI app under uvicorn with a drain on SIGTERM instead of uvicorn's immediate shutdown.

uvicorn's own handling closes every connection on the first SIGTERM. ``GracefulServer`` takes the signals
over (``handle_exit``, which uvicorn installs for SIGINT and SIGTERM) and tells uvicorn to stop only once
the app has had its say:

- the first **SIGTERM** runs ``drain()`` (refuse new work, let what is in progress finish up to a deadline,
  end the rest), then stops uvicorn;
- **SIGINT** (Ctrl-C), or a second SIGTERM during a drain, cancels the drain and runs ``stop()`` (end
  everything now), then stops uvicorn.

The signals are not re-raised afterwards (uvicorn would): the exit status stays 0. The gateway
(``personagate gateway``) uses it, and the worker's ``WorkerServer`` (``agent_runtime/drain.py``) builds on it.

``restarts_before_this_process()`` reads what ``personagate up`` (gateway/up.py) tells a process it restarts:
both processes export it as their ``…_restarts_total`` counter.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

# Set by ``personagate up`` on each process it starts: how many times it has restarted that component before.
RESTARTS_ENV = "PERSONAGATE_RESTARTS"


def restarts_before_this_process() -> int:
    """How many times ``personagate up`` restarted this component (worker or gateway) after a crash before it
    started this process, from ``PERSONAGATE_RESTARTS``: 0 when run on its own, or when the value is not a count."""
    try:
        return max(int(os.environ.get(RESTARTS_ENV, "0")), 0)
    except ValueError:
        return 0


class GracefulServer(uvicorn.Server):
    """uvicorn's server with SIGTERM → ``drain()`` and SIGINT / a second SIGTERM → ``stop()``."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain: Callable[[], Awaitable[object]],
        stop: Callable[[], Awaitable[object]],
    ) -> None:
        super().__init__(config)
        self._drain_fn = drain
        self._stop_fn = stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining: asyncio.Task[None] | None = None
        self.stopping: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's signal handler (main thread, between two bytecodes): hand the signal to the loop."""
        if self._loop is None or self._loop.is_closed():
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self.on_signal, sig)

    def on_signal(self, sig: int) -> None:
        """What a signal does (event loop thread); tests call it to stand in for the signal."""
        name = signal.Signals(sig).name
        if sig == signal.SIGTERM and self.draining is None and self.stopping is None:
            log.info("%s: draining", name)
            self.draining = asyncio.create_task(self._then_exit(self._drain_fn), name="drain")
            return
        if self.stopping is None:
            log.warning("%s: stopping at once", name)
            if self.draining is not None:
                self.draining.cancel()
            self.stopping = asyncio.create_task(self._then_exit(self._stop_fn), name="stop")

    async def _then_exit(self, step: Callable[[], Awaitable[object]]) -> None:
        try:
            await step()
        except asyncio.CancelledError:
            raise  # a drain cut short by a second signal: stop() takes over and exits
        except Exception:
            log.exception("shutting down failed; exiting anyway")
        self.should_exit = True


class _NoSignals(uvicorn.Server):
    """A uvicorn server that leaves the signals to the process's main server."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class SecondListener:
    """Another address/port served from the same process and event loop as the main server, e.g. the gateway's
    admin API on its own port: started and stopped by the main app's lifespan, its signals left to the main
    server. The port is bound in ``start()``, so a port in use fails the start (OSError) instead of exiting."""

    def __init__(self, app: Any, name: str, host: str, port: int, *, cert_file: Path | None = None,
                 key_file: Path | None = None, forwarded_allow_ips: list[str] | None = None) -> None:
        """``forwarded_allow_ips``: the peers whose X-Forwarded-For is believed (addresses or CIDRs), as the main
        server's; None: uvicorn's default (its FORWARDED_ALLOW_IPS variable, else 127.0.0.1)."""
        self.name = name
        self.host = host
        self.port = port
        self._config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off",
                                      ssl_certfile=cert_file, ssl_keyfile=key_file,
                                      forwarded_allow_ips=forwarded_allow_ips)
        self._server = _NoSignals(self._config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(self._config.backlog)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"the {self.name} cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        scheme = "https" if self._config.ssl_certfile else "http"
        log.info("%s listening on %s://%s:%d", self.name, scheme, self.host, self.port)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=self.name)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
