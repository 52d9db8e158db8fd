"""The worker's HTTP/WebSocket server: sessions on ``/v1/sessions``, probes, metrics.

Sessions and ``/v1/info`` (which names the calls in progress) are served only to callers that send one of
the worker's shared secrets (``Authorization: Bearer``, ``personagate_common/plane.py``): a WebSocket upgrade without it
is answered 401 before it is accepted, so no slot is ever taken for it. The probes and ``/metrics`` stay open.

The protocol is documented in docs/worker-protocol.md; its constants and close codes (``CloseCode``) are in
personagate_common/protocol.py. Draining (SIGTERM: no new sessions, calls in progress go on) is driven by
``drain.py``; registration with the gateways' routing store by ``registration.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from personagate_common.kube import PodDeletionCost, PodRef
from personagate_common.persona import Persona, PersonaError, PersonaFormatError, persona_from_message
from personagate_common.plane import AuthResult, SecretChecker
from personagate_common.protocol import FRAME_BYTES, SAMPLE_RATE, CloseCode, MessageType

from .config import SessionSampling, WorkerSettings
from .echo import EchoBundle, load_echo
from .metrics import WorkerMetrics
from .pool import PoolConfig, PoolFull, PoolStopped, Session, SessionEnded, SessionPool
from .registration import Registration

if TYPE_CHECKING:
    from .model import ModelBundle

log = logging.getLogger(__name__)


class ProtocolError(Exception):
    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Worker:
    """What the app serves: filled in once the model has loaded."""

    settings: WorkerSettings
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    bundle: ModelBundle | EchoBundle | None = None
    pool: SessionPool | None = None
    load_error: str | None = None
    sessions: set[Session] = field(default_factory=set)  # started (ready sent), until their handler ends
    starting: int = 0  # admitted session requests not yet started (reading the start message, priming)
    draining: bool = False  # SIGTERM: new sessions are refused, those in progress go on
    closing: bool = False  # the drain is over: sessions still running are being closed with 1001
    registration: Registration | None = None  # heartbeats to the routing store (redis_url set)
    secrets: SecretChecker = field(default_factory=lambda: SecretChecker(()))  # who may open sessions, read /v1/info
    refusals_logged: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)  # see _refused
    # Called on the event loop once the model has failed to load (``WorkerServer`` exits the process with
    # MODEL_LOAD_FAILED_EXIT); None: the worker stays up, unready, and /healthz reports the failure.
    on_load_failed: Callable[[str], None] | None = None
    _changed: asyncio.Event | None = field(default=None, repr=False)

    @property
    def active_session_ids(self) -> list[str]:
        """Ids of the sessions in progress (the gateway's call ids), sorted."""
        return sorted({session.id for session in self.sessions})

    @property
    def busy(self) -> int:
        """Sessions in progress and session requests being started."""
        return len(self.sessions) + self.starting

    def changed(self) -> asyncio.Event:
        """Set whenever a session request or a session ends (event loop only)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        self.changed().set()

    def start_draining(self) -> bool:
        """Refuse new sessions from now on, and fail readiness (``announce()`` tells the routing store).
        False if the worker was draining already."""
        if self.draining:
            return False
        self.draining = True
        self.metrics.draining.set(1)
        return True

    async def announce(self) -> None:
        """Tell the routing store (if any) the worker's state now, e.g. that it drains."""
        if self.registration is not None and self.pool is not None:
            await self.registration.beat()

    def close_sessions(self, reason: str = "shutdown") -> int:
        """End every session in progress (they close with 1001 for ``shutdown``); new starts end too."""
        self.closing = True
        sessions = list(self.sessions)
        for session in sessions:
            session.close(reason)
        return len(sessions)

    def load(self) -> None:
        """Load the model and start the pool (blocking: run it off the event loop)."""
        s = self.settings
        try:
            bundle: ModelBundle | EchoBundle
            if s.model == "echo":
                bundle = load_echo()  # no torch, no moshi: the model package is not even imported
            else:
                from .model import LOADERS
                from .model.threads import limit_interop_threads

                limit_interop_threads()
                if s.model == "personaplex":
                    bundle = LOADERS["personaplex"](s.weights, s.device)
                else:
                    bundle = LOADERS["tiny"](s.seed, s.device or "cpu")
            config = PoolConfig(
                capacity=s.resolved_slots(str(bundle.device)),
                input_backlog_frames=s.input_backlog_frames,
                output_backlog_frames=s.output_backlog_frames,
                prime_cache_size=s.prime_cache_size,
                sampling=s.sampling,
            )
            pool = SessionPool(bundle, config, self.metrics)
            if bundle.voices:
                pool.warm_up(Persona(prompt="Warm-up.", voice=min(bundle.voices)))
            pool.start()
        except Exception as exc:
            self.load_error = str(exc) or type(exc).__name__
            log.exception("model load failed: %s", self.load_error, extra={
                "model": s.model, "weights": str(s.weights) if s.weights is not None else None, "device": s.device})
            raise
        self.bundle, self.pool = bundle, pool
        log.info("worker ready", extra={"model": bundle.name, "device": str(bundle.device),
                                        "slots": config.capacity})


def create_app(settings: WorkerSettings) -> Starlette:
    """The worker app. It starts serving probes at once and loads the model in the background.
    Refuses (ValueError) settings with no session secret unless ``insecure_open_sessions`` says so."""
    problem = settings.open_plane_problem()
    if problem is not None:
        raise ValueError(problem)
    worker = Worker(settings, secrets=SecretChecker(settings.accepted_secrets))
    if not worker.secrets.enabled:
        log.warning("sessions and /v1/info are open to anyone who can connect (insecure_open_sessions)")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # A daemon thread, not the loop's executor: a SIGTERM during a long load must not wait for it to finish.
        threading.Thread(target=_load_quietly, args=(worker, asyncio.get_running_loop()), name="model-load",
                         daemon=True).start()
        heartbeats: asyncio.Task[None] | None = None
        if settings.redis_url is not None:
            worker.registration = Registration(worker, settings)
            heartbeats = asyncio.create_task(worker.registration.run(), name="heartbeats")
        deletion_cost: asyncio.Task[None] | None = None
        if settings.pod_deletion_cost:
            deletion_cost = asyncio.create_task(
                PodDeletionCost(PodRef.in_cluster(), lambda: len(worker.active_session_ids()),
                                worker.metrics.registry).run(), name="pod-deletion-cost")
        try:
            yield
        finally:
            if deletion_cost is not None:
                deletion_cost.cancel()
            worker.close_sessions("shutdown")
            if heartbeats is not None:
                heartbeats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeats
            if worker.registration is not None:
                await worker.registration.farewell()
                await worker.registration.close()
            if worker.pool is not None:
                worker.pool.stop()

    async def healthz(request: Request) -> Response:
        return _healthz(worker)

    async def readyz(request: Request) -> Response:
        return _readyz(worker)

    async def metrics(request: Request) -> Response:
        return _metrics(worker)

    async def info(request: Request) -> Response:
        verdict = worker.secrets.check(request.headers)
        if verdict != "ok":
            _refused(worker, "info", verdict, request.client)
            return _unauthorized(verdict)
        return _info(worker)

    async def sessions(ws: WebSocket) -> None:
        await _session(worker, ws)

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/v1/info", info),
            WebSocketRoute("/v1/sessions", sessions),
        ],
        lifespan=lifespan,
    )
    app.state.worker = worker
    return app


