"""An inbound SIP call: the call core (``gateway.call``) over one pjsua ``Leg``.

Contract: ``InboundCall`` moves through the core's ``CallState`` (ringing → connecting → answered → live →
ending → ended, or bridged, refused, cancelled), answering only once the agent session is ready, and ends by
exactly one reason, recorded in its call record. What is SIP's own is here: the provisional answers while the
session is primed, the SIP answer to a refusal, hold (which pauses the agent without a state of its own), the
REFER before a bridged escalation, RTP statistics and the session timer.

Details (each state, what ends it, hold): docs/sip.md#a-calls-states.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from personagate_common.routing import Refusal

from ..call.core import CallCore
from ..call.line import CLOCK_RATE
from ..call.state import CallState
from ..calls import AgentCall, Calls, PersonaRejected
from ..worker_client import AgentAudio, AgentText
from .leg import Leg, LegEvent
from .media import RINGBACK, MediaBridge, PortMedia
from .metrics import SipMetrics

if TYPE_CHECKING:
    from ..call.metrics import CallMetrics
    from ..tenants.tenant import PersonaConfig, Tenant
    from .ua import UserAgent

log = logging.getLogger(__name__)

BUSY = 486
UNAVAILABLE = 503
TRANSFER_TIMEOUT = 10.0  # seconds from the REFER to a final NOTIFY; after it the caller stays with the agent
SESSION_TIMER_REASON = "session_timer"
SESSION_TIMER_STATUS = 408  # pjsip's BYE for an unrefreshed session: Reason: SIP;cause=408;text="No session refresh received."
MAX_CALL_ID = 128  # the routing store's limit on a call id


def refusal_answer(exc: Refusal) -> tuple[int, str, dict[str, str]]:
    """The SIP answer to a ``Refusal``: 486 for the tenant's own limit, else 503 with Retry-After."""
    if exc.reason == "tenant_limit":
        return BUSY, "Busy Here", {}
    reason = {"no_capacity": "No Agent Available", "unavailable": "Service Unavailable",
              "draining": "Gateway Draining"}.get(exc.reason, "Service Unavailable")
    return UNAVAILABLE, reason, {"Retry-After": str(max(1, math.ceil(exc.retry_after_seconds)))}


def agent_call_id(sip_call_id: str) -> str:
    """The SIP Call-ID as the call's id: at most ``MAX_CALL_ID`` characters and no control characters (the routing
    store refuses them, and pjsip lets a Call-ID such as "a\\x12b" through); any other is shortened or has those
    characters replaced, kept unique by a hash of the whole."""
    printable = "".join("?" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in sip_call_id)
    if len(sip_call_id) <= MAX_CALL_ID and printable == sip_call_id:
        return sip_call_id
    return printable[:100] + "~" + hashlib.sha256(sip_call_id.encode()).hexdigest()[:27]


class HoldGate:
    """The agent session as a held call's media sees it: while the caller holds us, the caller's audio is not
    sent (the worker steps a session only on caller audio: the model pauses) and agent audio is dropped."""

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


