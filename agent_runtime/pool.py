"""The session pool: B slots of the batched model, stepped together every 80 ms.

Threads: the asyncio event loop (sessions, I/O), one tick thread (owns the model batch and the
clock; nothing else touches it) and one priming thread (primes personas on its own module copies).
They meet only through small queues: caller frames go into a per-session deque, agent frames come
back through ``loop.call_soon_threadsafe``, and slot installs/releases go through a control queue
that the tick thread applies between steps.

Real time is kept by shedding, never by waiting: a session keeps at most a few caller frames
(older ones are dropped), a session without a frame this tick is simply not stepped, agent frames a
client does not read in time are dropped, and a tick that overruns makes the clock resynchronise
instead of trying to catch up.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from personagate_common.persona import Persona
from personagate_common.protocol import FRAME_BYTES, FRAME_SAMPLES, FRAME_SECONDS

from .config import Sampling, SessionSampling
from .echo import EchoBatch, EchoBundle, EchoPrimed
from .metrics import WorkerMetrics
from .slots import Batch

if TYPE_CHECKING:  # torch and moshi: imported where a model's pool is built (SessionPool.__init__), never for echo
    from .model import ModelBundle
    from .priming import PrimedState, Primer

    Primed = PrimedState | EchoPrimed  # what a slot is installed from

log = logging.getLogger(__name__)


class PoolFull(Exception):
    """Every slot is taken."""


class PoolStopped(Exception):
    """The pool is not stepping (not started, stopped, or its tick thread failed)."""


class SessionEnded(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AgentFrame:
    pcm: bytes  # 1920 samples s16le, 24 kHz mono
    text: str | None  # the text piece the agent produced with this frame, if any


@dataclass
class PoolConfig:
    capacity: int
    input_backlog_frames: int = 3  # caller audio older than this many frames is dropped
    output_backlog_frames: int = 6  # agent audio a client has not read after this many frames is dropped
    prime_cache_size: int = 32  # primed personas kept for instant starts
    # sessions' default sampling; greedy makes every session greedy (tests, benchmarks)
    sampling: Sampling = field(default_factory=Sampling)


class Session:
    """One call's view of its slot. Created by ``SessionPool.open_session``."""

    def __init__(self, pool: SessionPool, slot: int, persona_hash: str, session_id: str,
                 sampling: SessionSampling) -> None:
        self.id = session_id
        self.slot = slot
        self.persona_hash = persona_hash
        self.sampling = sampling  # what the slot samples with (unless the pool is greedy)
        self.cached = False
        self.start_seconds = 0.0
        self.end_reason: str | None = None
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._inbound: collections.deque[np.ndarray] = collections.deque()
        self._outbound: asyncio.Queue[AgentFrame | None] = asyncio.Queue(pool.config.output_backlog_frames)
        self._heard = False

    @property
    def closed(self) -> bool:
        return self.end_reason is not None

    def push_audio(self, data: bytes) -> None:
        """Queue one 80 ms caller frame (1920 samples s16le). Raises ValueError on any other size."""
        if len(data) != FRAME_BYTES:
            raise ValueError(
                f"audio frame must be {FRAME_BYTES} bytes ({FRAME_SAMPLES} samples s16le, 80 ms), got {len(data)}"
            )
        if self.closed:
            raise SessionEnded(self.end_reason or "ended")
        self._inbound.append(np.frombuffer(data, dtype="<i2").copy())
        self._heard = True

    async def receive(self) -> AgentFrame:
        """The next agent frame; raises SessionEnded once the session is over."""
        if self.closed and self._outbound.empty():
            raise SessionEnded(self.end_reason or "ended")
        frame = await self._outbound.get()
        if frame is None:
            raise SessionEnded(self.end_reason or "ended")
        return frame

    def close(self, reason: str) -> None:
        """End the session and free its slot at once. Idempotent; the first reason wins."""
        if self.closed:
            return
        self.end_reason = reason
        self._pool._release(self)
        self._offer(None)

    def _offer(self, frame: AgentFrame | None) -> None:
        """Runs on the event loop: hand a frame to the reader, dropping the oldest if it lags."""
        queue = self._outbound
        if queue.full():
            dropped = queue.get_nowait()
            if dropped is None:  # keep the end marker; drop the new frame instead
                queue.put_nowait(None)
                return
            self._pool.metrics.output_frames_shed.inc()
        queue.put_nowait(frame)