def _load_quietly(worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
    """Load the model (model-load thread); on failure, hand ``worker.on_load_failed`` the reason on ``loop``.
    The failure itself is reported through ``load_error`` (/healthz, /readyz) and the log (``Worker.load``)."""
    try:
        worker.load()
    except Exception:  # noqa: BLE001 (any failure to load is the same verdict: this worker cannot serve)
        callback = worker.on_load_failed
        if callback is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: the process is exiting anyway
                loop.call_soon_threadsafe(callback, worker.load_error or "unknown error")


def _healthz(worker: Worker) -> Response:
    if worker.load_error is not None:
        return JSONResponse({"status": "failed", "reason": worker.load_error}, status_code=500)
    if worker.pool is not None and not worker.pool.alive:
        return JSONResponse({"status": "failed", "reason": "the tick thread has stopped"}, status_code=500)
    return JSONResponse({"status": "ok"})


def _readyz(worker: Worker) -> Response:
    if worker.draining:
        return JSONResponse({"ready": False, "reason": "draining"}, status_code=503)
    if worker.pool is None:
        reason = worker.load_error or "loading the model"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)
    if not worker.pool.alive:
        return JSONResponse({"ready": False, "reason": "the tick thread has stopped"}, status_code=503)
    return JSONResponse({"ready": True, "free_slots": worker.pool.free_slots})


