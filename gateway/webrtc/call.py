"""A browser call: the call core (``gateway.call``) over one ``RTCPeerConnection``.

Contract: ``BrowserCall`` moves through the core's ``CallState`` (ringing → connecting → live → ending → ended, or
bridged after an escalation, or refused before the claim), tells the browser each step on its data channel, and
ends by one reason, logged as one "WebRTC call ended" record. What is the browser's own is here: the offer and
answer, the data channel's events, the media connecting, and the human's audio pumped to and from the page
after an escalation (the human's leg is SIP, loaded only when one is dialled).

Details (each state and what ends it): docs/webrtc.md#a-calls-states.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel

from personagate_common.routing import Refusal

from ..audio import OutboundPacer
from ..call.audio import AgentToLine, CallerToAgent
from ..call.core import CallCore
from ..call.state import CallState
from ..calls import AgentCall, Calls, PersonaRejected
from ..tenants.schema import DTMF_DIGITS
from .media import PACKET_SAMPLES, RATE, AgentTrack, BrowserRecording, CallerAudio, HumanAudio, set_jitter_buffer
from .metrics import WebRtcMetrics
from .offer import OfferError

if TYPE_CHECKING:
    from aiortc import MediaStreamTrack, RTCConfiguration

    from ..call.metrics import CallMetrics
    from ..sip.server import SipServer
    from ..tenants.tenant import PersonaConfig, Tenant

log = logging.getLogger(__name__)

PENDING_EVENTS = 64  # data channel messages kept until the channel opens
CHANNEL_BUFFER_BYTES = 64 * 1024  # agent text is dropped while the browser has this much unread
CLOSE_SECONDS = 2.0  # for the peer connection to close


class BrowserCall(CallCore):
    """One browser call, from its offer (``answer``) to its end; made by the API for each accepted offer."""

    front_end: ClassVar = "webrtc"
    ended_message: ClassVar = "WebRTC call ended"

    def __init__(self, *, call_id: str, tenant: Tenant, persona: PersonaConfig, calls: Calls,
                 configuration: RTCConfiguration, metrics: WebRtcMetrics, call_metrics: CallMetrics, client: str,
                 setup_timeout: float, media_timeout: float, caller_first_wait: float | None, cushion_packets: int,
                 connect_timeout: float = 10.0, sip: SipServer | None = None, ring_timeout: float = 30.0,
                 jitter_buffer_packets: int = 2, recordings_dir: Path | None = None) -> None:
        super().__init__(call_id=call_id, tenant=tenant, persona=persona, calls=calls, metrics=call_metrics,
                         recordings_dir=recordings_dir, media_timeout=media_timeout,
                         caller_first_wait=caller_first_wait, max_call_seconds=None, log_extra={"call": call_id})
        self.metrics = metrics
        self.client = client
        self.setup_timeout = setup_timeout
        self.connect_timeout = connect_timeout  # from the answer to the browser's media connected
        self.jitter_buffer_packets = jitter_buffer_packets
        self.pacer = OutboundPacer(PACKET_SAMPLES, cushion_packets=cushion_packets)
        self.track = AgentTrack(self.pacer)
        self.caller: CallerAudio | None = None
        self.pc = RTCPeerConnection(configuration)
        self.channel: RTCDataChannel | None = None
        self.events_dropped = 0
        self.sip = sip  # for escalation: the gateway's SIP user agent calls the tenant's human
        self.ring_timeout = ring_timeout
        self.escalation.on_attempt = self._transfer_attempt
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
        everything it held released. The slot is claimed once aiortc has taken the offer (the last of its
        checks), while the gateway's candidates are gathered."""
        try:
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            except Exception as exc:  # noqa: BLE001 (aiortc fails on odd offers with any exception type)
                raise OfferError(f"the offer could not be used: {exc or type(exc).__name__}") from None
            self._start = asyncio.create_task(
                self.calls.start(self.call_id, self.tenant, self.persona, on_claimed=self._claimed.set),
                name=f"webrtc-start-{self.call_id}")
            try:
                self.pc.addTrack(self.track)
                await self.pc.setLocalDescription(await self.pc.createAnswer())  # gathers the host candidates
            except Exception as exc:  # noqa: BLE001 (aiortc fails on odd offers with any exception type)
                raise OfferError(f"the offer could not be used: {exc or type(exc).__name__}") from None
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
            self._to(CallState.REFUSED)
            await self._release_start("cancelled")
            await self._close_pc()
            await self._stop_side_tasks()
            raise
        self._to(CallState.CONNECTING)
        self.call_metrics.calls_active.inc()
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
        for receiver in self.pc.getReceivers():
            if receiver.track is track:
                set_jitter_buffer(receiver, self.jitter_buffer_packets)
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
        elif isinstance(data, dict) and data.get("type") == "dtmf" and isinstance(data.get("digit"), str) \
                and len(data["digit"]) == 1 and data["digit"] in DTMF_DIGITS:
            self._digit(data["digit"])
        else:
            log.info("data channel message ignored", extra={"call": self.call_id, "data": str(message)[:80]})

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed"):
            self.hang_up("connection_failed" if state == "failed" else "hangup")

    def _digit(self, digit: str) -> None:
        """A key the caller pressed on the page: the tenant's escalation digit calls its human; once bridged, keys
        go on to the human's side (a PBX queue or menu may ask for them)."""
        human = self.escalation.human
        relay = self.state is CallState.BRIDGED and human is not None
        target = self.key_pressed(digit, "page", may_escalate=self.state is CallState.LIVE)
        if relay:
            assert human is not None
            human.send_dtmf(digit)
        elif target is not None:
            self._event("transferring")
            self.escalation.start(self._escalate(target), name=f"webrtc-transfer-{self.call_id}")
        else:
            log.info("DTMF %s from the page", digit, extra={"call": self.call_id})

    async def _escalate(self, target: str) -> None:
        sip = self.sip
        await self.escalation.bridge(sip.ua if sip is not None else None, target, caller_serial=None,
                                     ring_timeout=self.ring_timeout, call_id=self.call_id)

    def _transfer_attempt(self, result: str) -> None:
        if result != "success":
            self._event("transfer_failed", result=result)

    async def _stay_bridged(self, agent: AgentCall, pump: asyncio.Task[None]) -> None:
        """The browser ⇄ the human who answered, the agent released, until either side hangs up."""
        human = self.escalation.human
        assert human is not None
        self._to(CallState.BRIDGED)
        # The caller and the human hear each other first; the agent's session is ended after (that can take a
        # second: the worker's close and the slot's release), so nothing of either is lost meanwhile.
        pump.cancel()
        self.pacer.flush()  # agent audio still queued is not for the human's caller
        bridge = HumanAudio(human.buffers, self.pacer)
        if self.caller is not None:
            self.caller.divert(bridge.from_browser)
        self._side_task(bridge.run(), "human")
        self._event("transferred")
        log.info("browser caller bridged to %s", human.target, extra={"call": self.call_id, "tenant": self.tenant.id})
        await agent.end("transfer")
        gone = asyncio.create_task(human.gone.wait())
        hangup = asyncio.create_task(self._hangup.wait())
        silent = asyncio.create_task(self.media_watch(self._caller_frames))
        try:
            await asyncio.wait({gone, hangup, silent}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (gone, hangup, silent):
                task.cancel()
        if hangup.done():
            self.escalation.bridge_ended_by = "caller" if self._hangup_reason == "hangup" else self._hangup_reason
        else:
            self.escalation.bridge_ended_by = "human" if gone.done() else "media_timeout"
        self.end_reason = "transfer"

    # ------------------------------------------------------------------ events to the browser

    def _event(self, kind: str, **fields: Any) -> None:
        if self.lifecycle.over and kind != "ended":
            return  # "ended" is the last message: agent text still in flight while the call ends is not sent
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
        deadline = self.lifecycle.began + self.setup_timeout
        connect_by = time.monotonic() + self.connect_timeout
        try:
            while not (self._start.done() and connected.done()):
                left = min(deadline, connect_by if not connected.done() else deadline) - time.monotonic()
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
                    why = (f"the browser's media did not connect within {self.connect_timeout:g} s of the answer"
                           if not connected.done() else f"no agent session within {self.setup_timeout:g} s")
                    log.warning("WebRTC call not ready: %s", why, extra={"call": self.call_id,
                                                                         "tenant": self.tenant.id})
                    return False
        finally:
            connected.cancel()
            hangup.cancel()
        self.agent = self._start.result()
        return True

    async def _converse(self) -> None:
        agent = self.agent
        assert agent is not None
        self._to(CallState.LIVE)
        self.answered()
        assert self.answered_at is not None
        setup = self.answered_at - self.lifecycle.began
        self._event("ready", setup_ms=round(setup * 1000), persona=self.persona.name)
        announcing = await self._start_recording()
        gate = self.open_gate(RATE, announcing=announcing)
        if self.caller is not None:
            self.caller.connect(CallerToAgent(RATE, agent, gate))
        pump = AgentToLine(RATE, self.pacer, on_first_audio=self.agent_audio,
                           on_text=lambda text: self._event("text", text=text))
        pumping = self._side_task(pump.run(agent), "out")
        limit = self.limit_seconds
        log.info("WebRTC call live", extra={"call": self.call_id, "tenant": self.tenant.id,
                                            "persona": agent.persona_name, "setup_seconds": round(setup, 3)})
        ended = asyncio.create_task(agent.wait_ended())
        hangup = asyncio.create_task(self._hangup.wait())
        silent = asyncio.create_task(self.media_watch(self._caller_frames))
        transferred = asyncio.create_task(self.escalation.transferred.wait())
        try:
            done, _ = await asyncio.wait({ended, hangup, silent, transferred}, timeout=limit,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ended, hangup, silent, transferred):
                task.cancel()
        if transferred in done and not (ended in done or hangup in done):
            await self._stay_bridged(agent, pumping)
        elif ended in done:
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

    async def _caller_frames(self) -> int:
        """Frames of the browser's audio read so far (the media watch's count)."""
        return self.caller.frames if self.caller is not None else 0

    async def _start_recording(self) -> bool:
        """With the tenant's recording on (and the gateway's ``recordings_dir``): the recorder tapping both sides
        and the consent announcement queued to play first; True if so (the agent hears the caller once it has
        played)."""
        frames = await self.start_recording(RATE)
        if frames is None:
            return False
        assert self.recorder is not None
        recording_tap = BrowserRecording(self.recorder)
        self.track.recording = recording_tap
        if self.caller is not None:
            self.caller.recording = recording_tap
        self.track.announce(frames, self.announcement_played)
        return True

    async def _stop_recording(self) -> dict[str, object]:
        if self.recorder is None:
            return {}
        self.track.recording = None
        if self.caller is not None:
            self.caller.recording = None
        return await self.stop_recording()

    async def _finish(self) -> None:
        self._to(CallState.ENDING)
        reason = self.end_reason or "error"
        try:
            await self.escalation.stop()  # a human still ringing: the INVITE is cancelled
            self.escalation.hang_up_human()
            ended_by = self.escalation.bridge_ended_by
            self._event("ended", reason=reason, **({"ended_by": ended_by} if ended_by else {}))
            if self.agent is not None:
                await self.agent.end(reason)
        except Exception:
            log.exception("ending the agent call failed", extra={"call": self.call_id})
        finally:
            await self._release_start(reason)
            await asyncio.sleep(0)  # let the ended message go out before the connection closes
            await self._close_pc()
            await self._stop_side_tasks()
            recording = await self._stop_recording()
            self._to(CallState.ENDED)
            self.call_metrics.calls_active.dec()
            self.call_metrics.ended(reason)
        self.end_reason = reason
        stats = self.pacer.stats()
        caller = self.caller
        self.count_media(underruns=stats.underruns, shed=stats.shed,
                         caller_frames_dropped=caller.dropped if caller else 0)
        self.metrics.outbound_stalls.inc(self.track.stalls)
        self.record(client=self.client, outbound_underruns=stats.underruns, outbound_shed=stats.shed,
                    outbound_stalls=self.track.stalls, caller_frames=caller.frames if caller else 0,
                    caller_frames_dropped=caller.dropped if caller else 0, events_dropped=self.events_dropped,
                    **recording)

    async def _stop_side_tasks(self) -> None:
        for task in self._side:
            task.cancel()
        await asyncio.gather(*self._side, return_exceptions=True)

    async def _release_start(self, reason: str) -> None:
        """A claim or session still being set up is given up (its slot released; a session that came up but
        was never used is ended with ``reason``)."""
        start = self._start
        if start is None:
            return
        if not start.done():
            start.cancel()
        with contextlib.suppress(BaseException):
            agent = await start
            if self.agent is None:  # it went live after all, but the call is over
                await agent.end(reason)

    async def _close_pc(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_SECONDS):
                await self.pc.close()

    def _side_task(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"webrtc-{self.call_id}-{name}")
        self._side.append(task)
        return task
