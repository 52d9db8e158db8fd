"""A call's life on the gateway side: a slot claimed, an agent session on a worker, and that session kept
alive through worker deaths, Redis outages and drains. Front ends (SIP, WebRTC) use this and nothing below it.

    call = await calls.start(call_id, tenant, persona)             # Refusal / PersonaRejected if not
    call.send(frame)                                               # 3840 bytes of caller audio, every 80 ms
    async for event in call.frames(): ...                          # AgentAudio (80 ms) / AgentText
    await call.end("hangup")                                       # frees the slot

Contract: audio never waits on the routing store; a lost worker is replaced within ``rehome_deadline`` (comfort
noise meanwhile) or the call ends ``no_worker``; ``end`` always releases the slot.

Details (states, end reasons, background tasks): docs/calls.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import httpx
import numpy as np
from websockets.exceptions import ConnectionClosed, WebSocketException

from personagate_common.plane import WorkerAuth
from personagate_common.protocol import FRAME_BYTES, FRAME_SAMPLES, FRAME_SECONDS, SAMPLE_RATE, CloseCode
from personagate_common.routing import Claim, Refusal, Router, RoutingMetrics, WorkerSnapshot, WorkerState, make_router
from personagate_common.routing.router import check_id

from .call.state import StateMachine
from .metrics import GatewayMetrics
from .worker_client import AgentAudio, AgentText, WorkerRefused, WorkerSession

if TYPE_CHECKING:
    from .config import GatewaySettings
    from .tenants.registry import TenantRegistry
    from .tenants.tenant import PersonaConfig, Tenant

log = logging.getLogger(__name__)

CALLER_BACKLOG_FRAMES = 4  # caller frames waiting for the worker; older ones are dropped (the worker keeps 3)
AGENT_BACKLOG_EVENTS = 32  # agent frames and text waiting for the front end; older ones are dropped
PING_TIMEOUT_SECONDS = 0.5  # a worker the reaper calls dead, but that answers a ping this fast, keeps its calls
CLOSE_TIMEOUT_SECONDS = 1.0  # for a worker to close a session we ended
LOOP_STOP_SECONDS = 5.0  # for the background loops to stop once cancelled
MAX_CALL_ID = 128  # the worker protocol's session_id limit
STEP_WINDOW = 750  # the step round trips a call keeps for its record: the last minute's


class StepRoundTrips:
    """A call's worker step round trips: when each caller frame not yet answered was sent, and the last
    ``STEP_WINDOW`` round trips (the worker answers every caller frame with one agent frame, in order)."""

    def __init__(self, observe: Callable[[float], None]) -> None:
        self._observe = observe
        self._sent: collections.deque[float] = collections.deque(maxlen=CALLER_BACKLOG_FRAMES * 4)
        self._window = np.zeros(STEP_WINDOW, dtype=np.float32)
        self._count = 0

    def sent(self) -> None:
        self._sent.append(time.monotonic())

    def answered(self) -> None:
        if not self._sent:
            return
        seconds = time.monotonic() - self._sent.popleft()
        self._window[self._count % STEP_WINDOW] = seconds
        self._count += 1
        self._observe(seconds)

    def restart(self) -> None:
        """A new session (re-homed): frames sent to the old one will never be answered."""
        self._sent.clear()

    def summary(self) -> dict[str, float] | None:
        """p50, p95 and max of the window, in milliseconds; None before the first answer."""
        if not self._count:
            return None
        window = self._window[:min(self._count, STEP_WINDOW)]
        p50, p95 = np.percentile(window, (50, 95))
        return {"p50_ms": round(float(p50) * 1000, 1), "p95_ms": round(float(p95) * 1000, 1),
                "max_ms": round(float(window.max()) * 1000, 1)}

# Close codes after which the call stays with its worker's verdict instead of moving: 1000 is the worker
# ending the session, 44xx a protocol error that another worker would repeat.
SESSION_OVER_CODES = frozenset({
    CloseCode.NORMAL, CloseCode.BAD_REQUEST, CloseCode.START_TIMEOUT, CloseCode.PERSONA_REJECTED})
REFUSED_PERSONA = CloseCode.PERSONA_REJECTED


class SessionState(enum.StrEnum):
    CLAIMING = "claiming"
    CONNECTING = "connecting"
    LIVE = "live"
    REHOMING = "rehoming"
    ENDING = "ending"
    ENDED = "ended"


TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.CLAIMING: frozenset({SessionState.CONNECTING, SessionState.ENDING}),
    SessionState.CONNECTING: frozenset({SessionState.LIVE, SessionState.CLAIMING, SessionState.ENDING}),
    SessionState.LIVE: frozenset({SessionState.REHOMING, SessionState.ENDING}),
    SessionState.REHOMING: frozenset({SessionState.LIVE, SessionState.ENDING}),
    SessionState.ENDING: frozenset({SessionState.ENDED}),
    SessionState.ENDED: frozenset(),
}


class EndReason(enum.StrEnum):
    HANGUP = "hangup"  # the front end ended the call (the caller hung up): end()'s default
    NO_WORKER = "no_worker"  # the worker was lost and no other worker could take the call
    PERSONA_REJECTED = "persona_rejected"  # the new worker refused the persona while re-homing
    WORKER_ENDED = "worker_ended"  # the worker closed the session itself (normal close or protocol error)
    SHUTDOWN = "shutdown"  # the gateway stopped: a drain's deadline passed, or it was stopped at once
    ERROR = "error"  # a bug in the gateway: see the log
    # A call that never went live ends with one of these (start() raised):
    REFUSED = "refused"  # Refusal: no_capacity, tenant_limit, unavailable, draining
    CANCELLED = "cancelled"  # the front end gave up while the session was being set up


class PersonaRejected(Exception):
    """The worker refused the persona (close 4422): the tenant's configuration must change; don't retry."""

    def __init__(self, persona: str, reason: str) -> None:
        super().__init__(f"persona {persona} refused by the worker: {reason}")
        self.persona = persona
        self.reason = reason


@dataclass(frozen=True)
class Rehome:
    """One move of a call to another worker."""

    from_worker: str
    to_worker: str
    cause: str  # why the first worker was given up: its close code and reason, or the reaper
    seconds: float  # from losing the worker to the new worker's ready
    session_seconds: float  # of which: connecting to the new worker and its priming (the rest: the store)
    persona_cached: bool  # the new worker had the persona primed


def comfort_noise(frames: int = 25, dbfs: float = -40.0, seed: int = 7) -> tuple[bytes, ...]:
    """Soft pink noise at ``dbfs`` RMS as 80 ms frames (s16le, 24 kHz) that loop without a seam: what the
    caller hears instead of dead air while a call moves to another worker."""
    n = frames * FRAME_SAMPLES
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    shape = np.zeros_like(freqs)
    audible = freqs >= 60
    shape[audible] = 1 / np.sqrt(freqs[audible])  # pink: 3 dB less power per octave
    shape /= 1 + (freqs / 3000) ** 4  # soft: rolled off above ~3 kHz
    noise = np.fft.irfft(spectrum * shape, n)  # periodic in n: the last frame flows into the first
    noise *= 10 ** (dbfs / 20) / np.sqrt(np.mean(noise**2))
    pcm = np.clip(np.round(noise * 32767), -32768, 32767).astype("<i2")
    return tuple(pcm[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES].tobytes() for i in range(frames))


COMFORT_NOISE = comfort_noise()
_END = object()  # the end of frames()


class AgentCall:
    """One call's agent session, as a front end holds it. Made by ``Calls.start``."""

    def __init__(self, calls: Calls, call_id: str, tenant: Tenant, persona: PersonaConfig,
                 on_claimed: Callable[[], None] | None = None) -> None:
        self._calls = calls
        self._on_claimed = on_claimed
        self.call_id = call_id
        self.tenant = tenant.id
        self.tenant_limit: int = tenant.spec.limits.max_concurrent_calls
        self.persona = persona
        self.persona_key = calls.persona_key(persona)
        self.lifecycle = StateMachine(f"call {call_id}", SessionState.CLAIMING, TRANSITIONS)
        self.claim: Claim | None = None  # where the call is placed (changes when it is re-homed)
        self.end_reason: str | None = None
        self.rehomes: list[Rehome] = []
        self.caller_frames_dropped = 0
        self.agent_events_dropped = 0
        self.steps = StepRoundTrips(calls.metrics.agent_step_seconds.observe)
        self._session: WorkerSession | None = None
        self._caller: collections.deque[bytes] = collections.deque(maxlen=CALLER_BACKLOG_FRAMES)
        self._wake_sender = asyncio.Event()
        self._agent: asyncio.Queue[object] = asyncio.Queue(maxsize=AGENT_BACKLOG_EVENTS)
        self._starter: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._filler: asyncio.Task[None] | None = None
        self._filling = False
        self._lost_cause: str | None = None  # set when the gateway itself gives the worker up (reaper)
        self._ending = False
        self._closing: asyncio.Task[None] | None = None  # the shutdown, once begun (shielded from callers)
        self._ended = asyncio.Event()

    # ------------------------------------------------------------------ what a front end uses

    @property
    def worker_id(self) -> str | None:
        return self.claim.worker_id if self.claim is not None else None

    @property
    def persona_name(self) -> str:
        return f"{self.persona.tenant}/{self.persona.name}"

    def send(self, frame: bytes) -> None:
        """Queue 80 ms of caller audio (3840 bytes, s16le, 24 kHz) for the worker. Never blocks: while the
        worker is slow or being replaced, at most 4 frames wait and older ones are dropped."""
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"a frame is {FRAME_BYTES} bytes (80 ms of 24 kHz s16le), got {len(frame)}")
        if self._ending:
            return
        if len(self._caller) == self._caller.maxlen:
            self.caller_frames_dropped += 1
            self._calls.metrics.call_frames_dropped.labels(direction="caller").inc()
        self._caller.append(bytes(frame))
        self._wake_sender.set()

    async def frames(self) -> AsyncIterator[AgentAudio | AgentText]:
        """Agent audio (80 ms frames; ``filler=True`` for comfort noise while re-homing) and agent text, as
        they come, until the call ends. If they are not read in time, the oldest are dropped."""
        while True:
            item = await self._agent.get()
            if item is _END:
                self._agent.put_nowait(_END)  # a second reader ends too
                return
            assert isinstance(item, AgentAudio | AgentText)
            yield item

    async def end(self, reason: EndReason | str = EndReason.HANGUP) -> None:
        """End the call: the worker session ends and the slot is released. Idempotent (the first reason
        stands); returns once ended. Cancelling the caller does not stop the clean-up."""
        if self._closing is None:
            self._ending = True
            self.end_reason = str(reason)
            self._closing = asyncio.create_task(self._shut_down(), name=f"call-{self.call_id}-end")
        await asyncio.shield(self._closing)

    async def wait_ended(self) -> str:
        """Until the call ends (by ``end()`` or by itself, e.g. ``no_worker``); its end reason."""
        await self._ended.wait()
        assert self.end_reason is not None
        return self.end_reason

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> SessionState:
        return self.lifecycle.state

    @property
    def history(self) -> list[tuple[SessionState, float]]:
        return self.lifecycle.history

    def _to(self, state: SessionState) -> None:
        self.lifecycle.to(state)
        self._wake_sender.set()

    def _emit(self, event: object) -> None:
        """Hand an event to frames(), dropping the oldest waiting one if the front end is behind."""
        while self._agent.full():
            dropped = self._agent.get_nowait()
            if dropped is not _END:
                self.agent_events_dropped += 1
                self._calls.metrics.call_frames_dropped.labels(direction="agent").inc()
        self._agent.put_nowait(event)

    # ------------------------------------------------------------------ setting up

    async def _start(self) -> None:
        """Claim, connect, and go live (or raise Refusal / PersonaRejected)."""
        calls = self._calls
        excluded: list[str] = []
        refusals: list[str] = []
        for _ in range(calls.start_attempts):
            try:
                claim = await calls.router.claim(
                    self.call_id, self.tenant, self.tenant_limit, self.persona_key, exclude_workers=excluded)
            except Refusal as exc:
                if exc.reason != "no_capacity" or not refusals:
                    raise
                raise Refusal("no_capacity", f"{exc.detail}; workers that did not start the session: "
                              + "; ".join(refusals), exc.retry_after_seconds) from None
            self.claim = claim
            self._to(SessionState.CONNECTING)
            if self._on_claimed is not None:
                self._on_claimed()
                self._on_claimed = None
            try:
                self._session = await calls.open_session(claim, self, calls.session_start_timeout)
            except WorkerRefused as exc:
                if exc.code == REFUSED_PERSONA:
                    raise PersonaRejected(self.persona_name, exc.reason) from exc
                refusals.append(f"{claim.worker_id}: {exc.code} {exc.reason}")
            except (OSError, TimeoutError, WebSocketException) as exc:
                refusals.append(f"{claim.worker_id}: {_describe(exc)}")
            else:
                self._to(SessionState.LIVE)
                self._sender = asyncio.create_task(self._send_loop(), name=f"call-{self.call_id}-send")
                self._supervisor = asyncio.create_task(self._supervise(), name=f"call-{self.call_id}-worker")
                return
            excluded.append(claim.worker_id)
            self._to(SessionState.CLAIMING)
            log.info("worker did not start the session; claiming another", extra={
                "call": self.call_id, "worker_id": claim.worker_id, "why": refusals[-1]})
        raise Refusal("no_capacity", "no worker started the session: " + "; ".join(refusals),
                      calls.router.retry_after_seconds)

    # ------------------------------------------------------------------ live

    async def _send_loop(self) -> None:
        """Caller frames to the current worker; waits (frames bounded) while there is none."""
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            while self._caller:
                session = self._session
                if session is None or self.state is not SessionState.LIVE:
                    break
                frame = self._caller.popleft()
                self.steps.sent()  # before the send: its answer may be read before this task resumes
                try:
                    await session.send(frame)
                except ConnectionClosed:
                    break  # the supervisor sees the close and re-homes the call

    async def _supervise(self) -> None:
        """Agent events from the current worker to frames(); when the worker is lost, re-home."""
        try:
            while True:
                session = self._session
                assert session is not None
                async for event in session.events():
                    if isinstance(event, AgentAudio):
                        self.steps.answered()
                        if self._filling:
                            self._stop_filler()
                    self._emit(event)
                if self._ending:
                    return
                code, reason = session.close_code, session.close_reason or ""
                if code in SESSION_OVER_CODES:
                    level = logging.INFO if code == CloseCode.NORMAL else logging.ERROR
                    log.log(level, "the worker ended the session", extra={
                        "call": self.call_id, "worker_id": self.worker_id, "code": code, "reason": reason})
                    await self.end(EndReason.WORKER_ENDED)  # cancels this task
                    return
                cause = self._lost_cause or f"socket closed: {code} {reason}".strip()
                if not await self._rehome(cause):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("call supervisor failed", extra={"call": self.call_id})
            if not self._ending:
                await self.end(EndReason.ERROR)

    async def _rehome(self, cause: str) -> bool:
        """Move the call to another worker; False if the call ended instead."""
        calls = self._calls
        lost_at = time.monotonic()
        assert self.claim is not None
        first = self.claim.worker_id
        self._session = None
        self._lost_cause = None
        self._to(SessionState.REHOMING)
        self._start_filler()
        log.warning("call lost its worker; re-homing", extra={
            "call": self.call_id, "tenant": self.tenant, "worker_id": first, "cause": cause})
        deadline = lost_at + calls.rehome_deadline
        lost = first
        tried: list[str] = []
        while not self._ending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    claim = await calls.router.rehome(self.call_id, lost, self.persona_key, tenant=self.tenant)
            except Refusal as exc:
                if exc.reason == "no_capacity":
                    tried.append(exc.detail)
                    break
                tried.append(exc.detail)  # unavailable: the store may answer again before the deadline
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                continue
            except TimeoutError:
                break
            self.claim = claim
            opening = time.monotonic()
            try:
                session = await calls.open_session(claim, self, max(0.05, deadline - time.monotonic()))
            except WorkerRefused as exc:
                if exc.code == REFUSED_PERSONA:
                    log.error("the new worker refused the persona", extra={
                        "call": self.call_id, "worker_id": claim.worker_id, "reason": exc.reason})
                    await self.end(EndReason.PERSONA_REJECTED)
                    return False
                tried.append(f"{claim.worker_id}: {exc.code} {exc.reason}")
                lost = claim.worker_id
                continue
            except (OSError, TimeoutError, WebSocketException) as exc:
                tried.append(f"{claim.worker_id}: {_describe(exc)}")
                lost = claim.worker_id
                continue
            now = time.monotonic()
            seconds = now - lost_at
            self._session = session
            self.steps.restart()
            self.rehomes.append(Rehome(first, claim.worker_id, cause, seconds, now - opening, session.persona_cached))
            self._to(SessionState.LIVE)
            calls.metrics.call_rehome_seconds.observe(seconds)
            log.info("call re-homed in %.0f ms", seconds * 1000, extra={
                "call": self.call_id, "tenant": self.tenant, "from_worker": first, "to_worker": claim.worker_id,
                "seconds": round(seconds, 3), "session_seconds": round(now - opening, 3), "cause": cause,
                "persona_cached": session.persona_cached})
            return True
        if not self._ending:
            log.warning("no worker could take the call; ending it", extra={
                "call": self.call_id, "tenant": self.tenant, "worker_id": first,
                "seconds": round(time.monotonic() - lost_at, 3), "tried": tried})
            await self.end(EndReason.NO_WORKER)
        return False

    def _start_filler(self) -> None:
        self._filling = True
        if self._filler is None or self._filler.done():
            self._filler = asyncio.create_task(self._fill(), name=f"call-{self.call_id}-filler")

    def _stop_filler(self) -> None:
        self._filling = False
        if self._filler is not None:
            self._filler.cancel()
            self._filler = None

    async def _fill(self) -> None:
        """Comfort noise, one frame per 80 ms from now, until stopped."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        for i in range(10**9):
            self._emit(AgentAudio(COMFORT_NOISE[i % len(COMFORT_NOISE)], filler=True))
            self._calls.metrics.call_filler_frames.inc()
            await asyncio.sleep(max(0.0, began + (i + 1) * FRAME_SECONDS - loop.time()))

    async def check_worker(self, cause: str) -> None:
        """The store says this call's worker is dead: give it up unless it still answers a ping."""
        session = self._session
        if session is None or self.state is not SessionState.LIVE:
            return
        if await session.ping(PING_TIMEOUT_SECONDS):
            log.info("the routing store reaped this call's worker, but it answers; the call stays there "
                     "(the lease renewal re-asserts it)", extra={"call": self.call_id, "worker_id": self.worker_id})
            self._calls.renew_soon()
            return
        if session is self._session and not self._ending:
            self._lost_cause = f"{cause}; no answer to a ping within {PING_TIMEOUT_SECONDS:g} s"
            session.abort()

    # ------------------------------------------------------------------ ending

    async def _shut_down(self) -> None:
        """The end of the call, in a task of its own: every other task of the call is cancelled (the one
        that asked for the end included), the session ended, the slot released."""
        self._to(SessionState.ENDING)
        self._filling = False
        tasks = [t for t in (self._starter, self._supervisor, self._sender, self._filler)
                 if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        session, self._session = self._session, None
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
            if session is not None:
                await _close_session(session)
            if self.claim is not None:
                await self._calls.release(self.call_id)
        finally:
            self._to(SessionState.ENDED)
            self._emit(_END)
            self._calls.forget(self)
            self._ended.set()


async def _close_session(session: WorkerSession) -> None:
    """Tell the worker the call is over and close the socket, without waiting long for a worker that hangs."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
            await session.end()
            await session.close()
    except (TimeoutError, OSError, WebSocketException):
        session.abort()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no ready from the worker in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Calls:
    """The gateway's calls: the router, the tenant registry, the live calls and the background loops."""

    def __init__(
        self,
        router: Router,
        registry: TenantRegistry | None = None,
        *,
        metrics: GatewayMetrics | None = None,
        workers: Sequence[str] = (),
        poll_seconds: float = 1.0,
        reap_seconds: float = 1.0,
        session_start_timeout: float = 10.0,
        rehome_deadline: float = 5.0,
        start_attempts: int = 3,
        worker_auth: WorkerAuth | None = None,
        ready_without_store: bool = True,
    ) -> None:
        self.router = router
        # /readyz while the routing store cannot be reached: ready (calls refused 503 meanwhile) or not ready
        self.ready_without_store = ready_without_store
        self.worker_auth = worker_auth or WorkerAuth()  # the shared secret and CAs for workers' sessions and polls
        self.registry = registry
        self.metrics = metrics or GatewayMetrics()
        self.workers = tuple(url.rstrip("/") for url in workers)  # embedded mode: polled for /v1/info
        self.poll_seconds = poll_seconds
        self.reap_seconds = reap_seconds
        self.session_start_timeout = session_start_timeout
        self.rehome_deadline = rehome_deadline
        self.start_attempts = start_attempts
        self.draining = False
        self._store_reachable = True
        self.last_workers: list[WorkerSnapshot] = []
        self._calls: dict[str, AgentCall] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._loops: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._renew_now = asyncio.Event()
        self._renew_failing = False
        self._worker_seen: dict[str, bool] = {}  # embedded: each worker URL's last poll result
        self._http: httpx.AsyncClient | None = None
        self._unkeyed: set[str] = set()

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, registry: TenantRegistry | None = None, metrics: GatewayMetrics | None = None,
    ) -> Calls:
        """The router ``settings`` ask for (Redis with ``redis_url``, else embedded with a poller of ``workers``),
        its metrics in the gateway's registry."""
        metrics = metrics or GatewayMetrics()
        options: dict[str, Any] = {
            "lease_seconds": settings.call_lease_seconds,
            "worker_ttl": settings.worker_ttl_seconds,
            "metrics": RoutingMetrics(metrics.registry),
        }
        if settings.redis_url:
            options["prefix"] = settings.redis_prefix
        router = make_router(settings.redis_url, **options)
        return cls(router, registry, metrics=metrics, workers=() if settings.redis_url else settings.workers,
                   worker_auth=settings.worker_auth(), ready_without_store=settings.ready_without_routing_store)

    @property
    def store_reachable(self) -> bool:
        """Whether this gateway's last exchange with the routing store succeeded (a claim, a renewal, a reap)."""
        return self._store_reachable

    @store_reachable.setter
    def store_reachable(self, ok: bool) -> None:
        if ok != self._store_reachable:
            if ok:
                log.info("routing store answers again: new calls are taken")
            else:
                log.warning("routing store cannot be reached: new calls are refused (503, Retry-After %g s) until it "
                            "answers; calls in progress go on; %s", self.router.retry_after_seconds,
                            "readiness stays (ready_without_routing_store)" if self.ready_without_store
                            else "readiness fails (ready_without_routing_store is false)")
        self._store_reachable = ok
        self.metrics.routing_store_reachable.set(1 if ok else 0)

    # ------------------------------------------------------------------ calls

    @property
    def live(self) -> dict[str, AgentCall]:
        """Calls not yet ended (being set up, live, re-homing), by call id."""
        return dict(self._calls)

    def persona_key(self, persona: PersonaConfig) -> str | None:
        """The persona's cache key on workers (routing prefers a worker that has it primed); None if it
        cannot be computed (then any worker will do)."""
        try:
            return persona.persona_key
        except Exception as exc:  # noqa: BLE001 (a persona the loader took; never let this refuse a call)
            name = f"{persona.tenant}/{persona.name}"
            if name not in self._unkeyed:
                self._unkeyed.add(name)
                log.warning("no persona key for %s (%s); calls to it take any worker", name, exc)
            return None

    async def start(self, call_id: str, tenant: Tenant, persona: PersonaConfig, *,
                    on_claimed: Callable[[], None] | None = None) -> AgentCall:
        """Claim a slot (``tenant``'s concurrent-call limit counted in the same step) and start the agent
        session on the claimed worker; the call is live when this returns. ``on_claimed`` is called once, when
        the first slot is claimed (admission passed; the persona is being primed): a front end that can set up
        its media meanwhile (WebRTC) answers then.

        Raises ``Refusal`` (``no_capacity``, ``tenant_limit``, ``unavailable``: the routing store cannot be
        reached, ``draining``: this gateway is stopping) or ``PersonaRejected``. Cancelling it releases
        whatever was claimed.
        """
        check_id("call_id", call_id)
        if len(call_id) > MAX_CALL_ID:
            raise ValueError(f"call_id is at most {MAX_CALL_ID} characters (the worker's session id)")
        if self.draining:
            self.metrics.call_starts.labels(result="draining").inc()
            raise Refusal("draining", "this gateway is draining: it takes no new calls",
                          self.router.retry_after_seconds)
        if call_id in self._calls:
            raise ValueError(f"call {call_id!r} is already in progress")
        call = AgentCall(self, call_id, tenant, persona, on_claimed)
        self._calls[call_id] = call
        self._idle.clear()
        self.metrics.calls_active.set(len(self._calls))
        started = time.monotonic()
        call._starter = asyncio.create_task(call._start(), name=f"call-{call_id}-start")
        try:
            await call._starter
        except BaseException as exc:
            failure: BaseException = exc
            if isinstance(exc, asyncio.CancelledError) and not _cancelling():
                # the set-up was cut short by stop() (the gateway is stopping), not by the front end
                failure = Refusal("draining", "this gateway is stopping", self.router.retry_after_seconds)
            result, reason = _start_failure(failure)
            self.metrics.call_starts.labels(result=result).inc()
            if result == "unavailable":
                self.store_reachable = False
            await call.end(reason)  # releases whatever was claimed (a no-op if a shutdown already ended it)
            log.info("call not started: %s", result, extra={
                "call": call_id, "tenant": tenant.id, "persona": call.persona_name,
                "detail": getattr(failure, "detail", None) or str(failure)})
            if failure is exc:
                raise
            raise failure from None
        seconds = time.monotonic() - started
        self.store_reachable = True
        self.metrics.call_starts.labels(result="live").inc()
        self.metrics.call_start_seconds.observe(seconds)
        session = call._session
        log.info("call live", extra={
            "call": call_id, "tenant": tenant.id, "persona": call.persona_name, "worker_id": call.worker_id,
            "persona_cached": session.persona_cached if session else None, "seconds": round(seconds, 3)})
        return call

    async def release(self, call_id: str) -> None:
        """Free a call's slot; if the store cannot be reached, its lease runs out and the reaper frees it."""
        try:
            await self.router.release(call_id)
        except Refusal as exc:
            log.warning("could not release the call's slot now (%s); its lease will run out", exc.detail,
                        extra={"call": call_id})
        except Exception:
            log.exception("releasing the call's slot failed", extra={"call": call_id})

    def forget(self, call: AgentCall) -> None:
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]
            if any(state is SessionState.LIVE for state, _ in call.history):
                self.metrics.calls_ended.labels(reason=call.end_reason or "unknown").inc()
                began = next(t for state, t in call.history if state is SessionState.LIVE)
                log.info("call ended", extra={
                    "call": call.call_id, "tenant": call.tenant, "reason": call.end_reason,
                    "worker_id": call.worker_id, "rehomes": len(call.rehomes),
                    "seconds": round(time.monotonic() - began, 2), "agent_step_round_trip": call.steps.summary()})
        self.metrics.calls_active.set(len(self._calls))
        if not self._calls:
            self._idle.set()

    async def open_session(self, claim: Claim, call: AgentCall, timeout: float) -> WorkerSession:
        """The call's session on the claimed worker (session id = call id), primed and ready."""
        async with asyncio.timeout(timeout):
            return await WorkerSession.open(claim.url, call.persona.worker_persona, session_id=call.call_id,
                                            auth=self.worker_auth)

    # ------------------------------------------------------------------ stopping

    async def drain(self, deadline_seconds: float) -> list[str]:
        """Refuse new calls from now on (``Refusal("draining")``, readiness fails), let the calls in progress
        end by themselves for up to ``deadline_seconds``, then end the rest with ``shutdown``. Returns the
        ids of the calls that had to be ended."""
        self.draining = True
        began = time.monotonic()
        if self._calls:
            log.info("drain started: new calls are refused; waiting up to %g s for %d call(s) to end",
                     deadline_seconds, len(self._calls), extra={"calls": sorted(self._calls)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline_seconds):
                    await self._idle.wait()
        stragglers = sorted(self._calls)
        if stragglers:
            log.warning("drain deadline passed: ending %d call(s)", len(stragglers), extra={"calls": stragglers})
            await self.stop()
        log.info("drain finished", extra={"seconds": round(time.monotonic() - began, 2), "ended": stragglers})
        return stragglers

    async def stop(self) -> None:
        """Refuse new calls and end every call in progress now (``shutdown``)."""
        self.draining = True
        await asyncio.gather(*(call.end(EndReason.SHUTDOWN) for call in list(self._calls.values())),
                             return_exceptions=True)

    # ------------------------------------------------------------------ background

    async def startup(self) -> None:
        """Start the background loops (one maintenance pass first, so readiness is right from the start)."""
        if self._loops:
            return
        if self.workers:
            self._http = httpx.AsyncClient(timeout=min(0.8, self.poll_seconds), headers=self.worker_auth.headers(),
                                           verify=self.worker_auth.ssl_context())
            await self._poll_workers()
        await self._maintain()
        self._loops = [
            asyncio.create_task(self._every(self.router.lease_seconds / 3, self._renew, self._renew_now), name="renew"),
            asyncio.create_task(self._every(self.reap_seconds, self._maintain), name="reap"),
        ]
        if self.workers:
            self._loops.append(asyncio.create_task(self._every(self.poll_seconds, self._poll_workers), name="poll"))
        log.info("calls: routing on %s", "Redis" if not self.workers else "the embedded store, polling " +
                 ", ".join(self.workers), extra={"lease_seconds": self.router.lease_seconds})

    async def close(self) -> None:
        """End every call (``shutdown``), stop the loops, close the router."""
        await self.stop()
        tasks = [*self._loops, *self._side_tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=LOOP_STOP_SECONDS)
            if stuck:
                log.error("background tasks did not stop in time; leaving them",
                          extra={"tasks": sorted(t.get_name() for t in stuck)})
        self._loops = []
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await self.router.close()

    async def __aenter__(self) -> Self:
        await self.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def renew_soon(self) -> None:
        self._renew_now.set()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details) for ``/readyz``: ready while tenants are loaded and the gateway is not draining. The
        routing store being unreachable fails readiness only with ``ready_without_store`` false: by default the
        gateway stays ready and answers new calls 503 with Retry-After itself, so that a Redis failover, which
        every gateway sees at once, does not take every gateway out of its load balancer (and a SIP address off
        the network, INVITEs timing out instead of being refused). The details say the store's state
        (``routing_store``: reachable or unreachable), count live workers and free slots, and in embedded mode
        the polled workers that answered."""
        details: dict[str, Any] = {
            "routing_store": "reachable" if self.store_reachable else "unreachable",
            "calls": len(self._calls),
            "workers_alive": sum(1 for w in self.last_workers if w.alive),
            "slots_free": sum(w.free for w in self.last_workers if w.alive and not w.draining),
        }
        if self.workers:
            # Embedded mode: the workers whose last poll answered. A restarted worker's record outlives it by
            # the heartbeat TTL, so "alive" alone can still count the old process.
            details["workers_reachable"] = sum(1 for url in self.workers if self._worker_seen.get(url))
        reason = None
        if self.draining:
            reason = "draining"
        elif self.registry is not None and not self.registry.tenants:
            reason = "no tenants loaded"
        elif not self.store_reachable and not self.ready_without_store:
            reason = "the routing store cannot be reached"
        if reason is not None:
            details["reason"] = reason
        return reason is None, details

    async def _every(self, seconds: float, step: Callable[[], Coroutine[Any, Any, None]],
                     wake: asyncio.Event | None = None) -> None:
        while True:
            if wake is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        await wake.wait()
                wake.clear()
            else:
                await asyncio.sleep(seconds)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background step %s failed; retrying", getattr(step, "__name__", step))
            if _cancelling():
                # A cancel that a step turned into an ordinary failure (a Redis call's own timeout firing
                # at the same moment, say) must still stop the loop, or close() waits for it forever.
                raise asyncio.CancelledError

    def _store(self, ok: bool) -> None:
        self.store_reachable = ok

    async def _renew(self) -> None:
        claims = [c.claim for c in self._calls.values()
                  if c.claim is not None and c.state in (SessionState.CONNECTING, SessionState.LIVE)]
        if not claims:
            return
        try:
            moved = await self.router.renew(claims)
        except Refusal as exc:
            self._store(False)
            if not self._renew_failing:
                self._renew_failing = True
                log.warning("renewing call leases failed: %s; calls in progress go on, retrying every %g s",
                            exc.detail, self.router.lease_seconds / 3, extra={"calls": len(claims)})
            return
        self._store(True)
        if self._renew_failing:
            self._renew_failing = False
            log.info("routing store reachable again: %d call lease(s) renewed and re-asserted", len(claims))
        if moved:
            log.warning("the routing store has calls on other workers than this gateway's sessions",
                        extra={"calls": list(moved)})

    async def _maintain(self) -> None:
        """Reap dead workers and expired leases; move this gateway's calls off reaped workers; worker gauges."""
        try:
            reaped = await self.router.reap()
            self.last_workers = await self.router.workers()
        except Refusal:
            self._store(False)
            return
        if not self.store_reachable or self._renew_failing:
            self.renew_soon()  # the store is back (perhaps empty): re-assert this gateway's calls now
        self._store(True)
        if reaped.dead_workers:
            log.warning("workers reaped (heartbeat deadline passed)", extra={
                "workers": list(reaped.dead_workers), "orphaned_calls": len(reaped.orphaned_calls)})
        dead = set(reaped.dead_workers)
        orphaned = set(reaped.orphaned_calls)
        for call in list(self._calls.values()):
            if call.state is SessionState.LIVE and (call.worker_id in dead or call.call_id in orphaned):
                self._side_task(call.check_worker(f"the routing store reaped worker {call.worker_id!r}"))
        ours = [c for c in reaped.expired_calls if c in self._calls]
        if ours:
            log.warning("call leases ran out in the routing store; re-asserting them", extra={"calls": ours})
            self.renew_soon()

    def _side_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _poll_workers(self) -> None:
        await asyncio.gather(*(self._poll(url) for url in self.workers))

    async def _poll(self, base: str) -> None:
        """Embedded mode: one worker's /v1/info → a heartbeat (none if it cannot be read or is not serving)."""
        assert self._http is not None
        try:
            response = await self._http.get(f"{base}/v1/info")
            if response.status_code == 401:
                self._seen(base, False, "it refuses this gateway's shared secret (401): worker_secret must be one of "
                                        "the worker's session secrets" if self.worker_auth.secret else
                                        "it needs a shared secret (401) and this gateway has none: set worker_secret "
                                        "or worker_secret_file")
                return
            info = response.json()
            state = worker_state(base, info) if isinstance(info, dict) else None
        except (httpx.HTTPError, ValueError) as exc:
            self._seen(base, False, _describe(exc))
            return
        if state is None:
            self._seen(base, False, "not serving: " + ("draining" if info.get("draining") else "loading"))
            return
        try:
            await self.router.heartbeat(state)
        except ValueError as exc:  # ids the store cannot hold (control characters)
            self._seen(base, False, str(exc))
            return
        self._seen(base, True, None)

    def _seen(self, base: str, ok: bool, why: str | None) -> None:
        if self._worker_seen.get(base) == ok:
            return
        first = base not in self._worker_seen
        self._worker_seen[base] = ok
        if ok:
            log.info("worker %s", "found" if first else "serving again", extra={"worker": base})
        else:
            log.warning("worker not serving: %s", why, extra={"worker": base})


def worker_state(base: str, info: dict[str, Any]) -> WorkerState | None:
    """A worker's ``/v1/info`` as the heartbeat it would send (None while it is not serving: loading, or its
    pool stopped). Its id is the one it reports, else its base URL."""
    if "slots" not in info or not (info.get("ready") or info.get("draining")):
        return None
    scheme, rest = base.split("://", 1)
    return WorkerState(
        worker_id=str(info.get("worker_id") or base),
        url=f"{'wss' if scheme == 'https' else 'ws'}://{rest}/v1/sessions",
        capacity=int(info["slots"]),
        active_calls=tuple(info.get("active_sessions") or ()),
        draining=bool(info.get("draining")),
        cached_personas=tuple(info.get("cached_personas") or ()),
    )


def _start_failure(exc: BaseException) -> tuple[str, EndReason]:
    if isinstance(exc, Refusal):
        return exc.reason, EndReason.REFUSED
    if isinstance(exc, PersonaRejected):
        return "persona_rejected", EndReason.PERSONA_REJECTED
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled", EndReason.CANCELLED
    return "error", EndReason.ERROR


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
