"""The routing interface: which GPU worker serves a call, with slots and tenant limits never over-committed.

Two stores implement it with the same semantics: ``RedisRouter`` (``redis_store.py``, several gateways and
workers sharing one Redis) and ``EmbeddedRouter`` (``embedded.py``, in-process dicts: one machine, no Redis).

Who calls what:

- a **worker** calls ``heartbeat(state)`` every ``ttl/3`` or so: its URL, capacity, draining flag, the
  personas it has primed and the call ids it is serving. The heartbeat is idempotent and re-asserts
  everything, which is what rebuilds the store after Redis lost its data (restart, failover).
- a **gateway** calls ``claim()`` when a call arrives, ``release()`` when it ends, ``renew(claims)`` for
  all its live calls every ``lease/3`` or so (which keeps their leases and, after Redis lost its data,
  re-asserts call → worker and call → tenant), ``rehome()`` when a worker's socket drops mid-call, and
  ``reap()`` + ``workers()`` every second or so (any gateway may reap; it is idempotent).

A slot is reserved at claim time, before the gateway connects to the worker: reservations, not load
readings, are what capacity is counted against: a worker reports its load about once a second, so a burst of
calls counted against that reading would over-commit it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Self

from .metrics import RoutingMetrics

# The store's refusals, and the gateway's own "draining" (it is stopping: gateway/calls.py).
RefusalReason = Literal["no_capacity", "tenant_limit", "unavailable", "draining"]


@dataclass(frozen=True)
class WorkerState:
    """What a worker announces on each heartbeat."""

    worker_id: str
    url: str  # ws URL of its /v1/sessions
    capacity: int  # session slots
    active_calls: tuple[str, ...] = ()  # call ids it is serving now
    draining: bool = False
    cached_personas: tuple[str, ...] = ()  # persona keys it has primed (instant start)


@dataclass(frozen=True)
class Claim:
    """A slot reserved for a call on a worker. Keep it for the call's life: ``renew()`` takes it back."""

    call_id: str
    worker_id: str
    url: str
    tenant: str
    persona_cached: bool  # the worker had the persona primed when it was picked
    reused: bool  # a retried claim that found the call already placed on this worker


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker as the store sees it (metrics, admin)."""

    worker_id: str
    url: str
    capacity: int
    reserved: int  # calls placed on it
    free: int  # capacity - reserved, at least 0 (takes claims only if alive and not draining)
    draining: bool
    alive: bool  # its heartbeat deadline is in the future
    cached_personas: int


@dataclass(frozen=True)
class HeartbeatResult:
    reserved: int  # calls counted against the worker after this heartbeat
    free: int  # capacity - reserved (may be negative after a restart recovered more calls than fit)
    draining: bool  # draining, by its own flag or by drain()
    recovered: tuple[str, ...]  # reported call ids the store did not know (Redis lost its data)


@dataclass(frozen=True)
class ReapResult:
    dead_workers: tuple[str, ...] = ()  # heartbeat deadline passed: removed with their reservations
    orphaned_calls: tuple[str, ...] = ()  # calls placed on those workers (still counted for their tenant)
    expired_calls: tuple[str, ...] = ()  # call leases past deadline (the gateway stopped renewing): released


class Refusal(Exception):
    """A claim (or any call, for ``unavailable``) that cannot be served now.

    Front ends map ``no_capacity`` to SIP 503 with Retry-After (HTTP 503), ``tenant_limit`` to SIP 486 or
    480 (HTTP 429), ``unavailable`` (the routing store cannot be reached) to SIP 503 (HTTP 503), and
    ``draining`` (the gateway itself is stopping; ``Calls.start`` only) to SIP 503 (HTTP 503).
    """

    def __init__(self, reason: RefusalReason, detail: str, retry_after_seconds: float = 5.0) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RefusalReason = reason
        self.detail = detail
        self.retry_after_seconds = retry_after_seconds


def check_id(kind: str, value: str) -> str:
    """Ids are joined with NUL in the store's indexes: refuse empty ones and control characters."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string, got {value!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"{kind} must not contain control characters: {value!r}")
    return value


