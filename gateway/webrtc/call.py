"""A browser call's life: an explicit state machine over one ``RTCPeerConnection`` and one ``AgentCall``.

**States** (``BrowserCallState``; ``history`` keeps when each was entered)::

    offered ──► ringing ──► live ──► ending ──► ended
       │           │                   ▲
       │           └───────────────────┘  (setup failed, or the browser gave up)
       └──► refused (an HTTP error answered the offer)

- ``offered``: the offer passed the API's checks. The slot is claimed (``Calls.start``: the same claim, tenant
  limit and priming as a SIP call) *while* aiortc takes the offer and gathers its candidates. A refusal
  before the claim (``Refusal``, ``PersonaRejected``) answers the offer with an HTTP error → ``refused``.
- ``ringing``: the slot is claimed, the SDP answer sent (201); the persona is primed on the worker while the
  browser connects (ICE, DTLS). The data channel says ``ringing``. Caller audio is read and dropped.
- ``live``: the agent is primed and the browser's media connected: ``ready`` on the data channel, caller audio
  to the agent, agent audio and text to the browser. Ends by the browser hanging up (``DELETE``, a ``hangup``
  message, the peer connection closed or failed: ``hangup``/``connection_failed``), by the agent call ending by
  itself (``no_worker``, ``worker_ended``, ``shutdown``), by no audio from the browser for
  ``webrtc_media_timeout_seconds`` (``media_timeout``), or by the tenant's ``limits.max_call_seconds``
  (``max_duration``).
- ``ending`` / ``ended``: ``ended`` with the reason on the data channel, the agent call ended (slot freed), the
  peer connection closed; one JSON line "WebRTC call ended" is the call record.

Setup that does not finish within ``webrtc_setup_timeout_seconds`` ends the call (``setup_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel

from ..audio import OutboundPacer
from ..calls import AgentCall, Calls, PersonaRejected
from ..routing import Refusal
from .media import PACKET_SAMPLES, AgentAudioPump, AgentTrack, CallerAudio
from .metrics import WebRtcMetrics
from .offer import OfferError

if TYPE_CHECKING:
    from aiortc import MediaStreamTrack, RTCConfiguration

    from ..tenants.tenant import PersonaConfig, Tenant

log = logging.getLogger(__name__)

PENDING_EVENTS = 64  # data channel messages kept until the channel opens
CHANNEL_BUFFER_BYTES = 64 * 1024  # agent text is dropped while the browser has this much unread
CLOSE_SECONDS = 2.0  # for the peer connection to close


class BrowserCallState(enum.StrEnum):
    OFFERED = "offered"
    RINGING = "ringing"
    LIVE = "live"
    ENDING = "ending"
    ENDED = "ended"
    REFUSED = "refused"


B = BrowserCallState
TRANSITIONS: dict[BrowserCallState, frozenset[BrowserCallState]] = {
    B.OFFERED: frozenset({B.RINGING, B.REFUSED}),
    B.RINGING: frozenset({B.LIVE, B.ENDING}),
    B.LIVE: frozenset({B.ENDING}),
    B.ENDING: frozenset({B.ENDED}),
    B.ENDED: frozenset(),
    B.REFUSED: frozenset(),
}


class BrowserCall:
    """One browser call, from its offer (``answer``) to its end; made by the API for each accepted offer."""

    def __init__(self, *, call_id: str, tenant: Tenant, persona: PersonaConfig, calls: Calls,
                 configuration: RTCConfiguration, metrics: WebRtcMetrics, client: str, setup_timeout: float,
                 media_timeout: float, caller_first_wait: float | None, cushion_packets: int) -> None:
        self.call_id = call_id
        self.tenant = tenant
        self.persona = persona
        self.calls = calls
        self.metrics = metrics
        self.client = client
        self.setup_timeout = setup_timeout
        self.media_timeout = media_timeout
        self.caller_first_wait = caller_first_wait
        self.state = B.OFFERED
        self.history: list[tuple[BrowserCallState, float]] = [(B.OFFERED, time.monotonic())]
        self.end_reason: str | None = None
        self.agent: AgentCall | None = None
        self.first_agent_audio: float | None = None
        self.ready_at: float | None = None
        self.pacer = OutboundPacer(PACKET_SAMPLES, cushion_packets=cushion_packets)
        self.track = AgentTrack(self.pacer)
        self.caller: CallerAudio | None = None
        self.pc = RTCPeerConnection(configuration)
        self.channel: RTCDataChannel | None = None
        self.events_dropped = 0
        self.task: asyncio.Task[None] | None = None
        self._pending: list[str] = []
        self._start: asyncio.Task[AgentCall] | None = None
        self._claimed = asyncio.Event()
        self._connected = asyncio.Event()
        self._hangup = asyncio.Event()
        self._hangup_reason = "hangup"
        self._side: list[asyncio.Task[None]] = []
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    # ------------------------------------------------------------------ the offer

    async def answer(self, offer: str) -> str:
        """Claim a slot and answer ``offer``; the answer SDP once the slot is claimed. Raises ``OfferError``
        (aiortc could not take the offer), ``Refusal`` or ``PersonaRejected``; the call is then ``refused`` and
        everything it held released."""
        self._start = asyncio.create_task(
            self.calls.start(self.call_id, self.tenant, self.persona, on_claimed=self._claimed.set),
            name=f"webrtc-start-{self.call_id}")
        try:
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise OfferError(f"the offer could not be used: {exc or type(exc).__name__}") from None
            self.pc.addTrack(self.track)
            await self.pc.setLocalDescription(await self.pc.createAnswer())  # gathers the host candidates
            claimed = asyncio.create_task(self._claimed.wait())
            try:
                await asyncio.wait({self._start, claimed}, timeout=self.setup_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                claimed.cancel()
            if self._start.done():
                self._start.result()  # raises the refusal, if that is how it ended
            elif not self._claimed.is_set():
                raise Refusal("no_capacity", "no slot was claimed in time", self.calls.router.retry_after_seconds)
        except BaseException:
            self._to(B.REFUSED)
            await self._release_start()
            await self._close_pc()
            raise
        self._to(B.RINGING)
        self.metrics.calls_active.inc()
        return self.pc.localDescription.sdp

    def begin(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"webrtc-call-{self.call_id}")

    def hang_up(self, reason: str = "hangup") -> None:
        """The browser hung up (DELETE, a ``hangup`` message); the call ends at once."""
        if not self._hangup.is_set():
            self._hangup_reason = reason
            self._hangup.set()

    async def stop(self) -> None:
        """End the call now (the gateway is stopping)."""
        self.hang_up("shutdown")
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    # ------------------------------------------------------------------ aiortc callbacks

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self.caller is not None:
            return
        self.caller = CallerAudio(track)
        self._side_task(self.caller.run(), "in")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:
            return
        self.channel = channel
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._flush_events()
        else:
            channel.on("open", self._flush_events)

    def _on_message(self, message: object) -> None:
        try:
            data = json.loads(message) if isinstance(message, str) else None
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("type") == "hangup":
            self.hang_up("hangup")
        else:
            log.info("data channel message ignored", extra={"call": self.call_id, "data": str(message)[:80]})

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed"):
            self.hang_up("connection_failed" if state == "failed" else "hangup")

    # ------------------------------------------------------------------ events to the browser

    def _event(self, kind: str, **fields: Any) -> None:
        message = json.dumps({"type": kind, **fields})
        channel = self.channel
        if channel is None or channel.readyState != "open":
            if len(self._pending) < PENDING_EVENTS:
                self._pending.append(message)
            return
        if kind == "text" and channel.bufferedAmount > CHANNEL_BUFFER_BYTES:
            self.events_dropped += 1
            self.metrics.events_dropped.inc()
            return
        channel.send(message)

    def _flush_events(self) -> None:
        pending, self._pending = self._pending, []
        for message in pending:
            assert self.channel is not None
            self.channel.send(message)

    # ------------------------------------------------------------------ the call

    async def _run(self) -> None:
        try:
            if await self._set_up():
                await self._converse()
        except asyncio.CancelledError:
            self.end_reason = self.end_reason or "shutdown"
            raise
        except Exception:
            log.exception("WebRTC call failed", extra={"call": self.call_id})
            self.end_reason = "error"
        finally:
            await self._finish()

    async def _set_up(self) -> bool:
        """Until the agent is primed and the media connected (True), or the call is over (False)."""
        assert self._start is not None
        self._event("ringing")
        connected = asyncio.create_task(self._connected.wait())
        hangup = asyncio.create_task(self._hangup.wait())
        deadline = self.history[0][1] + self.setup_timeout
        try:
            while not (self._start.done() and connected.done()):
                left = deadline - time.monotonic()
                waiting = {t for t in (self._start, connected) if not t.done()}
                done, _ = await asyncio.wait({*waiting, hangup}, timeout=max(0.0, left),
                                             return_when=asyncio.FIRST_COMPLETED)
                if hangup in done:
                    self.end_reason = self._hangup_reason
                    return False
                if self._start.done() and self._start.exception() is not None:
                    exc = self._start.exception()
                    self.end_reason = ("persona_rejected" if isinstance(exc, PersonaRejected) else
                                       "refused" if isinstance(exc, Refusal) else "error")
                    log.warning("WebRTC call: the agent session did not start: %s", exc,
                                extra={"call": self.call_id, "tenant": self.tenant.id})
                    return False
                if not done:
                    self.end_reason = "setup_timeout"
                    log.warning("WebRTC call not ready in %g s: %s", self.setup_timeout,
                                "no agent session" if not self._start.done() else "the browser's media never "
                                "connected", extra={"call": self.call_id, "tenant": self.tenant.id})
                    return False
        finally:
            connected.cancel()
            hangup.cancel()
        self.agent = self._start.result()
        return True

    async def _converse(self) -> None:
        agent = self.agent
        assert agent is not None
        self._to(B.LIVE)
        self.ready_at = time.monotonic()
        setup = self.ready_at - self.history[0][1]
        self.metrics.setup_seconds.observe(setup)
        self._event("ready", setup_ms=round(setup * 1000), persona=self.persona.name)
        if self.caller is not None:
            self.caller.release(agent, None if self.persona.speaks_first else self.caller_first_wait or math.inf)
        pump = AgentAudioPump(self.pacer, on_text=lambda text: self._event("text", text=text),
                              on_first_audio=self._agent_audio)
        self._side_task(pump.run(agent), "out")
        limit = self.tenant.spec.limits.max_call_seconds
        log.info("WebRTC call live", extra={"call": self.call_id, "tenant": self.tenant.id,
                                            "persona": agent.persona_name, "setup_seconds": round(setup, 3)})
        ended = asyncio.create_task(agent.wait_ended())
        hangup = asyncio.create_task(self._hangup.wait())
        silent = asyncio.create_task(self._media_watch())
        try:
            done, _ = await asyncio.wait({ended, hangup, silent}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ended, hangup, silent):
                task.cancel()
        if ended in done:
            self.end_reason = agent.end_reason
        elif hangup in done:
            self.end_reason = self._hangup_reason
        elif silent in done:
            self.end_reason = "media_timeout"
            log.warning("no audio from the browser for %g s: ending the call", self.media_timeout,
                        extra={"call": self.call_id})
        else:
            self.end_reason = "max_duration"
            log.info("the call reached its maximum duration (%g s)", limit, extra={"call": self.call_id})

    async def _media_watch(self) -> None:
        """Returns once no audio has come from the browser for ``media_timeout`` seconds."""
        while True:
            await asyncio.sleep(min(1.0, self.media_timeout / 2))
            last = self.caller.last_frame_at if self.caller is not None else self.history[0][1]
            if time.monotonic() - last >= self.media_timeout:
                return

    def _agent_audio(self) -> None:
        self.first_agent_audio = time.monotonic()
        self.metrics.first_agent_audio_seconds.observe(self.first_agent_audio - self.history[0][1])

    async def _finish(self) -> None:
        self._to(B.ENDING)
        reason = self.end_reason or "error"
        self._event("ended", reason=reason)
        if self.agent is not None:
            await self.agent.end(reason)
        await self._release_start()
        await asyncio.sleep(0)  # let the ended message go out before the connection closes
        await self._close_pc()
        for task in self._side:
            task.cancel()
        await asyncio.gather(*self._side, return_exceptions=True)
        self._to(B.ENDED)
        self.metrics.calls_active.dec()
        self.metrics.calls_ended.labels(reason=reason).inc()
        stats = self.pacer.stats()
        self.metrics.outbound_underruns.inc(stats.underruns)
        self.metrics.outbound_shed.inc(stats.shed)
        self.metrics.outbound_stalls.inc(self.track.stalls)
        caller = self.caller
        if caller is not None:
            self.metrics.caller_frames_dropped.inc(caller.dropped)
        began = self.history[0][1]
        log.info("WebRTC call ended", extra={  # the call record: one JSON line per answered call
            "call": self.call_id, "tenant": self.tenant.id, "persona": self.persona.name, "client": self.client,
            "worker_id": self.agent.worker_id if self.agent else None, "reason": reason,
            "setup_seconds": round(self.ready_at - began, 3) if self.ready_at else None,
            "first_agent_audio_seconds": round(self.first_agent_audio - began, 3) if self.first_agent_audio else None,
            "seconds": round(time.monotonic() - began, 2), "outbound_underruns": stats.underruns,
            "outbound_shed": stats.shed, "outbound_stalls": self.track.stalls,
            "caller_frames": caller.frames if caller else 0, "caller_frames_dropped": caller.dropped if caller else 0,
            "agent_released_by": caller.released_by if caller else None, "events_dropped": self.events_dropped})

    async def _release_start(self) -> None:
        """A claim or session still being set up is given up (its slot released)."""
        start = self._start
        if start is None:
            return
        if not start.done():
            start.cancel()
        with contextlib.suppress(BaseException):
            agent = await start
            if self.agent is None:  # it went live after all, but the call is over
                await agent.end("cancelled")

    async def _close_pc(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_SECONDS):
                await self.pc.close()

    def _side_task(self, coro: Any, name: str) -> None:
        self._side.append(asyncio.create_task(coro, name=f"webrtc-{self.call_id}-{name}"))

    def _to(self, state: BrowserCallState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"WebRTC call {self.call_id}: no transition {self.state} -> {state}")
        self.state = state
        self.history.append((state, time.monotonic()))