class InboundCall(CallCore):
    """Made on the pjsua thread when an INVITE is routed (180 already sent); runs on the event loop."""

    front_end: ClassVar = "sip"
    ended_message: ClassVar = "SIP call ended"

    def __init__(self, *, ua: UserAgent, leg: Leg, sip_call_id: str, number: str, caller: str, tenant: Tenant,
                 persona: PersonaConfig, calls: Calls, answer_timeout: float, retry_after: float, media_timeout: float,
                 max_call_seconds: float | None, loop: asyncio.AbstractEventLoop, metrics: SipMetrics,
                 call_metrics: CallMetrics, bridge_fallback: bool = True, ring_timeout: float = 30.0,
                 recordings_dir: Path | None = None, caller_first_wait: float | None = None,
                 ringing_interval: float = 1.0, transport: str = "udp") -> None:
        super().__init__(call_id=agent_call_id(sip_call_id), tenant=tenant, persona=persona, calls=calls,
                         metrics=call_metrics, recordings_dir=recordings_dir, media_timeout=media_timeout,
                         caller_first_wait=caller_first_wait, max_call_seconds=max_call_seconds,
                         log_extra={"sip_call_id": sip_call_id})
        self.ua = ua
        # The loop side keeps the leg's serial, never the leg: ``UserAgent`` keeps it on the pjsua thread until it
        # is disconnected, so it is always destroyed there (pjlib asserts when a call is destroyed on another).
        self.leg_serial = leg.serial
        self.sip_call_id = sip_call_id
        self.number = number
        self.caller = caller
        self.transport = transport  # the INVITE's: udp, tcp or tls
        self.srtp = False  # the audio is SRTP (as last negotiated)
        self.answer_timeout = answer_timeout
        self.retry_after = retry_after
        self.ringing_interval = ringing_interval
        self.loop = loop
        self.metrics = metrics
        self.buffers = cast(PortMedia, leg.buffers)
        self.answer: tuple[int, str] | None = None  # a refusal sent
        self.rtp: dict[str, object] = {}  # the audio stream's receive statistics, when the dialog ended
        self._gone = asyncio.Event()  # the dialog is over (CANCEL, BYE, or any disconnect)
        self._confirmed = asyncio.Event()
        self.bridge_fallback = bridge_fallback
        self.ring_timeout = ring_timeout
        self.transfer_timeout = TRANSFER_TIMEOUT
        self._transfer_final: asyncio.Future[LegEvent] | None = None  # a REFER awaiting its final NOTIFY
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
            if self.state in (CallState.ANSWERED, CallState.LIVE, CallState.BRIDGED):  # bridged: no media timeout
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
        relay = self.state is CallState.BRIDGED and self.escalation.human is not None
        target = self.key_pressed(digit, method, may_escalate=self.state in (CallState.ANSWERED, CallState.LIVE))
        log.info("DTMF %s (%s)%s", digit, method, ": escalating" if target else ": to the human" if relay else "",
                 extra={"sip_call_id": self.sip_call_id, "tenant": self.tenant.id})
        if relay:
            assert self.escalation.human is not None
            self.escalation.human.send_dtmf(digit)  # the human's side may be a PBX menu or queue that asks for keys
        if target is not None:
            self.escalation.start(self._escalate(target), name=f"sip-transfer-{self.sip_call_id}")

    async def _escalate(self, target: str) -> None:
        """Blind transfer to ``target`` (REFER); 2xx ends the call (``transfer``). A refused or failed REFER
        falls back to the gateway's own call to ``target``, bridged when answered; anything else keeps the
        caller with the agent."""
        result = await self._refer(target)
        if result in ("success", "timeout") or not self.bridge_fallback:
            return  # a timed-out REFER may still complete on the caller's side: calling the human too could ring twice
        await self.escalation.bridge(self.ua, target, caller_serial=self.leg_serial, ring_timeout=self.ring_timeout,
                                     call_id=self.sip_call_id, abandoned=self._gone.is_set)

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
        self.escalation.done("refer", result, target, status)
        if result == "success":
            self.escalation.transferred.set()
        return result

    def _command(self, fn_name: str, *args: object) -> None:
        """``Leg.fn_name(*args)`` on the pjsua thread; a no-op once the leg is gone (its dialog is over)."""
        self.ua.post(lambda: self._on_leg(fn_name, *args))

    def _on_leg(self, fn_name: str, *args: object) -> Any:
        """(pjsua thread) ``Leg.fn_name(*args)``, or None if the leg is gone."""
        leg = self.ua.kept(self.leg_serial)
        return getattr(leg, fn_name)(*args) if isinstance(leg, Leg) else None

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
        if self.lifecycle.reached(CallState.ANSWERED):
            self._command("bye")
        else:
            self._command("respond", status, reason, {"Retry-After": str(max(1, math.ceil(self.retry_after)))})

    async def _set_up(self) -> None:
        self._to(CallState.CONNECTING)
        self.buffers.ringback = RINGBACK
        self._command("respond", 183, "Session Progress")
        start = asyncio.create_task(self.calls.start(self.call_id, self.tenant, self.persona),
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
                self._cancelled()
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
            self._cancelled()
            return
        self.agent = agent

    def _cancelled(self) -> None:
        self._to(CallState.CANCELLED)
        self.metrics.invites.labels(answer="cancelled").inc()

    async def _keep_ringing(self) -> None:
        """183 again every ``ringing_interval`` while the session is being claimed and primed."""
        while True:
            await asyncio.sleep(self.ringing_interval)
            if self.state is not CallState.CONNECTING or self._gone.is_set():
                return
            self._command("respond", 183, "Session Progress")
            self.metrics.provisionals_repeated.inc()

    def _refuse(self, status: int, reason: str, headers: dict[str, str], why: str) -> None:
        self.buffers.ringback = None
        self._to(CallState.REFUSED)
        self.answer = (status, reason)
        self._command("respond", status, reason, headers)
        self.metrics.invites.labels(answer=str(status)).inc()
        log.info("SIP call refused: %d %s", status, reason, extra={
            "sip_call_id": self.sip_call_id, "number": self.number, "tenant": self.tenant.id, "why": why})

    async def _start_recording(self) -> bool:
        """With the tenant's recording on: the recorder tapping the port and the announcement queued to play from
        the answer (True: the agent hears the caller once it has been played)."""
        frames = await self.start_recording(CLOCK_RATE)
        if frames is None:
            return False
        self.buffers.recorder = self.recorder
        self.buffers.announce(frames, self.announcement_played)  # called on the loop (the port's events)
        return True

    async def _stop_recording(self) -> dict[str, object]:
        if self.recorder is None:
            return {}
        self.buffers.recorder = None
        return await self.stop_recording()

    async def _converse(self, agent: AgentCall) -> None:
        announcing = await self._start_recording()
        gate = self.open_gate(CLOCK_RATE, announcing=announcing)
        bridge = MediaBridge(self.buffers, HoldGate(agent, lambda: self.held), gate,
                             on_agent_audio=self.agent_audio)
        bridge.start()
        self.buffers.ringback = None
        self._to(CallState.ANSWERED)
        self._hold(self._media_held)  # a caller may call in already holding (a=sendonly)
        self._command("respond", 200, "OK")
        self.answered()
        self.metrics.invites.labels(answer="200").inc()
        ended = asyncio.create_task(agent.wait_ended())
        gone = asyncio.create_task(self._gone.wait())
        confirmed = asyncio.create_task(self._confirmed.wait())
        silent = asyncio.create_task(self.media_watch(self._rtp_received, lambda: self.held))
        limit = self.limit_seconds
        too_long = asyncio.create_task(asyncio.sleep(limit))
        transferred = asyncio.create_task(self.escalation.transferred.wait())
        try:
            await asyncio.wait({ended, gone, confirmed, silent, too_long, transferred},
                               return_when=asyncio.FIRST_COMPLETED)
            if confirmed.done() and not any(t.done() for t in (gone, ended, silent, too_long, transferred)):
                self._to(CallState.LIVE)
                log.info("SIP call live", extra={
                    "sip_call_id": self.sip_call_id, "number": self.number, "tenant": self.tenant.id,
                    "persona": agent.persona_name, "setup_seconds": round(time.monotonic() - self.lifecycle.began, 3)})
                await asyncio.wait({ended, gone, silent, too_long, transferred}, return_when=asyncio.FIRST_COMPLETED)
            if self.escalation.human is not None and not gone.done():
                await self._stay_bridged(agent, bridge, gone, silent)  # returns when a side hangs up
            else:
                await self.escalation.stop()  # the call is ending: a human still ringing is not joined to it
            self._to(CallState.ENDING)
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
            await self.escalation.stop()
            self.escalation.hang_up_human()  # answered as the caller hung up: never bridged, so BYE it here
            await bridge.stop()
            self._hold(False)  # a call ended on hold: the hold ends with it
            recording = await self._stop_recording()
        self._to(CallState.ENDED)
        stats = self.buffers.pacer.stats()
        self.count_media(underruns=stats.underruns, shed=stats.shed,
                         caller_frames_dropped=self.buffers.inbound_dropped)
        self.call_metrics.ended(self.end_reason or "error")
        self.metrics.observe_rtp(self.rtp)
        self.metrics.calls.labels(transport=self.transport, srtp=str(self.srtp).lower()).inc()
        self.record(number=self.number, caller=self.caller, transport=self.transport, srtp=self.srtp,
                    outbound_underruns=stats.underruns, outbound_shed=stats.shed,
                    caller_frames_dropped=self.buffers.inbound_dropped, holds=self.holds,
                    held_seconds=round(self.held_total(), 2), sip_disconnect=" ".join(map(str, self.disconnect)),
                    **recording, **self.rtp)

    async def _stay_bridged(self, agent: AgentCall, bridge: MediaBridge, gone: asyncio.Task[bool],
                            silent: asyncio.Task[None]) -> None:
        """The caller ⇄ the human (joined in the conference bridge): the agent released, until either side
        hangs up or the caller's RTP stops; the human's leg is hung up here, the caller's by ``_converse``."""
        human = self.escalation.human
        assert human is not None
        self._to(CallState.BRIDGED)
        await agent.end("transfer")  # the human has the caller: the session and its slot are released
        await bridge.stop()
        log.info("caller bridged to %s", human.target, extra={"sip_call_id": self.sip_call_id,
                                                             "tenant": self.tenant.id})
        human_gone = asyncio.create_task(human.gone.wait())
        ended_by: str | None = None
        try:
            await asyncio.wait({gone, silent, human_gone}, return_when=asyncio.FIRST_COMPLETED)
            ended_by = "caller" if gone.done() else "human" if human_gone.done() else "media_timeout"
        finally:
            human_gone.cancel()
            self.escalation.bridge_ended_by = ended_by
            if not human.gone.is_set():
                self.escalation.bridge_ended_by = ended_by or "shutdown"
                human.hang_up()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await human.gone.wait()  # the BYE's answer: the human's RTP statistics are in
        log.info("bridged call over: %s hung up", self.escalation.bridge_ended_by,
                 extra={"sip_call_id": self.sip_call_id, "human_seconds": round(human.seconds or 0, 2)})

    async def _rtp_received(self) -> int | None:
        """RTP packets received from the caller so far (None: pjsua did not tell in time)."""
        try:
            async with asyncio.timeout(2.0):
                stats = await asyncio.wrap_future(self.ua.submit(lambda: self._on_leg("stream_stats") or {}))
        except TimeoutError:
            return None
        return int(stats.get("rtp_packets_received", 0))

    def _session_expired(self) -> bool:
        """The dialog ended because the caller did not refresh the session (pjsua's RFC 4028 timer sent BYE)."""
        status, reason = self.disconnect
        return status == SESSION_TIMER_STATUS and any(word in reason.lower() for word in ("refresh", "timer"))

    async def stop(self) -> None:
        """End the call now (the gateway is stopping): BYE or 503, and the agent call ended."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