class SessionPool:
    """``bundle`` is a model's, or an ``EchoBundle`` (echo.py: the same pool, clock and sessions, no model)."""

    def __init__(self, bundle: ModelBundle | EchoBundle, config: PoolConfig,
                 metrics: WorkerMetrics | None = None) -> None:
        self.bundle = bundle
        self.config = config
        self.metrics = metrics or WorkerMetrics()
        self.metrics.slots_capacity.set(config.capacity)
        self.metrics.slots_active.set(0)
        self.primer: Primer | None = None
        self.batch: Batch
        if isinstance(bundle, EchoBundle):
            self.batch = EchoBatch(config.capacity)
        else:
            from .batch import SlotBatch  # torch and moshi, once a model is loaded
            from .priming import Primer

            # The primer clones the modules, which must happen before the batch puts them in streaming mode.
            self.primer = Primer(bundle, config.sampling.lm_gen_kwargs())
            self.batch = SlotBatch(bundle, config.capacity, config.sampling)
        self._prime_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="primer")
        self._prime_cache: collections.OrderedDict[str, Primed] = collections.OrderedDict()
        self._priming: dict[str, asyncio.Future[Primed]] = {}
        self._lock = threading.Lock()
        self._free = list(range(config.capacity - 1, -1, -1))
        self._control: collections.deque = collections.deque()
        self._active: dict[int, Session] = {}  # tick thread only
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pcm = np.zeros((config.capacity, FRAME_SAMPLES), dtype=np.float32)
        self._executing = np.zeros(config.capacity, dtype=bool)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tick", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._thread is None or not self._thread.is_alive():
            self.batch.close()
        self._prime_executor.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def cached_personas(self) -> list[str]:
        return list(self._prime_cache)

    def warm_up(self, persona: Persona, steps: int = 3) -> None:
        """Run every slot through a few steps before the first call (on a GPU this captures the CUDA
        graphs), so that no caller pays for it. Call before ``start``."""
        if self._thread is not None:
            raise RuntimeError("warm up the pool before starting it")
        primed = self._prime_blocking(persona, persona.content_hash())
        for slot in range(self.config.capacity):
            self.batch.install(slot, primed)
        executing = np.ones(self.config.capacity, dtype=bool)
        for _ in range(steps):
            self.batch.step(self._pcm, executing)

    # ------------------------------------------------------------------ sessions

    async def open_session(
        self, persona: Persona, session_id: str | None = None, *, sampling: SessionSampling | None = None
    ) -> Session:
        """Claim a slot, prime (or fetch the primed state of) the persona and start the session.

        ``sampling`` is the session's own (default: the pool's ``config.sampling``); it plays no part
        in priming, so sessions of one persona share its primed state whatever they sample with. A
        greedy pool decodes every session greedily.

        Raises PoolFull when no slot is free, PersonaError when the persona cannot be primed and
        PoolStopped when the pool is not running.
        """
        requested = time.perf_counter()
        if not self.alive or self._stopping:
            raise PoolStopped("the session pool is not running")
        with self._lock:
            if not self._free:
                self.metrics.sessions_refused.labels("pool_full").inc()
                raise PoolFull(f"all {self.config.capacity} slots are in use")
            slot = self._free.pop()
        session = Session(self, slot, persona.content_hash(), session_id or uuid.uuid4().hex,
                          sampling or self.config.sampling.session_defaults())
        try:
            primed, cached = await self._primed(persona)
            installed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._control.append(("install", session, primed, installed))
            self._wake.set()
            await installed
        except BaseException:
            if not session.closed:
                session.end_reason = "start_failed"
                self._release(session)
            raise
        session.cached = cached or isinstance(self.bundle, EchoBundle)  # an echo has nothing to prime
        session.start_seconds = time.perf_counter() - requested
        self.metrics.session_start_seconds.labels("hit" if session.cached else "miss").observe(session.start_seconds)
        self.metrics.sessions_started.inc()
        return session

    async def _primed(self, persona: Persona) -> tuple[Primed, bool]:
        key = persona.content_hash()
        primed = self._prime_cache.get(key)
        if primed is not None:
            self._prime_cache.move_to_end(key)
            return primed, True
        pending = self._priming.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(
                loop.run_in_executor(self._prime_executor, self._prime_blocking, persona, key)
            )
            self._priming[key] = pending
            pending.add_done_callback(lambda done: self._remember(key, done))
        return await asyncio.shield(pending), False

    def _remember(self, key: str, done: asyncio.Future[Primed]) -> None:
        del self._priming[key]
        if done.cancelled() or done.exception() is not None:
            return
        primed = done.result()
        self._prime_cache[key] = primed
        while len(self._prime_cache) > self.config.prime_cache_size:
            self._prime_cache.popitem(last=False)
        self.metrics.persona_prime_seconds.observe(primed.prime_seconds)

    def _prime_blocking(self, persona: Persona, key: str) -> Primed:
        if isinstance(self.bundle, EchoBundle):
            return self.bundle.prime(persona, key)
        assert self.primer is not None
        primed = self.primer.prime_persona(persona, key)
        log.info("persona primed", extra={"persona": key, "frames": primed.position,
                                          "seconds": round(primed.prime_seconds, 4)})
        return primed

    def _release(self, session: Session) -> None:
        self._control.append(("release", session, None, None))
        self._wake.set()
        self.metrics.sessions_ended.labels(session.end_reason or "unknown").inc()

    # ------------------------------------------------------------------ tick thread

    def _run(self) -> None:
        next_tick: float | None = None
        try:
            while not self._stopping:
                self._wake.clear()
                self._apply_control()
                if not self._active:
                    next_tick = None
                    self._wake.wait()
                    continue
                now = time.perf_counter()
                if next_tick is None:
                    next_tick = now
                if now < next_tick and self._wake.wait(next_tick - now):
                    continue  # a session came or went: apply it before stepping
                started = time.perf_counter()
                self.step_once()
                ended = time.perf_counter()
                self.metrics.tick_step_seconds.observe(ended - started)
                next_tick += FRAME_SECONDS
                if ended > next_tick:
                    self.metrics.tick_deadline_misses.inc()
                    if ended - next_tick > FRAME_SECONDS:
                        # Hopelessly behind: skip the missed ticks instead of bursting to catch up;
                        # the sessions' bounded backlogs drop the stale audio.
                        self.metrics.tick_resyncs.inc()
                        next_tick = ended
        except Exception:
            log.exception("tick thread crashed; ending all sessions")
            for session in list(self._active.values()):
                self._post(session, None, reason="worker_error")
            raise
        finally:
            for session in list(self._active.values()):
                self._post(session, None, reason="shutdown")

    def _apply_control(self) -> None:
        while self._control:
            action, session, primed, done = self._control.popleft()
            if action == "install":
                if session.closed:  # the client left while its persona was priming
                    self._post_result(done, None)
                    continue
                started = time.perf_counter()
                self.batch.install(session.slot, primed, session.sampling)
                self.metrics.session_restore_seconds.observe(time.perf_counter() - started)
                self._active[session.slot] = session
                self._post_result(done, None)
            else:
                if self._active.get(session.slot) is session:
                    del self._active[session.slot]
                session._inbound.clear()
                with self._lock:
                    if session.slot not in self._free:
                        self._free.append(session.slot)
            self.metrics.slots_active.set(len(self._active))

    def step_once(self) -> None:
        """Step every live session by one frame (tick thread, or a benchmark driving the pool)."""
        pcm, executing = self._pcm, self._executing
        executing[:] = False
        backlog = self.config.input_backlog_frames
        for slot, session in self._active.items():
            inbound = session._inbound
            while len(inbound) > backlog:
                inbound.popleft()
                self.metrics.input_frames_shed.inc()
            if inbound:
                np.multiply(inbound.popleft(), 1 / 32768, out=pcm[slot])
                executing[slot] = True
            elif session._heard:
                self.metrics.frames_missing.inc()
        if not executing.any():
            return
        out = self.batch.step(pcm, executing)
        pcm16 = out.pcm16 if out.pcm16 is not None else (out.pcm * 32767).astype("<i2")
        for slot in np.flatnonzero(out.produced):
            session = self._active.get(int(slot))
            if session is not None:
                frame = AgentFrame(pcm16[slot].tobytes(), self.bundle.text_piece(out.text_tokens[slot]))
                self._post(session, frame)

    def _post(self, session: Session, frame: AgentFrame | None, reason: str | None = None) -> None:
        def deliver() -> None:
            if frame is None:
                session.close(reason or "ended")
            elif not session.closed:
                session._offer(frame)

        try:
            session._loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the event loop is gone: the process is shutting down
            pass

    @staticmethod
    def _post_result(done: asyncio.Future | None, value: object) -> None:
        if done is None:
            return

        def resolve() -> None:
            if not done.done():
                done.set_result(value)

        try:
            done.get_loop().call_soon_threadsafe(resolve)
        except RuntimeError:
            pass
