"""The worker announces itself to the gateways' routing store (``personagate_common.routing``, on Redis).

With ``redis_url`` set, once the model is loaded (not while loading) the worker heartbeats its
``WorkerState`` every ``heartbeat_seconds``: its id, the URL gateways reach its sessions at, its slots,
whether it is draining, the personas it has primed (``persona.persona_key``) and the ids of the sessions
it is serving (the gateways' call ids). Each heartbeat keeps it alive in the store for
``worker_ttl_seconds`` and re-asserts all of it, which is what rebuilds the store after Redis lost its data
(a restart or a failover). A drain sends one at once (``Worker.announce``).

Redis being down never touches calls: a failed heartbeat is logged (once, and once more when Redis is
back) and the next one is tried on schedule. When the process exits, a last heartbeat with an immediate
deadline takes the worker out of the store at once (``farewell``). Without ``redis_url`` nothing here
runs: a single-machine gateway reads ``/v1/info`` instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .config import WorkerSettings

if TYPE_CHECKING:
    from personagate_common.routing import Router, WorkerState

    from .server import Worker

log = logging.getLogger(__name__)

FAREWELL_TTL_SECONDS = 0.001


class Registration:
    """Heartbeats of one worker to the routing store. ``run()`` is the task; ``beat()`` sends one now."""

    def __init__(self, worker: Worker, settings: WorkerSettings, router: Router | None = None) -> None:
        self.worker = worker
        self.settings = settings
        self.worker_id = settings.resolved_worker_id()
        self.url = settings.resolved_advertise_url()
        self._owns_router = router is None
        if router is None:
            from personagate_common.routing import RedisRouter

            assert settings.redis_url is not None
            # Short timeouts: a heartbeat must never take longer than the interval it keeps.
            timeout = min(1.0, settings.heartbeat_seconds)
            router = RedisRouter(
                settings.redis_url, prefix=settings.redis_prefix, worker_ttl=settings.worker_ttl_seconds,
                timeout=timeout, connect_timeout=min(0.5, timeout), max_connections=4,
            )
        self.router = router
        self._registered = False  # the last heartbeat went through
        self._failing = False  # a failure was logged and not yet followed by a success
        self.heartbeats = 0  # successful ones (tests, logs)

    def state(self) -> WorkerState:
        from personagate_common.routing import WorkerState

        pool = self.worker.pool
        assert pool is not None
        return WorkerState(
            worker_id=self.worker_id,
            url=self.url,
            capacity=pool.config.capacity,
            active_calls=tuple(self.worker.active_session_ids),
            draining=self.worker.draining,
            cached_personas=tuple(pool.cached_personas),
        )

    async def farewell(self) -> None:
        """The last heartbeat, as the process exits: draining, no calls, and a lease that ends at once, so
        the store takes the worker for dead now (the reaper removes it) instead of after its TTL."""
        from dataclasses import replace

        if self.worker.pool is None or not self.heartbeats:
            return
        state = replace(self.state(), draining=True, active_calls=())
        try:
            await self.router.heartbeat(state, FAREWELL_TTL_SECONDS)
        except Exception as exc:  # noqa: BLE001 (it expires after its TTL anyway)
            log.info("no farewell heartbeat: %s", exc)
            return
        log.info("left the routing store", extra={"worker_id": self.worker_id})

    async def run(self) -> None:
        """Heartbeat every ``heartbeat_seconds`` until cancelled, from the moment the model is loaded;
        never raises."""
        while self.worker.pool is None:
            if self.worker.load_error is not None:
                return  # nothing to announce: /healthz reports the failure
            await asyncio.sleep(0.1)
        log.info("registering with the routing store", extra={
            "worker_id": self.worker_id, "url": self.url, "store": getattr(self.router, "where", "?"),
            "heartbeat_seconds": self.settings.heartbeat_seconds, "ttl_seconds": self.settings.worker_ttl_seconds})
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            await self.beat()
            due = max(due + self.settings.heartbeat_seconds, loop.time())  # a slow beat does not delay the next
            await asyncio.sleep(due - loop.time())

    async def beat(self) -> bool:
        """One heartbeat; True if the store took it. Failures are logged, never raised."""
        from personagate_common.routing import Refusal

        state = self.state()
        try:
            result = await self.router.heartbeat(state, self.settings.worker_ttl_seconds)
        except Refusal as exc:
            self._failed(exc.detail)
            return False
        except Exception as exc:  # a bug or an unexpected reply: keep the worker serving, say why
            if not self._failing:
                log.exception("heartbeat failed")
            self._failed(f"{type(exc).__name__}: {exc}")
            return False
        self.heartbeats += 1
        if not self._registered:
            log.info("registered with the routing store" if not self._failing else "routing store reachable again; "
                     "registered", extra={"worker_id": self.worker_id, "slots": state.capacity,
                                          "sessions": len(state.active_calls), "draining": result.draining})
        self._registered, self._failing = True, False
        if result.recovered:
            log.info("the routing store had lost calls of this worker; re-asserted them",
                     extra={"calls": list(result.recovered)})
        return True

    def _failed(self, detail: str) -> None:
        if not self._failing:
            log.warning("heartbeat to the routing store failed; calls go on, retrying every %g s",
                        self.settings.heartbeat_seconds, extra={"worker_id": self.worker_id, "error": detail})
        self._registered, self._failing = False, True

    async def close(self) -> None:
        if self._owns_router:
            await self.router.close()
