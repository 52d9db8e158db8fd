"""One SIP dialog as pjsua2 sees it: a ``pj.Call`` living on the pjsua thread, and nothing else.

A leg reports what happens to it (``LegEvent``s: provisional and final responses, confirmed, disconnected)
through ``events``, a thread-safe sink given by its owner (the gateway's ``InboundCall``, or the ``call``
command's caller); its owner acts on it only through the user agent's command queue. When the dialog is
disconnected the leg disconnects its media port and drops itself (and the port) on the pjsua thread, one
loop turn later, outside pjsua's callback.

A leg is incoming (made by the server for an INVITE) or outgoing (``dial``: the gateway's own call to a human,
``bridge.py``). Two legs can be ``join``ed back to back: their audio then goes straight from one to the other
in pjsua's conference bridge, without passing through either media port.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pjsua2 as pj

from .media import MediaBuffers, PortMedia
from .ua import BridgePort, UserAgent, call_op

log = logging.getLogger(__name__)

_serials = itertools.count(1)


@dataclass(frozen=True)
class LegEvent:
    # "provisional" (1xx), "confirmed", "response" (a final response to our INVITE), "disconnected", "dtmf" (a
    # digit received: ``reason`` is the digit, ``headers["method"]`` rfc4733 or info), "transfer" (the NOTIFY
    # sipfrag status of our REFER, or the REFER's own failure: ``headers["final"]`` "1" when final), "refer" (a
    # REFER received: ``headers["refer_to"]``), "media" (the audio stream (re)negotiated by an offer/answer:
    # ``headers["held"]`` "1" while the other side holds us, i.e. we may not send; ``headers["direction"]`` ours;
    # ``headers["srtp"]`` "1" while the audio is SRTP)
    kind: str
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


DIRECTIONS = {pj.PJMEDIA_DIR_NONE: "inactive", pj.PJMEDIA_DIR_ENCODING: "sendonly",
              pj.PJMEDIA_DIR_DECODING: "recvonly", pj.PJMEDIA_DIR_ENCODING_DECODING: "sendrecv"}
_HOLD_ADDRESS = re.compile(r"^c=IN IP4 0\.0\.0\.0\s*$", re.MULTILINE)
_DIRECTION = re.compile(r"^a=(sendrecv|sendonly|recvonly|inactive)\s*$", re.MULTILINE)


_SDES_KEY = re.compile(r"^a=crypto:", re.MULTILINE)


def has_sdes_keys(sdp: str) -> bool:
    """An SDP that carries SDES keys (``a=crypto``, RFC 4568): as an answer, its audio is SRTP."""
    return _SDES_KEY.search(sdp) is not None


def is_rfc2543_hold(sdp: str) -> bool:
    """An SDP that holds the old way: a connection address of 0.0.0.0 (session or media level)."""
    return _HOLD_ADDRESS.search(sdp) is not None


def answer_inactive(sdp: str) -> str:
    """``sdp`` with every direction attribute made ``a=inactive`` (one added to each m= line without one)."""
    sdp = _DIRECTION.sub("a=inactive", sdp)
    lines, out = sdp.replace("\r\n", "\n").split("\n"), []
    media_has_direction = True
    for line in lines:
        if line.startswith("m=") or line == "":
            if not media_has_direction:
                out.append("a=inactive")
            media_has_direction = not line.startswith("m=")
        elif line == "a=inactive":
            media_has_direction = True
        out.append(line)
    return "\r\n".join(out)


def add_stream_stats(total: dict[str, Any], stream: dict[str, Any]) -> dict[str, Any]:
    """Two streams' ``stream_stats`` as one: packets summed; jitter and jitter buffer delay: the later stream's
    mean, the larger max."""
    if not total or not stream:
        return stream or total
    return {"rtp_packets_received": total["rtp_packets_received"] + stream["rtp_packets_received"],
            "rtp_packets_lost": total["rtp_packets_lost"] + stream["rtp_packets_lost"],
            **{name: {"mean": stream[name]["mean"], "max": max(total[name]["max"], stream[name]["max"])}
               for name in ("rx_jitter_ms", "jitter_buffer_ms")}}


class Leg(pj.Call):
    """A call on the pjsua thread. Keep it with ``ua.keep(leg.serial, leg)``; it drops itself when over."""

    def __init__(self, ua: UserAgent, account: pj.Account, call_id: int = pj.PJSUA_INVALID_ID, *,
                 buffers: MediaBuffers | PortMedia) -> None:
        super().__init__(account, call_id)
        self.ua = ua
        self.account = account
        self.serial = next(_serials)
        self.buffers = buffers
        self.events: Callable[[LegEvent], None] = lambda event: None
        self.port: BridgePort | None = None  # lent by ``ua.ports`` while the call's audio is up; given back at the end
        self._port_media: pj.AudioMedia | None = None  # the stream the port is connected with
        self.over = False
        self.refer_answer = 603  # the answer to a REFER received
        self.tap = True  # False: no media port (a leg only ever bridged to another call, bridge.py)
        self.peer: Leg | None = None  # the call whose audio ours is bridged with (``join``), instead of the port
        # Summed over the audio streams this dialog had, each taken as it is destroyed (before DISCONNECTED):
        # a hold by a=inactive and its resume replace the stream, whose counters start again from zero.
        self.rtp_stats: dict[str, Any] = {}
        self.srtp = False  # the last SDP answer, ours or theirs, carries SDES keys: the audio is SRTP

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        info = self.getInfo()
        self._response(prm.e)
        if info.state == pj.PJSIP_INV_STATE_EARLY and info.role == pj.PJSIP_ROLE_UAC:
            self.events(LegEvent("provisional", info.lastStatusCode, info.lastReason))
        elif info.state == pj.PJSIP_INV_STATE_CONFIRMED:
            self.events(LegEvent("confirmed", info.lastStatusCode, info.lastReason))
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.over:
            self.over = True
            stats = self.rtp_stats or self.stream_stats()
            self.events(LegEvent("disconnected", info.lastStatusCode, info.lastReason, stats=stats))
            # Released now, in the callback, not later: pjsua reuses this call's slot for the next INVITE once the
            # callback returns, and a pj.Call destroyed after that hangs up (603) and detaches whatever call then
            # holds the slot (its destructor acts on its slot index, which DISCONNECTED does not clear).
            self._release()

    def onDtmfDigit(self, prm: pj.OnDtmfDigitParam) -> None:
        # One callback per key press: pjmedia folds an RFC 4733 event's repeated and end packets into one
        # digit, and a retransmitted INFO is absorbed by its transaction.
        method = "info" if prm.method == pj.PJSUA_DTMF_METHOD_SIP_INFO else "rfc4733"
        self.events(LegEvent("dtmf", 0, str(prm.digit), {"method": method}))

    def onCallTransferStatus(self, prm: pj.OnCallTransferStatusParam) -> None:
        self.events(LegEvent("transfer", prm.statusCode, prm.reason, {"final": "1" if prm.finalNotify else ""}))
        if prm.finalNotify:
            prm.cont = False

    def onCallTransferRequest(self, prm: pj.OnCallTransferRequestParam) -> None:
        """A REFER received (only callers see one): reported; refused unless ``refer_answer`` says 202, when
        pjsua calls the target on a new leg (kept until it ends; its events are not reported)."""
        self.events(LegEvent("refer", self.refer_answer, "", {"refer_to": str(prm.dstUri)}))
        prm.statusCode = self.refer_answer
        if 200 <= self.refer_answer < 300:
            new = Leg(self.ua, self.account, buffers=MediaBuffers(inbound_frames=None))
            self.ua.keep(new.serial, new)
            prm.newCall = new  # pjsua2 needs the Call object for the new call (without one it crashes)

    def onStreamDestroyed(self, prm: pj.OnStreamDestroyedParam) -> None:
        self.rtp_stats = add_stream_stats(self.rtp_stats, self.stream_stats(prm.streamIdx))

    def _response(self, event: pj.SipEvent) -> None:
        """A final response to our INVITE, with its headers (e.g. Retry-After), as a ``response`` event."""
        if event.type != pj.PJSIP_EVENT_TSX_STATE or event.body.tsxState.type != pj.PJSIP_EVENT_RX_MSG:
            return
        message = event.body.tsxState.src.rdata.wholeMsg
        response = parse_response(message)
        if response is not None and response.status >= 200 and "INVITE" in response.headers.get("cseq", ""):
            body = message.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in message else ""
            if 200 <= response.status < 300 and "v=0" in body:  # their answer to our offer
                self.srtp = has_sdes_keys(body)
            self.events(response)

    def onCallSdpCreated(self, prm: pj.OnCallSdpCreatedParam) -> None:
        """Our SDP, before it is sent. The one change: an offer on hold the RFC 2543 way (``c=0.0.0.0``) is
        answered ``a=inactive``; pjsua would mirror the address but say ``a=sendrecv``, and carriers hang up
        on a hold answered sendrecv (livekit/sip#779)."""
        if prm.remSdp.wholeSdp and is_rfc2543_hold(prm.remSdp.wholeSdp):
            prm.sdp.wholeSdp = answer_inactive(prm.sdp.wholeSdp)
        if prm.remSdp.wholeSdp:  # our answer: SDES keys in it only when SRTP was agreed
            self.srtp = has_sdes_keys(prm.sdp.wholeSdp)

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        if self.peer is not None:  # bridged (bridge.py): re-connected after any media change, e.g. a re-INVITE
            self._connect_peer()
            return
        if not self.tap:
            return
        info = self.getInfo()
        for index, media in enumerate(info.media):
            if media.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            self.events(LegEvent("media", headers={"held": "" if media.dir & pj.PJMEDIA_DIR_ENCODING else "1",
                                                   "direction": DIRECTIONS.get(media.dir, str(media.dir)),
                                                   "status": str(media.status), "srtp": "1" if self.srtp else ""}))
            if media.status not in (pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD):
                return
            try:
                audio = self.getAudioMedia(index)
            except pj.Error:  # a stream offered a=inactive has no port in the bridge: nothing to connect until resumed
                return
            if self.port is None:
                self.port = self.ua.ports.take(self.buffers)
            audio.startTransmit(self.port)
            self.port.startTransmit(audio)
            self._port_media = audio
            return

    def _release(self) -> None:
        peer, self.peer = self.peer, None  # no reference cycle left for a garbage collector on another thread
        if peer is not None and peer.peer is self:
            peer.peer = None
        port, self.port = self.port, None
        media, self._port_media = self._port_media, None
        if port is not None:
            self.ua.ports.give_back(port, [media] if media is not None else [])
        self.ua.drop(self.serial)

    # ------------------------------------------------------------------ commands (pjsua thread)

    def respond(self, status: int, reason: str = "", headers: dict[str, str] | None = None) -> None:
        """A provisional answer, 200, or (4xx-6xx) the final refusal of an incoming call."""
        if self.over:
            return
        try:
            if status >= 300:
                self.hangup(call_op(status, reason, headers))
            else:
                self.answer(call_op(status, reason, headers))
        except pj.Error as exc:
            self._not_sent(status, exc)

    def _not_sent(self, status: int, exc: pj.Error) -> None:
        """An answer pjsua could not send. The usual cause is the caller's: an SDP offer no media session can be
        made for (say, a connection address that is no address); pjsua then refuses the INVITE itself (488) and the
        call ends as any other does. Hostile input, not a failure of ours: no traceback in the log."""
        call_id = ""
        with contextlib.suppress(pj.Error):
            call_id = self.getInfo().callIdString
        log.info("SIP answer %d not sent: %s", status, exc.reason or exc.title,
                 extra={"sip_call_id": call_id, "pj_status": exc.status})

    def refuse(self, prm: pj.CallOpParam) -> None:
        """Refuse an incoming call with ``prm``'s final status (and headers), on the pjsua thread's next turn.

        Never inside pjsua's ``onIncomingCall``: there a final answer to an INVITE without SDP ends the call at once,
        and pjsua2 then frees the INVITE it is still holding a second time (an abort, ``Assertion 'rdata' failed``,
        in pjsua2 2.15 and 2.16; deploy/pjsua2/patches/0001 fixes pjsua2 too). ``answer``, not ``hangup``: a hangup
        before any provisional answer drops the extra headers (WWW-Authenticate, Retry-After)."""
        ua, serial = self.ua, self.serial

        def send() -> None:
            leg = ua.kept(serial)
            if isinstance(leg, Leg) and not leg.over:
                try:
                    leg.answer(prm)
                except pj.Error as exc:
                    leg._not_sent(prm.statusCode, exc)

        ua.post(send)

    def stream_stats(self, index: int = 0) -> dict[str, object]:
        """RTP receive statistics of the audio stream (pjmedia's RTCP view): packets, loss, jitter, and how long
        the jitter buffer held the caller's audio."""
        try:
            stat = self.getStreamStat(index)
        except pj.Error:
            return {}
        rx, jb = stat.rtcp.rxStat, stat.jbuf
        return {"rtp_packets_received": rx.pkt, "rtp_packets_lost": rx.loss,
                "rx_jitter_ms": {"mean": round(rx.jitterUsec.mean / 1000, 2),
                                 "max": round(rx.jitterUsec.max / 1000, 2)},
                "jitter_buffer_ms": {"mean": jb.avgDelayMsec, "max": jb.maxDelayMsec}}

    def transfer(self, uri: str) -> None:
        """Blind transfer: REFER the other side to ``uri``; the outcome comes as ``transfer`` events."""
        if not self.over:
            try:
                self.xfer(uri, call_op())
            except pj.Error as exc:
                self.events(LegEvent("transfer", 500, f"REFER not sent: {exc.reason}", {"final": "1"}))

    def dial(self, uri: str, headers: dict[str, str] | None = None) -> None:
        """Place this leg as an outgoing call to ``uri`` (INVITE, with ``headers`` added); raises ``pj.Error`` if
        it cannot be sent (a bad URI, or pjsua's call table full). Its progress comes as events."""
        self.makeCall(uri, call_op(headers=headers))

    def join(self, other: Leg) -> None:
        """Bridge this call and ``other`` back to back: each one's audio transmitted to the other in the
        conference bridge, neither media port in the path any more. A side whose media is not up yet is
        connected when it comes up (``onCallMediaState``)."""
        self.peer, other.peer = other, self
        self._connect_peer()

    def _connect_peer(self) -> None:
        peer = self.peer
        mine = self._audio()
        theirs = peer._audio() if peer is not None else None
        if peer is None or mine is None or theirs is None:
            return
        for leg, audio in ((self, mine), (peer, theirs)):
            if leg.port is not None:
                with contextlib.suppress(pj.Error):
                    leg.port.stopTransmit(audio)
                    audio.stopTransmit(leg.port)
        mine.startTransmit(theirs)
        theirs.startTransmit(mine)

    def _audio(self) -> pj.AudioMedia | None:
        """The call's audio in the conference bridge, if it is up."""
        if self.over:
            return None
        try:
            return self.getAudioMedia(-1)
        except pj.Error:
            return None

    def dial_dtmf(self, digits: str) -> None:
        """Send ``digits`` as RFC 4733 telephone-events."""
        if not self.over:
            self.dialDtmf(digits)

    def bye(self) -> None:
        if not self.over:
            self.hangup(call_op())
