"""One SIP dialog as pjsua2 sees it: a ``pj.Call`` living on the pjsua thread, and nothing else.

A leg reports what happens to it (``LegEvent``s: provisional and final responses, confirmed, disconnected)
through ``events``, a thread-safe sink given by its owner (the gateway's ``InboundCall``, or the ``call``
command's caller); its owner acts on it only through the user agent's command queue. When the dialog is
disconnected the leg disconnects its media port and drops itself (and the port) on the pjsua thread, one
loop turn later, outside pjsua's callback.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pjsua2 as pj

from .media import FramePort, MediaBuffers
from .ua import UserAgent, call_op

log = logging.getLogger(__name__)

_serials = itertools.count(1)


@dataclass(frozen=True)
class LegEvent:
    kind: str  # "provisional" (1xx), "confirmed", "response" (a final response to our INVITE), "disconnected"
    status: int = 0
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    stats: dict[str, object] = field(default_factory=dict)  # "disconnected": the audio stream's RTP statistics


def parse_response(message: str) -> LegEvent | None:
    """A SIP response's status, reason and headers (lower-case names); None for a request."""
    head = message.split("\r\n\r\n", 1)[0].split("\r\n")
    first = head[0].split(" ", 2)
    if len(first) < 2 or not first[0].startswith("SIP/") or not first[1].isdigit():
        return None
    headers = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return LegEvent("response", int(first[1]), first[2] if len(first) > 2 else "", headers)


class Leg(pj.Call):
    """A call on the pjsua thread. Keep it with ``ua.keep(leg.serial, leg)``; it drops itself when over."""

    def __init__(self, ua: UserAgent, account: pj.Account, call_id: int = pj.PJSUA_INVALID_ID, *,
                 buffers: MediaBuffers) -> None:
        super().__init__(account, call_id)
        self.ua = ua
        self.serial = next(_serials)
        self.buffers = buffers
        self.events: Callable[[LegEvent], None] = lambda event: None
        self.port: FramePort | None = None
        self.over = False
        self.rtp_stats: dict[str, object] = {}  # taken as the audio stream is destroyed (before DISCONNECTED)

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        info = self.getInfo()
        self._response(prm.e)
        if info.state == pj.PJSIP_INV_STATE_EARLY and info.role == pj.PJSIP_ROLE_UAC:
            self.events(LegEvent("provisional", info.lastStatusCode, info.lastReason))
        elif info.state == pj.PJSIP_INV_STATE_CONFIRMED:
            self.events(LegEvent("confirmed", info.lastStatusCode, info.lastReason))
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.over:
            self.over = True
            self.events(LegEvent("disconnected", info.lastStatusCode, info.lastReason, stats=self.rtp_stats or self.stream_stats()))
            self.ua.post(self._release)

    def onStreamDestroyed(self, prm: pj.OnStreamDestroyedParam) -> None:
        if not self.rtp_stats:
            self.rtp_stats = self.stream_stats(prm.streamIdx)

    def _response(self, event: pj.SipEvent) -> None:
        """A final response to our INVITE, with its headers (e.g. Retry-After), as a ``response`` event."""
        if event.type != pj.PJSIP_EVENT_TSX_STATE or event.body.tsxState.type != pj.PJSIP_EVENT_RX_MSG:
            return
        response = parse_response(event.body.tsxState.src.rdata.wholeMsg)
        if response is not None and response.status >= 200 and "INVITE" in response.headers.get("cseq", ""):
            self.events(response)

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        info = self.getInfo()
        for index, media in enumerate(info.media):
            if media.type != pj.PJMEDIA_TYPE_AUDIO or media.status not in (
                    pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD):
                continue
            audio = self.getAudioMedia(index)
            if self.port is None:
                self.port = FramePort(self.buffers)
                self.port.create(f"leg{self.serial}")
            audio.startTransmit(self.port)
            self.port.startTransmit(audio)
            return

    def _release(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            with contextlib.suppress(pj.Error):
                port.stopTransmit(port)  # no-op if not connected; the destructor removes it from the bridge
        del port
        self.ua.drop(self.serial)

    # ------------------------------------------------------------------ commands (pjsua thread)

    def respond(self, status: int, reason: str = "", headers: dict[str, str] | None = None) -> None:
        """A provisional answer, 200, or (4xx-6xx) the final refusal of an incoming call."""
        if self.over:
            return
        if status >= 300:
            self.hangup(call_op(status, reason, headers))
        else:
            self.answer(call_op(status, reason, headers))

    def stream_stats(self, index: int = 0) -> dict[str, object]:
        """RTP receive statistics of the audio stream (pjmedia's RTCP view): packets, loss, jitter."""
        try:
            rx = self.getStreamStat(index).rtcp.rxStat
        except pj.Error:
            return {}
        return {"rtp_packets_received": rx.pkt, "rtp_packets_lost": rx.loss,
                "rx_jitter_ms": {"mean": round(rx.jitterUsec.mean / 1000, 2),
                                 "max": round(rx.jitterUsec.max / 1000, 2)}}

    def bye(self) -> None:
        if not self.over:
            self.hangup(call_op())