def _metrics(worker: Worker) -> Response:
    return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _info(worker: Worker) -> Response:
    if worker.pool is None or worker.bundle is None:
        return JSONResponse({"ready": False, "draining": worker.draining}, status_code=503)
    return JSONResponse({
        "ready": not worker.draining and worker.pool.alive,
        "draining": worker.draining,
        "worker_id": worker.settings.resolved_worker_id(),
        "model": worker.bundle.name,
        "device": str(worker.bundle.device),
        "slots": worker.pool.config.capacity,
        "free_slots": worker.pool.free_slots,
        "voices": sorted(worker.bundle.voices),
        "active_sessions": worker.active_session_ids,
        "cached_personas": worker.pool.cached_personas,
        "frame_bytes": FRAME_BYTES,
        "sample_rate": SAMPLE_RATE,
    })


# ---------------------------------------------------------------------------- sessions


DRAINING_REASON = "the worker is draining"


UNAUTHORIZED_REASONS: dict[AuthResult, str] = {
    "missing": "a shared secret is needed: Authorization: Bearer <the worker's session secret>",
    "wrong": "the shared secret is not one this worker accepts",
}


def _unauthorized(verdict: AuthResult) -> Response:
    return JSONResponse({"error": UNAUTHORIZED_REASONS[verdict]}, status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="personagate-worker"'})


REFUSAL_LOG_SECONDS = 10.0  # at most one log line per endpoint and reason this often: a scanner cannot flood the log


def _refused(worker: Worker, endpoint: str, verdict: AuthResult, client: Any) -> None:
    """Count a request refused for its credential, and log it (at most every REFUSAL_LOG_SECONDS per endpoint and
    reason, with how many more there were); the secret it carried is never logged."""
    worker.metrics.unauthorized.labels(endpoint, verdict).inc()
    if endpoint == "sessions":
        worker.metrics.sessions_refused.labels("unauthorized").inc()
    key = (endpoint, verdict)
    now = time.monotonic()
    last, unlogged = worker.refusals_logged.get(key, (float("-inf"), 0))
    if now - last < REFUSAL_LOG_SECONDS:
        worker.refusals_logged[key] = (last, unlogged + 1)
        return
    worker.refusals_logged[key] = (now, 0)
    log.warning("request refused: %s credential", verdict, extra={
        "endpoint": endpoint, "client": f"{client.host}:{client.port}" if client else None,
        "refused_unlogged_since_last": unlogged})


async def _session(worker: Worker, ws: WebSocket) -> None:
    verdict = worker.secrets.check(ws.headers)
    if verdict != "ok":  # before the upgrade is accepted: nothing is read, no slot is counted
        _refused(worker, "sessions", verdict, ws.client)
        if "websocket.http.response" in ws.scope.get("extensions", {}):
            await ws.send_denial_response(_unauthorized(verdict))
        else:  # a server without the denial extension: refusing the upgrade answers 403
            await ws.close(CloseCode.POLICY_VIOLATION, UNAUTHORIZED_REASONS[verdict])
        return
    await ws.accept()
    if worker.draining:  # before anything else: the gateway tries another worker
        worker.metrics.sessions_refused.labels("draining").inc()
        await _close(ws, CloseCode.TRY_AGAIN_LATER, DRAINING_REASON)
        return
    worker.starting += 1
    try:
        await _admitted_session(worker, ws)
    finally:
        worker._notify()


async def _admitted_session(worker: Worker, ws: WebSocket) -> None:
    opened = time.monotonic()
    session: Session | None = None
    starting = True
    try:
        if worker.pool is None:
            raise ProtocolError(CloseCode.TRY_AGAIN_LATER, worker.load_error or "the worker is loading its model")
        start = await _receive_start(ws, worker.settings)
        persona, sampling, session_id = _parse_start(start, worker.settings)
        if worker.draining:  # the start came after the drain began: no slot taken yet
            worker.metrics.sessions_refused.labels("draining").inc()
            raise ProtocolError(CloseCode.TRY_AGAIN_LATER, DRAINING_REASON)
        try:
            session = await worker.pool.open_session(persona, session_id, sampling=sampling)
        except PoolFull as exc:
            raise ProtocolError(CloseCode.NO_FREE_SLOT, str(exc)) from exc
        except PoolStopped as exc:
            raise ProtocolError(CloseCode.TRY_AGAIN_LATER, str(exc)) from exc
        except PersonaError as exc:
            raise ProtocolError(CloseCode.PERSONA_REJECTED, str(exc)) from exc
        worker.sessions.add(session)
        worker.starting -= 1
        starting = False
        if worker.closing:  # it was priming while a drain ran out of time
            session.close("shutdown")
            raise ProtocolError(CloseCode.GOING_AWAY, "the worker is shutting down")
        log.info("session started", extra={"session": session.id, "slot": session.slot,
                                           "persona": session.persona_hash, "persona_cached": session.cached,
                                           "sampling": "greedy" if worker.settings.sampling.greedy
                                           else session.sampling.model_dump(),
                                           "start_ms": round(session.start_seconds * 1000, 2)})
        await ws.send_text(json.dumps({
            "type": MessageType.READY,
            "session_id": session.id,
            "slot": session.slot,
            "start_ms": round(session.start_seconds * 1000, 2),
            "persona_cached": session.cached,
        }))
        await _converse(ws, session)
    except ProtocolError as exc:
        if session is not None:
            session.close("protocol_error")
        elif exc.code == CloseCode.PERSONA_REJECTED:  # at parse time (prompt, clip size) or at priming
            worker.metrics.sessions_refused.labels("persona_rejected").inc()
        await _close(ws, exc.code, exc.reason)
    except WebSocketDisconnect:
        if session is not None:
            session.close("client_gone")
    except Exception:
        log.exception("session failed", extra={"session": session.id if session else None})
        if session is not None:
            session.close("worker_error")
        await _close(ws, CloseCode.INTERNAL_ERROR, "internal error")
    finally:
        if starting:
            worker.starting -= 1
        if session is not None:
            worker.sessions.discard(session)
            extra = {"session": session.id, "reason": session.end_reason,
                     "seconds": round(time.monotonic() - opened, 2)}
            if worker.draining:
                extra["sessions_left"] = worker.busy
            log.info("session ended", extra=extra)


async def _receive_start(ws: WebSocket, settings: WorkerSettings) -> dict[str, Any]:
    try:
        message = await asyncio.wait_for(ws.receive(), settings.start_timeout_seconds)
    except TimeoutError as exc:
        raise ProtocolError(CloseCode.START_TIMEOUT, "no start message received in time") from exc
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        raise ProtocolError(CloseCode.BAD_REQUEST, "the first message must be a JSON start message (text)")
    try:
        start = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(CloseCode.BAD_REQUEST, f"start message is not JSON: {exc.msg}") from exc
    if not isinstance(start, dict) or start.get("type") != MessageType.START:
        raise ProtocolError(CloseCode.BAD_REQUEST, 'the first message must be {"type": "start", ...}')
    return start


def _parse_start(
    start: dict[str, Any], settings: WorkerSettings
) -> tuple[Persona, SessionSampling, str | None]:
    spec = start.get("persona")
    try:
        persona = persona_from_message(spec, max_voice_bytes=settings.max_voice_bytes)
    except PersonaFormatError as exc:
        raise ProtocolError(CloseCode.BAD_REQUEST, str(exc)) from exc
    except PersonaError as exc:
        raise ProtocolError(CloseCode.PERSONA_REJECTED, str(exc)) from exc
    session_id = start.get("session_id")
    if session_id is not None and (
        not isinstance(session_id, str) or not 0 < len(session_id) <= 128
        or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in session_id)
    ):
        raise ProtocolError(
            CloseCode.BAD_REQUEST, "start.session_id must be a string of 1 to 128 characters, no control characters")
    sampling = _parse_sampling(spec.get("sampling", {}), settings)
    return persona, sampling, session_id