class Router(ABC):
    """The routing interface. Public methods validate, time and count; stores implement the ``_`` methods.

    Every method may raise ``Refusal("unavailable")`` when the store cannot be reached.
    """

    def __init__(
        self,
        *,
        lease_seconds: float,
        worker_ttl: float,
        retry_after_seconds: float,
        metrics: RoutingMetrics | None,
    ) -> None:
        if lease_seconds <= 0 or worker_ttl <= 0:
            raise ValueError("lease_seconds and worker_ttl must be positive")
        self.lease_seconds = lease_seconds
        self.worker_ttl = worker_ttl
        self.retry_after_seconds = retry_after_seconds
        self.metrics = metrics

    # -- workers ---------------------------------------------------------------------------------

    async def heartbeat(self, state: WorkerState, ttl_seconds: float | None = None) -> HeartbeatResult:
        """Announce or refresh a worker; it is live until ``ttl_seconds`` (default ``worker_ttl``) from now.

        Re-asserts everything: capacity, URL, draining (a drain is sticky until the worker is reaped),
        cached personas (replaced), and the active call ids (ones the store does not know become
        reservations on this worker again, with a fresh lease; their tenant comes back with the gateway's
        next ``renew``). Calls released in the last ``lease_seconds`` are not resurrected.
        """
        check_id("worker_id", state.worker_id)
        if not isinstance(state.capacity, int) or state.capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {state.capacity!r}")
        for call_id in state.active_calls:
            check_id("call_id", call_id)
        for key in state.cached_personas:
            check_id("persona_key", key)
        ttl = self.worker_ttl if ttl_seconds is None else ttl_seconds
        if ttl <= 0:
            raise ValueError("ttl_seconds must be positive")
        return await self._heartbeat(state, ttl)

    async def drain(self, worker_id: str) -> bool:
        """Stop new claims to a worker at once (its calls carry on). False if the worker is unknown."""
        return await self._drain(check_id("worker_id", worker_id))

    async def workers(self) -> list[WorkerSnapshot]:
        """Every known worker (dead ones until reaped), sorted by id; updates the worker gauges."""
        snapshots = sorted(await self._workers(), key=lambda w: w.worker_id)
        if self.metrics is not None:
            self.metrics.observe_workers(snapshots)
        return snapshots

    async def reap(self) -> ReapResult:
        """Remove workers past their heartbeat deadline and release calls past their lease deadline."""
        result = await self._reap()
        if self.metrics is not None and result.dead_workers:
            self.metrics.workers_reaped.inc(len(result.dead_workers))
        return result

    # -- calls -----------------------------------------------------------------------------------

    async def claim(
        self,
        call_id: str,
        tenant: str,
        tenant_limit: int | None,
        persona_key: str | None = None,
        exclude_workers: Iterable[str] = (),
    ) -> Claim:
        """Reserve a slot for a call, counting it against its tenant's concurrent-call limit, in one step.

        Picks a live, non-draining worker with a free slot, preferring one that has ``persona_key``
        primed, then the one with the most free slots. Idempotent: a retried claim for a call already
        placed returns the same worker (``reused``) without a second slot or tenant count. A retry that
        excludes the call's worker (it refused the session) or whose worker is dead moves the call to
        another worker, its tenant count unchanged. ``tenant_limit=None``: no limit.

        Raises ``Refusal`` (``no_capacity``, ``tenant_limit`` or ``unavailable``).
        """
        check_id("call_id", call_id)
        check_id("tenant", tenant)
        if persona_key is not None:
            check_id("persona_key", persona_key)
        excluded = tuple(check_id("worker_id", w) for w in exclude_workers)
        if tenant_limit is not None and tenant_limit < 0:
            raise ValueError("tenant_limit must be >= 0 or None")
        started = time.perf_counter()
        result = "unavailable"
        try:
            claim = await self._claim(call_id, tenant, tenant_limit, persona_key, excluded)
            result = "reused" if claim.reused else "claimed"
            return claim
        except Refusal as refusal:
            result = refusal.reason
            raise
        finally:
            if self.metrics is not None:
                self.metrics.claim_seconds.observe(time.perf_counter() - started)
                self.metrics.claims.labels(result=result).inc()

    async def renew(self, claims: Iterable[Claim]) -> tuple[str, ...]:
        """Extend the leases of a gateway's live calls (call this every ``lease_seconds/3`` or so).

        A call the store does not know (Redis lost its data, or the reaper released it after the gateway
        fell behind) is re-asserted on the claim's worker with its tenant; a call known without a tenant
        (recovered from a worker's heartbeat) gets it back. Returns the ids of calls the store has on a
        different worker than the claim says (left as the store has them).
        """
        batch = list(claims)
        for c in batch:
            check_id("call_id", c.call_id)
            check_id("tenant", c.tenant)
            check_id("worker_id", c.worker_id)
        if not batch:
            return ()
        return await self._renew(batch)

    async def release(self, call_id: str) -> bool:
        """The call ended: free its slot and its tenant count. Idempotent; False if it was not placed."""
        return await self._release(check_id("call_id", call_id))

    async def rehome(
        self, call_id: str, dead_worker_id: str, persona_key: str | None = None, *, tenant: str | None = None,
    ) -> Claim:
        """Move a call off a worker that dropped it to another one, in one step; the tenant count unchanged.

        The dead worker leaves the routing index until its next heartbeat (a real death is confirmed by
        the reaper). If the call was already moved elsewhere (a retry), that placement is returned
        (``reused``). ``tenant`` (the call's) is recorded only if the store lost it (Redis restarted).
        Raises ``Refusal("no_capacity")`` when no other worker has a free slot (the call stays counted:
        release it when the front end gives up).
        """
        check_id("call_id", call_id)
        check_id("worker_id", dead_worker_id)
        if persona_key is not None:
            check_id("persona_key", persona_key)
        if tenant is not None:
            check_id("tenant", tenant)
        claim = await self._rehome(call_id, dead_worker_id, persona_key, tenant)
        if self.metrics is not None and not claim.reused:
            self.metrics.calls_rehomed.inc()
        return claim

    async def close(self) -> None:
        """Release the store's resources (a no-op for the embedded store)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what a store implements -----------------------------------------------------------------

    @abstractmethod
    async def _heartbeat(self, state: WorkerState, ttl: float) -> HeartbeatResult: ...

    @abstractmethod
    async def _drain(self, worker_id: str) -> bool: ...

    @abstractmethod
    async def _workers(self) -> list[WorkerSnapshot]: ...

    @abstractmethod
    async def _reap(self) -> ReapResult: ...

    @abstractmethod
    async def _claim(
        self, call_id: str, tenant: str, tenant_limit: int | None, persona_key: str | None,
        exclude: tuple[str, ...],
    ) -> Claim: ...

    @abstractmethod
    async def _renew(self, claims: list[Claim]) -> tuple[str, ...]: ...

    @abstractmethod
    async def _release(self, call_id: str) -> bool: ...

    @abstractmethod
    async def _rehome(
        self, call_id: str, dead_worker_id: str, persona_key: str | None, tenant: str | None,
    ) -> Claim: ...

    # -- shared wording --------------------------------------------------------------------------

    def no_capacity(self, detail: str = "no live worker has a free slot") -> Refusal:
        return Refusal("no_capacity", detail, self.retry_after_seconds)

    def tenant_limit(self, tenant: str, limit: int | None) -> Refusal:
        return Refusal(
            "tenant_limit", f"tenant {tenant!r} already has {limit} concurrent calls (its limit)",
            self.retry_after_seconds,
        )
