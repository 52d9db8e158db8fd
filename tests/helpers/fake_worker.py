"""A fake worker in the test's own event loop: the worker protocol (docs/worker-protocol.md) on a real WebSocket on
127.0.0.1, with no model, no torch and no process, and knobs that make it misbehave on purpose.

    async with FakeWorker(slots=2) as worker:         # serving ws://127.0.0.1:PORT/v1/sessions
        await router.heartbeat(worker.state())        # what a real worker's heartbeat would say
        worker.priming_delay = 0.2                    # ready comes 200 ms after the start message
        worker.refuse_personas["x" * 10] = "…"        # close 4422 for a persona with that prompt
        worker.draining = True                        # 1013 for every new session
        await worker.vanish()                         # every connection dropped (1006), new ones refused
        worker.stall()                                # reads nothing more, answers no ping: a hung process

Protocol kept as the real worker (``agent_runtime/server.py``) keeps it, with the constants both sides import
(``personagate_common.protocol``): the shared secret checked before the upgrade (401), the start message within
``start_timeout`` (4408), malformed messages (4400), the persona checked by ``personagate_common.persona`` and a
voice list (4422), slots (4503), draining (1013), ``ready`` with ``persona_cached``, one agent frame per caller
frame (``echo``: the caller's previous frame back, the first silence, as ``--model echo`` does; otherwise a
tone), ``texts`` sent one per step after the audio, ``{"type": "end"}`` closing 1000 ``session ended:
client_end``. It answers each caller frame at once instead of on an 80 ms tick: tests never wait on its clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gateway.calls import Calls
from gateway.metrics import GatewayMetrics
from gateway.tenants.registry import TenantRegistry
from personagate_common.persona import PersonaError, PersonaFormatError, persona_from_message, persona_key
from personagate_common.plane import SecretChecker, WorkerAuth
from personagate_common.protocol import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE, CloseCode, MessageType
from personagate_common.routing import EmbeddedRouter, RoutingMetrics, WorkerState
from tests.helpers.wait import scaled
from tests.helpers.worker import TEST_WORKER_SECRET, WORKER_AUTH

SILENCE = bytes(FRAME_BYTES)
TONE = (np.sin(2 * np.pi * 440 * np.arange(FRAME_SAMPLES) / SAMPLE_RATE) * 8000).astype("<i2").tobytes()
DRAINING_REASON = "the worker is draining"
_ids = itertools.count(1)


@dataclass
class FakeSession:
    """One session as the fake worker saw it."""

    id: str
    persona: dict[str, Any]
    slot: int
    persona_cached: bool
    frames_in: int = 0  # caller frames received
    frames_out: int = 0  # agent frames sent
    ended: str | None = None  # client_end, client_gone, worker_end, vanished
    connection: ServerConnection | None = field(default=None, repr=False)


class FakeWorker:
    """The worker protocol in this event loop (see the module's docstring). Every knob may change mid-test."""

    def __init__(self, *, slots: int = 2, worker_id: str | None = None, secret: str | None = TEST_WORKER_SECRET,
                 voices: Iterable[str] | None = None, echo: bool = True, texts: Iterable[str] = (),
                 priming_delay: float = 0.0, start_timeout: float = 10.0) -> None:
        self.worker_id = worker_id or f"fake-{next(_ids)}"
        self.slots = slots
        self.secrets = SecretChecker([secret] if secret else [])
        self.voices = None if voices is None else frozenset(voices)  # None: any preset name is known
        self.echo = echo  # answer each caller frame with the previous one (the first: silence); else a tone
        self.texts = list(texts)  # agent text, one piece after each of the first agent frames
        self.priming_delay = priming_delay  # seconds between the start message and ready
        self.start_timeout = start_timeout  # seconds to wait for the start message (then 4408)
        self.draining = False  # new sessions are refused with 1013
        self.refuse_personas: dict[str, str] = {}  # prompt -> reason: 4422 for a persona with that prompt
        self.sessions: dict[str, FakeSession] = {}  # every session that became ready, by id
        self.refusals: list[tuple[int, str]] = []  # (close code, reason) of every session refused
        self.unauthorized = 0  # upgrades answered 401
        self.cached: set[str] = set()  # persona keys primed
        self._stalled = False
        self._server: Server | None = None
        self._port = 0
        self._connections: set[ServerConnection] = set()

    # ------------------------------------------------------------------ serving

    async def start(self) -> Self:
        """Serve (again, after ``vanish``: on the same port, as a restarted worker would)."""
        self._stalled = False
        self._server = await serve(self._handle, "127.0.0.1", self._port, process_request=self._check_request,
                                   compression=None, max_size=2**22)
        self._port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop accepting connections; those open are left as they are (``__aexit__`` and ``vanish`` drop them)."""
        if self._server is not None:
            self._server.close(close_connections=False)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._stalled = False
        for ws in list(self._connections):
            ws.transport.abort()
        await self.close()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/v1/sessions"

    @property
    def active(self) -> list[str]:
        """The ids of the sessions in progress."""
        return [s.id for s in self.sessions.values() if s.ended is None]

    def state(self, **changes: Any) -> WorkerState:
        """This worker's heartbeat as a real worker would send it (``changes`` override fields)."""
        fields: dict[str, Any] = {
            "worker_id": self.worker_id, "url": self.url, "capacity": self.slots, "active_calls": tuple(self.active),
            "draining": self.draining, "cached_personas": tuple(sorted(self.cached))}
        return WorkerState(**(fields | changes))

    # ------------------------------------------------------------------ misbehaving on purpose

    async def vanish(self) -> None:
        """The process is gone: every connection dropped without a close frame (the client reads 1006), and no
        new connection is accepted."""
        for session in self.sessions.values():
            if session.ended is None:
                session.ended = "vanished"
        for ws in list(self._connections):
            ws.transport.abort()
        await self.close()

    def stall(self) -> None:
        """The process hangs (SIGSTOP): nothing more is read or answered, pings included, sockets stay open."""
        self._stalled = True
        for ws in list(self._connections):
            ws.transport.pause_reading()

    async def end_session(self, session_id: str, code: int = CloseCode.NORMAL, reason: str = "session ended") -> None:
        """The worker ends one session itself with ``code`` (1000: its verdict; 1001: it is shutting down)."""
        session = self.sessions[session_id]
        session.ended = "worker_end"
        assert session.connection is not None
        await session.connection.close(code, reason)

    # ------------------------------------------------------------------ the protocol

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path != "/v1/sessions":
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        verdict = self.secrets.check(request.headers)
        if verdict != "ok":  # before the upgrade, as the real worker: nothing read, no slot counted
            self.unauthorized += 1
            headers = Headers({"WWW-Authenticate": "Bearer", "Content-Type": "application/json"})
            body = json.dumps({"error": f"{verdict} shared secret"}).encode()
            return Response(http.HTTPStatus.UNAUTHORIZED, "Unauthorized", headers, body)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self._connections.add(ws)
        if self._stalled:
            ws.transport.pause_reading()
        try:
            await self._session(ws)
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(ws)

    async def _refuse(self, ws: ServerConnection, code: int, reason: str) -> None:
        self.refusals.append((int(code), reason))
        await ws.close(code, reason)

    async def _session(self, ws: ServerConnection) -> None:
        if self.draining:
            return await self._refuse(ws, CloseCode.TRY_AGAIN_LATER, DRAINING_REASON)
        try:
            message = await asyncio.wait_for(ws.recv(), self.start_timeout)
        except TimeoutError:
            return await self._refuse(ws, CloseCode.START_TIMEOUT, "no start message received in time")
        try:
            start = json.loads(message) if isinstance(message, str) else None
        except json.JSONDecodeError:
            start = None
        if not isinstance(start, dict) or start.get("type") != MessageType.START:
            return await self._refuse(ws, CloseCode.BAD_REQUEST, 'the first message must be {"type": "start", ...}')
        spec = start.get("persona")
        try:
            persona = persona_from_message(spec)
        except PersonaFormatError as exc:
            return await self._refuse(ws, CloseCode.BAD_REQUEST, str(exc))
        except PersonaError as exc:
            return await self._refuse(ws, CloseCode.PERSONA_REJECTED, str(exc))
        if self.voices is not None and persona.voice is not None and persona.voice not in self.voices:
            return await self._refuse(ws, CloseCode.PERSONA_REJECTED, f"unknown voice preset {persona.voice!r}")
        if persona.prompt in self.refuse_personas:
            return await self._refuse(ws, CloseCode.PERSONA_REJECTED, self.refuse_personas[persona.prompt])
        session_id = start.get("session_id") or f"session-{next(_ids)}"
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 128:
            return await self._refuse(ws, CloseCode.BAD_REQUEST, "start.session_id must be a string of 1 to 128 "
                                                                 "characters, no control characters")
        if self.draining:  # the drain began while the start was on its way
            return await self._refuse(ws, CloseCode.TRY_AGAIN_LATER, DRAINING_REASON)
        if len(self.active) >= self.slots:
            return await self._refuse(ws, CloseCode.NO_FREE_SLOT, f"all {self.slots} slots are in use")
        key = persona_key(spec)
        cached = key in self.cached
        session = FakeSession(session_id, dict(spec), len(self.active), cached, connection=ws)
        self.sessions[session_id] = session  # the slot is taken from here on, priming included
        try:
            began = time.monotonic()
            if self.priming_delay and not await self._primed(ws):
                return  # the client left while the persona primed
            self.cached.add(key)
            await ws.send(json.dumps({"type": MessageType.READY, "session_id": session_id, "slot": session.slot,
                                      "start_ms": round((time.monotonic() - began) * 1000, 2),
                                      "persona_cached": cached}))
            await self._converse(ws, session)
        finally:
            if session.ended is None:
                session.ended = "client_gone"

    async def _primed(self, ws: ServerConnection) -> bool:
        """Wait ``priming_delay``; False if the connection closed meanwhile (the slot is freed at once)."""
        priming = asyncio.ensure_future(asyncio.sleep(self.priming_delay))
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            await asyncio.wait({priming, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            priming.cancel()
            closed.cancel()
        return priming.done() and not priming.cancelled()

    async def _converse(self, ws: ServerConnection, session: FakeSession) -> None:
        previous = SILENCE
        texts = iter(self.texts)
        async for message in ws:
            if isinstance(message, bytes):
                if len(message) != FRAME_BYTES:
                    session.ended = "protocol_error"
                    return await self._refuse(ws, CloseCode.BAD_REQUEST, f"audio frame must be {FRAME_BYTES} bytes "
                                                                         f"(1920 samples s16le, 80 ms), got "
                                                                         f"{len(message)}")
                session.frames_in += 1
                agent, previous = (previous, message) if self.echo else (TONE, message)
                await ws.send(agent)
                session.frames_out += 1
                if (text := next(texts, None)) is not None:
                    await ws.send(json.dumps({"type": MessageType.TEXT, "text": text}))
                continue
            try:
                control = json.loads(message)
            except json.JSONDecodeError:
                control = None
            if isinstance(control, dict) and control.get("type") == MessageType.END:
                session.ended = "client_end"
                return await ws.close(CloseCode.NORMAL, "session ended: client_end")
            session.ended = "protocol_error"
            return await self._refuse(ws, CloseCode.BAD_REQUEST, "unexpected control message")


@contextlib.asynccontextmanager
async def in_process_calls(registry: TenantRegistry, *workers: FakeWorker, auth: WorkerAuth = WORKER_AUTH,
                           **options: float) -> AsyncIterator[Calls]:
    """The gateway's ``Calls`` on an in-process store where ``workers`` have sent one heartbeat each, started
    (its lease and reaper loops run). ``options``: Calls' timings, and ``worker_ttl`` for the store."""
    metrics = GatewayMetrics()
    router = EmbeddedRouter(worker_ttl=options.pop("worker_ttl", 60.0), metrics=RoutingMetrics(metrics.registry))
    for worker in workers:
        await router.heartbeat(worker.state())
    timings = {"session_start_timeout": scaled(5.0), "rehome_deadline": scaled(3.0)} | options
    async with Calls(router, registry, metrics=metrics, worker_auth=auth, **timings) as calls:  # type: ignore[arg-type]
        yield calls