def _parse_sampling(spec: Any, settings: WorkerSettings) -> SessionSampling:
    """``persona.sampling``: any of the four settings, the worker's defaults for the others."""
    if not isinstance(spec, dict):
        raise ProtocolError(CloseCode.BAD_REQUEST, "start.persona.sampling must be an object")
    fields = SessionSampling.model_fields
    for key in spec:
        if key not in fields:
            raise ProtocolError(
                CloseCode.BAD_REQUEST,
                f"start.persona.sampling has unknown field {key!r}; expected {', '.join(fields)}",
            )
    given: dict[str, float | int] = {}
    for key, value in spec.items():
        integral = fields[key].annotation is int
        if isinstance(value, bool) or not isinstance(value, int if integral else int | float):
            kind = "an integer" if integral else "a number"
            raise ProtocolError(CloseCode.BAD_REQUEST, f"start.persona.sampling.{key} must be {kind}")
        low, high, open_low = SessionSampling.bounds(key)
        if not ((low < value) if open_low else (low <= value)) or not value <= high:
            raise ProtocolError(
                CloseCode.PERSONA_REJECTED,
                f"persona.sampling.{key} must be in {SessionSampling.bounds_text(key)}, got {value:g}",
            )
        given[key] = value
    return SessionSampling(**(settings.sampling.session_defaults().model_dump() | given))


