"""An inbound SIP call's life on the asyncio side: an explicit state machine over one ``Leg``.

Contract: ``InboundCall`` moves through ``SipCallState`` (ringing → progress → answering → live → ending →
ended, or bridged, refused, cancelled), answering only once the agent session is ready, and ends by exactly
one reason, recorded in its call record with each state's entry time (``history``). Hold pauses the agent
without a state of its own.

Details (each state, what ends it, hold): docs/sip.md#a-calls-states.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from personagate_common.routing import Refusal

from ..calls import AgentCall, Calls, PersonaRejected
from ..worker_client import AgentAudio, AgentText
from .bridge import HumanLeg
from .leg import Leg, LegEvent
from .media import RINGBACK, MediaBridge, PortMedia
from .metrics import SipMetrics
from .recording import CallRecorder, finish_recording, start_recording

if TYPE_CHECKING:
    from ..tenants.tenant import PersonaConfig, Tenant
    from .ua import UserAgent

log = logging.getLogger(__name__)


class SipCallState(enum.StrEnum):
    RINGING = "ringing"
    PROGRESS = "progress"
    ANSWERING = "answering"
    LIVE = "live"
    BRIDGED = "bridged"
    ENDING = "ending"
    ENDED = "ended"
    REFUSED = "refused"
    CANCELLED = "cancelled"


S = SipCallState
TRANSITIONS: dict[SipCallState, frozenset[SipCallState]] = {
    S.RINGING: frozenset({S.PROGRESS, S.REFUSED, S.CANCELLED}),
    S.PROGRESS: frozenset({S.ANSWERING, S.REFUSED, S.CANCELLED}),
    S.ANSWERING: frozenset({S.LIVE, S.BRIDGED, S.ENDING, S.CANCELLED}),
    S.LIVE: frozenset({S.BRIDGED, S.ENDING}),
    S.BRIDGED: frozenset({S.ENDING}),
    S.ENDING: frozenset({S.ENDED}),
    S.ENDED: frozenset(),
    S.REFUSED: frozenset(),
    S.CANCELLED: frozenset(),
}

BUSY = 486
UNAVAILABLE = 503
TRANSFER_TIMEOUT = 10.0  # seconds from the REFER to a final NOTIFY; after it the caller stays with the agent
SESSION_TIMER_REASON = "session_timer"
SESSION_TIMER_STATUS = 408  # pjsip's BYE for an unrefreshed session: Reason: SIP;cause=408;text="No session refresh received."


def refusal_answer(exc: Refusal) -> tuple[int, str, dict[str, str]]:
    """The SIP answer to a ``Refusal``: 486 for the tenant's own limit, else 503 with Retry-After."""
    if exc.reason == "tenant_limit":
        return BUSY, "Busy Here", {}
    reason = {"no_capacity": "No Agent Available", "unavailable": "Service Unavailable",
              "draining": "Gateway Draining"}.get(exc.reason, "Service Unavailable")
    return UNAVAILABLE, reason, {"Retry-After": str(max(1, math.ceil(exc.retry_after_seconds)))}


class HoldGate:
    """The agent call as the media bridge sees it: while the caller holds us, the caller's audio is not sent
    (the worker steps a session only on caller audio: the model pauses) and agent audio is dropped."""

    def __init__(self, agent: AgentCall, is_held: Callable[[], bool]) -> None:
        self.agent = agent
        self.is_held = is_held
        self.call_id = agent.call_id

    def send(self, frame: bytes) -> None:
        if not self.is_held():
            self.agent.send(frame)

    async def frames(self) -> AsyncIterator[AgentAudio | AgentText]:
        async for event in self.agent.frames():
            if isinstance(event, AgentAudio) and self.is_held():
                continue
            yield event