async def _converse(ws: WebSocket, session: Session) -> None:
    """Pump audio both ways until either side ends; the first to finish ends the other."""
    uplink = asyncio.create_task(_uplink(ws, session))
    downlink = asyncio.create_task(_downlink(ws, session))
    done, pending = await asyncio.wait({uplink, downlink}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    for task in done:
        task.result()  # re-raise ProtocolError / WebSocketDisconnect
    if session.end_reason in ("shutdown",):
        await _close(ws, CloseCode.GOING_AWAY, "the worker is shutting down")
    elif session.end_reason == "worker_error":
        await _close(ws, CloseCode.INTERNAL_ERROR, "the worker failed")
    else:
        await _close(ws, CloseCode.NORMAL, f"session ended: {session.end_reason}")


async def _uplink(ws: WebSocket, session: Session) -> None:
    while not session.closed:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            session.close("client_gone")
            raise WebSocketDisconnect(message.get("code", 1000))
        data = message.get("bytes")
        if data is not None:
            try:
                session.push_audio(data)
            except ValueError as exc:
                raise ProtocolError(CloseCode.BAD_REQUEST, str(exc)) from exc
            except SessionEnded:
                return
            continue
        try:
            control = json.loads(message.get("text") or "")
        except json.JSONDecodeError as exc:
            raise ProtocolError(CloseCode.BAD_REQUEST, f"control message is not JSON: {exc.msg}") from exc
        if isinstance(control, dict) and control.get("type") == MessageType.END:
            session.close("client_end")
            return
        raise ProtocolError(CloseCode.BAD_REQUEST, 'unknown control message; expected {"type": "end"}')


async def _downlink(ws: WebSocket, session: Session) -> None:
    while True:
        try:
            frame = await session.receive()
        except SessionEnded:
            return
        await ws.send_bytes(frame.pcm)
        if frame.text:
            await ws.send_text(json.dumps({"type": MessageType.TEXT, "text": frame.text}))


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    if ws.application_state == WebSocketState.DISCONNECTED or ws.client_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(Exception):
        await ws.close(code, close_reason(reason))


def close_reason(reason: str, limit: int = 123) -> str:
    """``reason`` within a close frame's 123 bytes: a longer one is cut after its last whole word
    or list item that fits, and ends with an ellipsis."""
    if len(reason.encode()) <= limit:
        return reason
    ellipsis = "\u2026"
    cut = reason.encode()[: limit - len(ellipsis.encode())].decode(errors="ignore")
    head, sep, _ = cut.rpartition(" ")
    if sep and head:
        cut = head.rstrip(",;:")
    return cut + ellipsis