class InboundCall:
    """Made on the pjsua thread when an INVITE is routed (180 already sent); runs on the event loop."""

    def __init__(self, *, ua: UserAgent, leg: Leg, sip_call_id: str, number: str, caller: str, tenant: Tenant,
                 persona: PersonaConfig, calls: Calls, answer_timeout: float, retry_after: float, media_timeout: float,
                 max_call_seconds: float | None,
                 loop: asyncio.AbstractEventLoop, metrics: SipMetrics, bridge_fallback: bool = True,
                 ring_timeout: float = 30.0, recordings_dir: Path | None = None,
                 caller_first_wait: float | None = None, ringing_interval: float = 1.0, transport: str = "udp") -> None:
        self.ua = ua
        # The loop side keeps the leg's serial, never the leg: ``UserAgent`` keeps it on the pjsua thread until it
        # is disconnected, so it is always destroyed there (pjlib asserts when a call is destroyed on another).
        self.leg_serial = leg.serial
        self.sip_call_id = sip_call_id
        self.number = number
        self.caller = caller
        self.transport = transport  # the INVITE's: udp, tcp or tls
        self.srtp = False  # the audio is SRTP (as last negotiated)
        self.tenant = tenant
        self.persona = persona
        self.calls = calls
        self.answer_timeout = answer_timeout
        self.retry_after = retry_after
        self.media_timeout = media_timeout
        self.ringing_interval = ringing_interval
        self.max_call_seconds = max_call_seconds  # the gateway's cap; the tenant's limits.max_call_seconds applies too
        self.loop = loop
        self.metrics = metrics
        self.recordings_dir = recordings_dir
        self.caller_first_wait = caller_first_wait  # speaks_first: false; None: as long as the call lasts
        self.recorder: CallRecorder | None = None
        self.announced_at: float | None = None  # when the consent announcement's last frame went out
        self.buffers = cast(PortMedia, leg.buffers)
        self.state = S.RINGING
        self.history: list[tuple[SipCallState, float]] = [(S.RINGING, time.monotonic())]
        self.agent: AgentCall | None = None
        self.answer: tuple[int, str] | None = None  # a refusal sent
        self.end_reason: str | None = None
        self.first_agent_audio: float | None = None
        self.answered_at: float | None = None
        self.rtp: dict[str, object] = {}  # the audio stream's receive statistics, when the dialog ended
        self._gone = asyncio.Event()  # the dialog is over (CANCEL, BYE, or any disconnect)
        self._confirmed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.dtmf: list[str] = []  # digits received, in order
        self.transfer_result: str | None = None  # the last escalation attempt's (see metrics.transfers)
        self.transfer_method: str | None = None  # refer, or bridge (the fallback)
        self.transfer_attempts: list[dict[str, object]] = []
        self.bridge_fallback = bridge_fallback
        self.ring_timeout = ring_timeout
        self.human: HumanLeg | None = None  # the bridged human's leg
        self.bridge_ended_by: str | None = None  # caller, human, media_timeout, or shutdown
        self.transfer_timeout = TRANSFER_TIMEOUT
        self._transfer_final: asyncio.Future[LegEvent] | None = None  # a REFER awaiting its final NOTIFY
        self._escalation: asyncio.Task[None] | None = None
        self._transferred = asyncio.Event()  # the escalation target took the call
        self.held = False  # the caller holds us (their last offer lets us not send)
        self.holds = 0
        self.held_seconds = 0.0  # completed holds; ``held_total()`` adds the one in progress
        self._held_since: float | None = None
        self._media_held = False  # the last negotiation's verdict, also before the answer (an INVITE on hold)
        self.disconnect: tuple[int, str] = (0, "")  # pjsua's last status and reason when the dialog ended
        leg.events = lambda event: loop.call_soon_threadsafe(self._on_event, event)

    # ------------------------------------------------------------------ pjsua → loop

    def _on_event(self, event: LegEvent) -> None:
        if event.kind == "confirmed":
            self._confirmed.set()
        elif event.kind == "disconnected":
            self.rtp = event.stats
            self.disconnect = (event.status, event.reason)
            self._hold(False)
            self._gone.set()
        elif event.kind == "media":
            self._media_held = bool(event.headers.get("held"))
            self.srtp = bool(event.headers.get("srtp"))
            if self.state in (S.ANSWERING, S.LIVE, S.BRIDGED):  # bridged too: a hold there is no media timeout either
                self._hold(self._media_held, event.headers.get("direction", ""))
        elif event.kind == "dtmf":
            self._digit(event.reason, event.headers.get("method", "rfc4733"))
        elif event.kind == "transfer":
            log.info("transfer progress: %d %s", event.status, event.reason,
                     extra={"sip_call_id": self.sip_call_id, "final": bool(event.headers.get("final"))})
            final = self._transfer_final
            if final is not None and not final.done() and (event.headers.get("final") or event.status >= 200):
                final.set_result(event)

    def _hold(self, held: bool, direction: str = "") -> None:
        if held == self.held:
            return
        self.held = held
        now = time.monotonic()
        extra = {"sip_call_id": self.sip_call_id, "tenant": self.tenant.id, "direction": direction}
        if held:
            self.holds += 1
            self._held_since = now
            self.buffers.pacer.flush()  # agent audio queued before the hold is stale by the resume
            self.metrics.holds.inc()
            self.metrics.calls_held.inc()
            log.info("the caller put the call on hold", extra=extra)
        else:
            assert self._held_since is not None
            seconds = now - self._held_since
            self.held_seconds += seconds
            self._held_since = None
            self.metrics.held_seconds.observe(seconds)
            self.metrics.calls_held.dec()
            log.info("the caller resumed the call after %.1f s on hold", seconds, extra=extra)

    def held_total(self) -> float:
        """Seconds on hold so far, the hold in progress included."""
        ongoing = time.monotonic() - self._held_since if self._held_since is not None else 0.0
        return self.held_seconds + ongoing

    def _digit(self, digit: str, method: str) -> None:
        self.dtmf.append(digit)
        self.metrics.dtmf.labels(method=method).inc()
        escalation = self.tenant.spec.escalation
        escalate = (escalation is not None and digit == escalation.dtmf_digit and self.state in (S.ANSWERING, S.LIVE)
                    and (self._escalation is None or self._escalation.done()) and not self._transferred.is_set())
        relay = self.state is S.BRIDGED and self.human is not None
        log.info("DTMF %s (%s)%s", digit, method, ": escalating" if escalate else ": to the human" if relay else "",
                 extra={"sip_call_id": self.sip_call_id, "tenant": self.tenant.id})
        if relay:
            assert self.human is not None
            self.human.send_dtmf(digit)  # the human's side may be a PBX menu or queue that asks for keys
        if escalate:
            assert escalation is not None
            self._escalation = asyncio.create_task(self._escalate(escalation.transfer_to),
                                                   name=f"sip-transfer-{self.sip_call_id}")

    async def _escalate(self, target: str) -> None:
        """Blind transfer to ``target`` (REFER); 2xx ends the call (``transfer``). A refused or failed REFER
        falls back to the gateway's own call to ``target``, bridged when answered; anything else keeps the
        caller with the agent."""
        result = await self._refer(target)
        if result in ("success", "timeout") or not self.bridge_fallback:
            return  # a timed-out REFER may still complete on the caller's side: calling the human too could ring twice
        human = HumanLeg(ua=self.ua, caller_serial=self.leg_serial, target=target, ring_timeout=self.ring_timeout,
                         loop=self.loop, sip_call_id=self.sip_call_id)
        log.info("calling %s to bridge the caller (the REFER %s)", target, result,
                 extra={"sip_call_id": self.sip_call_id, "tenant": self.tenant.id})
        try:
            result = await human.connect()
        except asyncio.CancelledError:
            if self._gone.is_set():  # the caller hung up while the human's phone rang (the INVITE is cancelled)
                self._transfer_done("bridge", "abandoned", target, human.status, "the caller hung up")
            raise
        self._transfer_done("bridge", result, target, human.status, human.reason)
        if result == "success":
            self.human = human
            self._transferred.set()

    async def _stop_escalation(self) -> None:
        """Cancel an escalation in progress (a REFER awaiting its NOTIFY, or the human's phone ringing: its
        INVITE is cancelled)."""
        if self._escalation is not None and not self._escalation.done():
            self._escalation.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._escalation

    def _transfer_done(self, method: str, result: str, target: str, status: int | None, why: str = "") -> None:
        self.transfer_method, self.transfer_result = method, result
        self.transfer_attempts.append({"method": method, "result": result, "status": status})
        self.metrics.transfers.labels(result=result, method=method).inc()
        extra = {"sip_call_id": self.sip_call_id, "tenant": self.tenant.id, "transfer_to": target,
                 "method": method, "status": status, "result": result, "why": why}
        if result == "success":
            log.info("call transferred to %s (%s)", target, method, extra=extra)
        else:
            log.warning("transfer to %s by %s did not complete (%s): the caller stays with the agent", target,
                        method, result, extra=extra)

    async def _refer(self, target: str) -> str:
        final = self._transfer_final = self.loop.create_future()
        self._command("transfer", target)
        try:
            async with asyncio.timeout(self.transfer_timeout):
                event = await final
        except TimeoutError:
            result, status = "timeout", None
        else:
            status = event.status
            result = "success" if 200 <= status < 300 else "failed"
        finally:
            self._transfer_final = None
        self._transfer_done("refer", result, target, status)
        if result == "success":
            self._transferred.set()
        return result

    def _command(self, fn_name: str, *args: object) -> None:
        """``Leg.fn_name(*args)`` on the pjsua thread; a no-op once the leg is gone (its dialog is over)."""
        self.ua.post(lambda: self._on_leg(fn_name, *args))

    def _on_leg(self, fn_name: str, *args: object) -> Any:
        """(pjsua thread) ``Leg.fn_name(*args)``, or None if the leg is gone."""
        leg = self.ua.kept(self.leg_serial)
        return getattr(leg, fn_name)(*args) if isinstance(leg, Leg) else None

    def _to(self, state: SipCallState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"SIP call {self.sip_call_id}: no transition {self.state} -> {state}")
        self.state = state
        self.history.append((state, time.monotonic()))

    @property
    def done(self) -> bool:
        return self.state in (S.ENDED, S.REFUSED, S.CANCELLED)

    # ------------------------------------------------------------------ the call

    def begin(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"sip-call-{self.sip_call_id}")

    async def _run(self) -> None:
        try:
            await self._set_up()
            if self.agent is not None:
                await self._converse(self.agent)
        except asyncio.CancelledError:  # the gateway is stopping
            self._hang_up(503, "Gateway Stopping")
            if self.agent is not None:
                await self.agent.end("shutdown")
            raise
        except Exception:
            log.exception("SIP call failed", extra={"sip_call_id": self.sip_call_id})
            self._hang_up(500, "Server Internal Error")
            if self.agent is not None:
                await self.agent.end("error")
        finally:
            if self.recorder is not None:  # the call failed before its own clean-up
                await self._stop_recording()

    def _hang_up(self, status: int, reason: str) -> None:
        """BYE if answered, else this final answer (a no-op once the dialog is over)."""
        self.buffers.ringback = None
        if any(state is S.ANSWERING for state, _ in self.history):
            self._command("bye")
        else:
            self._command("respond", status, reason, {"Retry-After": str(max(1, math.ceil(self.retry_after)))})

    async def _set_up(self) -> None:
        self._to(S.PROGRESS)
        self.buffers.ringback = RINGBACK
        self._command("respond", 183, "Session Progress")
        start = asyncio.create_task(self.calls.start(self._agent_call_id(), self.tenant, self.persona),
                                    name=f"sip-start-{self.sip_call_id}")
        gone = asyncio.create_task(self._gone.wait())
        ringing = asyncio.create_task(self._keep_ringing(), name=f"sip-ringing-{self.sip_call_id}")
        try:
            await asyncio.wait({start, gone}, timeout=self.answer_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            ringing.cancel()
            if not start.done():
                start.cancel()  # releases whatever was claimed
                with contextlib.suppress(BaseException):
                    await start
        if start.cancelled():
            if self._gone.is_set():
                self._to(S.CANCELLED)
                self.metrics.invites.labels(answer="cancelled").inc()
                log.info("SIP call cancelled before answer", extra={"sip_call_id": self.sip_call_id})
            else:
                self._refuse(UNAVAILABLE, "Agent Not Ready", {"Retry-After": str(max(1, math.ceil(self.retry_after)))},
                             "the session was not ready in time")
            return
        try:
            agent = start.result()
        except Refusal as exc:
            self._refuse(*refusal_answer(exc), exc.reason)
            return
        except PersonaRejected as exc:
            self._refuse(500, "Persona Rejected", {}, str(exc))
            return
        if self._gone.is_set():  # CANCEL raced the session's start
            await agent.end("hangup")
            self._to(S.CANCELLED)
            self.metrics.invites.labels(answer="cancelled").inc()
            return
        self.agent = agent

    async def _keep_ringing(self) -> None:
        """183 again every ``ringing_interval`` while the session is being claimed and primed."""
        while True:
            await asyncio.sleep(self.ringing_interval)
            if self.state is not S.PROGRESS or self._gone.is_set():
                return
            self._command("respond", 183, "Session Progress")
            self.metrics.provisionals_repeated.inc()

    def _refuse(self, status: int, reason: str, headers: dict[str, str], why: str) -> None:
        self.buffers.ringback = None
        self._to(S.REFUSED)
        self.answer = (status, reason)
        self._command("respond", status, reason, headers)
        self.metrics.invites.labels(answer=str(status)).inc()
        log.info("SIP call refused: %d %s", status, reason, extra={
            "sip_call_id": self.sip_call_id, "number": self.number, "tenant": self.tenant.id, "why": why})

    async def _start_recording(self) -> asyncio.Event | None:
        """With the tenant's recording on: the recorder started and the announcement queued to play from the
        answer; returns the event set once it has been played (None: no recording, nothing played)."""
        started = await start_recording(self.tenant, self.recordings_dir, self.sip_call_id,
                                        sip_call_id=self.sip_call_id)
        if started is None:
            return None
        self.recorder, frames = started
        self.buffers.recorder = self.recorder
        announced = asyncio.Event()

        def done() -> None:  # the bridge's clock thread
            self.loop.call_soon_threadsafe(self._announced, announced)

        self.buffers.announce(frames, done)
        return announced

    def _announced(self, announced: asyncio.Event) -> None:
        self.announced_at = time.monotonic()
        announced.set()

    async def _stop_recording(self) -> dict[str, object]:
        """The recorder detached and its file finished; what the call record says about it."""
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return {}
        self.buffers.recorder = None
        record = await finish_recording(recorder, sip_call_id=self.sip_call_id)
        self.metrics.recordings.labels(result="written" if record["recording"] else "failed").inc()
        return record

    async def _converse(self, agent: AgentCall) -> None:
        announced = await self._start_recording()
        gate = HoldGate(agent, lambda: self.held)
        bridge = MediaBridge(self.buffers, cast(AgentCall, gate), on_agent_audio=self._agent_audio,
                             hold_until=announced,
                             wait_for_caller=None if self.persona.speaks_first else self.caller_first_wait or math.inf)
        bridge.start()
        self.buffers.ringback = None
        self._to(S.ANSWERING)
        self._hold(self._media_held)  # a caller may call in already holding (a=sendonly)
        self._command("respond", 200, "OK")
        self.answered_at = time.monotonic()
        self.metrics.invites.labels(answer="200").inc()
        self.metrics.setup_seconds.observe(self.answered_at - self.history[0][1])
        ended = asyncio.create_task(agent.wait_ended())
        gone = asyncio.create_task(self._gone.wait())
        confirmed = asyncio.create_task(self._confirmed.wait())
        silent = asyncio.create_task(self._media_watch())
        limit = min(self.tenant.spec.limits.max_call_seconds, self.max_call_seconds or math.inf)
        too_long = asyncio.create_task(asyncio.sleep(limit))
        transferred = asyncio.create_task(self._transferred.wait())
        try:
            await asyncio.wait({ended, gone, confirmed, silent, too_long, transferred},
                               return_when=asyncio.FIRST_COMPLETED)
            if confirmed.done() and not any(t.done() for t in (gone, ended, silent, too_long, transferred)):
                self._to(S.LIVE)
                log.info("SIP call live", extra={
                    "sip_call_id": self.sip_call_id, "number": self.number, "tenant": self.tenant.id,
                    "persona": agent.persona_name, "setup_seconds": round(time.monotonic() - self.history[0][1], 3)})
                await asyncio.wait({ended, gone, silent, too_long, transferred}, return_when=asyncio.FIRST_COMPLETED)
            if self.human is not None and not gone.done():
                await self._stay_bridged(agent, bridge, gone, silent)  # returns when a side hangs up
            else:
                await self._stop_escalation()  # the call is ending: a human still ringing is not joined to it
            self._to(S.ENDING)
            if gone.done():
                self.end_reason = SESSION_TIMER_REASON if self._session_expired() else "hangup"
                await agent.end(self.end_reason)
            else:
                if transferred.done() and not ended.done():
                    await agent.end("transfer")  # the caller is with a human now: the session is released
                elif silent.done() and not ended.done():
                    log.warning("no RTP from the caller for %g s: hanging up", self.media_timeout,
                                extra={"sip_call_id": self.sip_call_id})
                    await agent.end("media_timeout")
                elif too_long.done() and not ended.done():
                    log.info("the call reached its maximum duration (%g s): hanging up", limit,
                             extra={"sip_call_id": self.sip_call_id, "tenant": self.tenant.id})
                    await agent.end("max_duration")
                self.end_reason = agent.end_reason
                self._command("bye")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await self._gone.wait()  # the BYE's answer: the dialog is over, its RTP counted
        finally:
            for task in (ended, gone, confirmed, silent, too_long, transferred):
                task.cancel()
            await self._stop_escalation()
            if self.human is not None and not self.human.gone.is_set():
                self.human.hang_up()  # answered as the caller hung up: never bridged, so BYE it here
            await bridge.stop()
            self._hold(False)  # a call ended on hold: the hold ends with it
            recording = await self._stop_recording()
        self._to(S.ENDED)
        stats = self.buffers.pacer.stats()
        self.metrics.outbound_underruns.inc(stats.underruns)
        self.metrics.outbound_shed.inc(stats.shed)
        self.metrics.caller_frames_dropped.inc(self.buffers.inbound_dropped)
        self.metrics.observe_rtp(self.rtp)
        self.metrics.calls.labels(transport=self.transport, srtp=str(self.srtp).lower()).inc()
        began = self.history[0][1]
        log.info("SIP call ended", extra={  # the call record: one JSON line per answered call
            "sip_call_id": self.sip_call_id, "tenant": self.tenant.id, "persona": agent.persona_name,
            "number": self.number, "caller": self.caller, "transport": self.transport, "srtp": self.srtp,
            "worker_id": agent.worker_id, "reason": self.end_reason,
            "setup_seconds": round(self.answered_at - began, 3) if self.answered_at else None,
            "first_agent_audio_seconds": round(self.first_agent_audio - self.answered_at, 3)
            if self.first_agent_audio and self.answered_at else None,
            "seconds": round(time.monotonic() - began, 2), "outbound_underruns": stats.underruns,
            "outbound_shed": stats.shed, "caller_frames_dropped": self.buffers.inbound_dropped,
            "dtmf": "".join(self.dtmf), "transfer": self.transfer_result, "transfer_method": self.transfer_method,
            "transfer_attempts": self.transfer_attempts, **self._bridge_record(), "holds": self.holds,
            "held_seconds": round(self.held_total(), 2), "sip_disconnect": " ".join(map(str, self.disconnect)),
            "consent_announced": round(self.announced_at - self.answered_at, 3)
            if self.announced_at and self.answered_at else None,
            "agent_released_seconds": round(bridge.released_at - self.answered_at, 3)
            if bridge.released_at and self.answered_at else None, "agent_released_by": bridge.released_by,
            **recording, **self.rtp})

    async def _stay_bridged(self, agent: AgentCall, bridge: MediaBridge, gone: asyncio.Task[bool],
                            silent: asyncio.Task[None]) -> None:
        """The caller ⇄ the human (joined in the conference bridge): the agent released, until either side
        hangs up or the caller's RTP stops; the human's leg is hung up here, the caller's by ``_converse``."""
        assert self.human is not None
        human = self.human
        self._to(S.BRIDGED)
        await agent.end("transfer")  # the human has the caller: the session and its slot are released
        await bridge.stop()
        log.info("caller bridged to %s", human.target, extra={"sip_call_id": self.sip_call_id,
                                                             "tenant": self.tenant.id})
        human_gone = asyncio.create_task(human.gone.wait())
        try:
            await asyncio.wait({gone, silent, human_gone}, return_when=asyncio.FIRST_COMPLETED)
            self.bridge_ended_by = ("caller" if gone.done() else "human" if human_gone.done()
                                    else "media_timeout")
        finally:
            human_gone.cancel()
            if not human.gone.is_set():
                self.bridge_ended_by = self.bridge_ended_by or "shutdown"
                human.hang_up()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await human.gone.wait()  # the BYE's answer: the human's RTP statistics are in
        log.info("bridged call over: %s hung up", self.bridge_ended_by,
                 extra={"sip_call_id": self.sip_call_id, "human_seconds": round(human.seconds or 0, 2)})

    def _bridge_record(self) -> dict[str, object]:
        """The human's leg in the call record (bridged calls only)."""
        human = self.human
        if human is None:
            return {}
        return {"human_leg_seconds": round(human.seconds, 2) if human.seconds is not None else None,
                "bridge_ended_by": self.bridge_ended_by, "human_sip_call_id": human.human_sip_call_id,
                "human_rtp_packets_received": human.rtp.get("rtp_packets_received")}

    async def _media_watch(self) -> None:
        """Returns once no RTP has come from the caller for ``media_timeout`` seconds (checked every second)."""
        last, since = -1, time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.media_timeout / 2))
            if self.held:  # no RTP on hold is legitimate; after the resume the timeout counts afresh
                since = time.monotonic()
                continue
            try:
                async with asyncio.timeout(2.0):
                    stats = await asyncio.wrap_future(self.ua.submit(lambda: self._on_leg("stream_stats") or {}))
            except TimeoutError:
                continue
            received = stats.get("rtp_packets_received", 0)
            if received != last:
                last, since = received, time.monotonic()
            elif time.monotonic() - since >= self.media_timeout:
                return

    def _session_expired(self) -> bool:
        """The dialog ended because the caller did not refresh the session (pjsua's RFC 4028 timer sent BYE)."""
        status, reason = self.disconnect
        return status == SESSION_TIMER_STATUS and any(word in reason.lower() for word in ("refresh", "timer"))

    def _agent_audio(self) -> None:
        if self.first_agent_audio is None:
            self.first_agent_audio = time.monotonic()
            if self.answered_at is not None:
                self.metrics.first_agent_audio_seconds.observe(self.first_agent_audio - self.answered_at)

    def _agent_call_id(self) -> str:
        """The SIP Call-ID as the call id: at most 128 characters and no control characters (the routing store
        refuses them, and pjsip lets a Call-ID such as "a\x12b" through); any other is shortened or has those
        characters replaced, kept unique by a hash of the whole."""
        call_id = self.sip_call_id
        printable = "".join("?" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in call_id)
        if len(call_id) <= 128 and printable == call_id:
            return call_id
        import hashlib

        return printable[:100] + "~" + hashlib.sha256(call_id.encode()).hexdigest()[:27]

    async def stop(self) -> None:
        """End the call now (the gateway is stopping): BYE or 503, and the agent call ended."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
