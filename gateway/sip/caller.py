"""``personagate call``: a real SIP user agent (pjsua2) that places one call, plays a file into it, records
what comes back, and reports timings as JSON.

    personagate call sip:+14155550186@127.0.0.1:5060 --play in.wav --record out.wav --seconds 5

Report: the final answer (status, reason, Retry-After), seconds from INVITE to the first 180/183 and to
200 OK, seconds from 200 OK to the first non-silent audio that is not ringback (the agent), and the
interval between received 20 ms frames at our media port (p50/p99, in ms; the port is clocked by the
conference bridge, so this measures the bridge's delivery, while ``rx_jitter_ms`` is pjmedia's RTP
inter-arrival jitter estimate from the stream's statistics), plus RTP packets received and lost.
"""

from __future__ import annotations

import collections
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pjsua2 as pj

from ..call.line import BYTES_PER_FRAME, CLOCK_RATE
from .leg import Leg, LegEvent
from .media import MediaBuffers
from .ua import CODECS, TlsTransport, UaConfig, UserAgent, call_op

SILENCE_DBFS = -50.0
# ``--codec`` names and the pjmedia codec ids they stand for (the gateway's offer, ua.CODECS)
CODEC_IDS = {codec.split("/", 1)[0]: codec for codec in CODECS}


class _CallerBuffers(MediaBuffers):
    """Keeps every received frame with its arrival time; plays the whole file (no shedding)."""

    def __init__(self) -> None:
        super().__init__(inbound_frames=None)
        self.times: collections.deque[float] = collections.deque()
        self.recording = False
        self.playing: collections.deque[bytes] = collections.deque()
        self._silence = bytes(BYTES_PER_FRAME)

    def play(self, pcm: bytes) -> None:
        self.playing.extend(pcm[i:i + BYTES_PER_FRAME] for i in range(0, len(pcm), BYTES_PER_FRAME))

    def frame_requested(self, frame: pj.MediaFrame) -> None:
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        try:
            frame.buf.assign_from_bytes(self.playing.popleft())
        except IndexError:
            frame.buf.assign_from_bytes(self._silence)
        frame.size = BYTES_PER_FRAME

    def frame_received(self, frame: pj.MediaFrame) -> None:
        if not self.recording or frame.type != pj.PJMEDIA_FRAME_TYPE_AUDIO or frame.size != BYTES_PER_FRAME:
            return
        self.times.append(time.monotonic())
        pcm = bytearray(BYTES_PER_FRAME)
        frame.buf.copy_to_bytearray(pcm)
        self.inbound.append(pcm)


class _Account(pj.Account):
    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        call = pj.Call(self, prm.callId)
        call.hangup(call_op(486))


@dataclass
class CallResult:
    report: dict[str, Any]
    audio: np.ndarray  # what came back after 200 OK: 16 kHz s16


def is_ringback(pcm: np.ndarray, rate: int = CLOCK_RATE) -> bool:
    """Mostly 440 + 480 Hz: the gateway's ringback, not the agent."""
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm)))) ** 2
    freqs = np.fft.rfftfreq(len(pcm), 1 / rate)
    band = spectrum[(freqs >= 350) & (freqs <= 570)].sum()
    return band > 0.6 * spectrum.sum()


TRANSPORTS = ("udp", "tcp", "tls")
SRTP_USE = {"off": pj.PJMEDIA_SRTP_DISABLED, "optional": pj.PJMEDIA_SRTP_OPTIONAL,
            "mandatory": pj.PJMEDIA_SRTP_MANDATORY}


def with_transport(uri: str, transport: str) -> str:
    """``uri`` with ``;transport=`` naming ``transport`` (unless it names one already, or is sips:, TLS itself)."""
    if transport == "udp" or ";transport=" in uri.lower() or (transport == "tls" and uri.lower().startswith("sips:")):
        return uri
    head, sep, headers = uri.partition("?")
    return f"{head};transport={transport}{sep}{headers}"


def place_call(uri: str, play: np.ndarray | None, seconds: float, *, host: str = "127.0.0.1",
               timeout: float = 30.0, dtmf: Sequence[tuple[str, float]] = (), refer_answer: int = 603,
               codecs: Sequence[str] = (), user: str | None = None, password: str | None = None,
               transport: str = "udp", srtp: str = "off", ca_file: str | None = None) -> CallResult:
    """Call ``uri``; once answered, play ``play`` (16 kHz s16) and record for ``seconds``; then hang up.

    ``dtmf``: (digits, seconds after the answer) sent as RFC 4733 telephone-events. A REFER received is
    answered ``refer_answer`` (603 refuses it; 202 accepts it and pjsua calls the Refer-To target, reporting
    that call's progress in NOTIFYs); its Refer-To URI goes in the report as ``refer_to``. ``codecs``: names
    from ``CODEC_IDS`` (PCMU, PCMA, G722), offered in this order and no others (default: all three, PCMU
    first); the codec the call ended up with goes in the report as ``codec`` (e.g. ``G722/16000``).

    ``user``/``password``: digest credentials for any realm; pjsua answers a 401/407 by sending the INVITE
    again with them.

    ``transport``: udp, tcp or tls (the URI gets ``;transport=``); over TLS, ``ca_file`` makes the server's
    certificate checked against those CAs (else it is not checked: a test caller). ``srtp``: off, optional (offer
    SDES keys with RTP/AVP) or mandatory (RTP/SAVP); keys are offered over any transport, TLS or not. The report
    says which transport and whether the audio was SRTP (``transport``, ``srtp``)."""
    unknown = [name for name in codecs if name not in CODEC_IDS]
    if unknown:
        raise ValueError(f"unknown codec {unknown[0]!r}; expected one of {', '.join(CODEC_IDS)}")
    if transport not in TRANSPORTS or srtp not in SRTP_USE:
        raise ValueError(f"transport {transport!r} / srtp {srtp!r}: expected one of {TRANSPORTS} / {tuple(SRTP_USE)}")
    uri = with_transport(uri, transport)
    events: queue.SimpleQueue[tuple[float, LegEvent]] = queue.SimpleQueue()
    buffers = _CallerBuffers()

    def make_account(ua: UserAgent) -> pj.Account:
        account = _Account()
        cfg = pj.AccountConfig()
        cfg.idUri = f"sip:caller@{host}:{ua.config.port}"
        cfg.mediaConfig.transportConfig.boundAddress = host
        cfg.mediaConfig.srtpUse = SRTP_USE[srtp]
        cfg.mediaConfig.srtpSecureSignaling = 0  # a test caller offers keys wherever it is told to
        cfg.mediaConfig.srtpOpt.keyings = pj.IntVector([pj.PJMEDIA_SRTP_KEYING_SDES])
        if user is not None:
            cfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", user, pj.PJSIP_CRED_DATA_PLAIN_PASSWD,
                                                           password or ""))
        account.create(cfg, True)
        return account

    offer = tuple(CODEC_IDS[name] for name in codecs) or CODECS
    tls = TlsTransport(port=0, ca_file=ca_file or "", verify_server=bool(ca_file)) if transport == "tls" else None
    ua = UserAgent(UaConfig(host=host, port=0, max_calls=4, user_agent="personagate-call", log_level=0,
                            codecs=offer, tls=tls), make_account=make_account)
    ua.start()
    serials: list[int] = []  # the leg itself stays on the pjsua thread (its destructor must run there)

    def dial() -> None:
        assert ua.account is not None
        leg = Leg(ua, ua.account, buffers=buffers)
        leg.refer_answer = refer_answer
        leg.events = lambda event: events.put((time.monotonic(), event))
        ua.keep(leg.serial, leg)
        serials.append(leg.serial)
        leg.makeCall(uri, call_op())

    def on_leg(fn_name: str, *args: Any) -> Any:
        def run() -> Any:
            leg = ua.kept(serials[0])
            return getattr(leg, fn_name)(*args) if leg is not None else {}
        return run

    def on_leg_info(fn: Any) -> Any:
        def run() -> Any:
            leg = ua.kept(serials[0])
            return fn(leg) if leg is not None else None
        return run

    pending = sorted(dtmf, key=lambda item: item[1])

    report: dict[str, Any] = {"uri": uri, "transport": transport}
    began = time.monotonic()
    answered_at: float | None = None
    ended = False
    stats: dict[str, Any] = {}

    def wait_events(until: float) -> None:
        """Handle events until ``until``, the call ends, or (before the answer) it is answered."""
        nonlocal answered_at, ended
        while not ended and time.monotonic() < until:
            was_answered = answered_at is not None
            while pending and answered_at is not None and time.monotonic() >= answered_at + pending[0][1]:
                digits, _ = pending.pop(0)
                ua.post(on_leg("dial_dtmf", digits))
                report.setdefault("dtmf_sent", []).append({"digits": digits,
                                                           "at": round(time.monotonic() - answered_at, 3)})
            try:
                at, event = events.get(timeout=max(0.001, min(0.05, until - time.monotonic())))
            except queue.Empty:
                continue
            elapsed = round(at - began, 4)
            if event.kind == "provisional":
                report.setdefault(f"seconds_to_{event.status}", elapsed)
            elif event.kind == "response":
                report["status"], report["reason"] = event.status, event.reason
                if "retry-after" in event.headers:
                    report["retry_after"] = event.headers["retry-after"]
            elif event.kind == "confirmed":
                answered_at = at
                report["seconds_to_200"] = elapsed
                buffers.recording = True
                if play is not None and len(play):
                    whole = len(play) - len(play) % (BYTES_PER_FRAME // 2)
                    buffers.play(play[:whole].astype("<i2").tobytes())
            elif event.kind == "refer":
                report.setdefault("refers", []).append({"refer_to": event.headers["refer_to"],
                                                        "answer": event.status, "at": elapsed})
                report["refer_to"] = event.headers["refer_to"]
            elif event.kind == "disconnected":
                ended = True
                report.setdefault("status", event.status)
                report.setdefault("reason", event.reason)
            if not was_answered and answered_at is not None:
                return

    try:
        ua.submit(dial).result(10)
        wait_events(began + timeout)
        if answered_at is None and not ended:
            report["error"] = f"no answer within {timeout:g} s"
        if answered_at is not None:
            wait_events(answered_at + seconds)
            report["hung_up"] = "gateway" if ended else "caller"
        if not ended:
            if answered_at is not None:
                stats = ua.submit(on_leg("stream_stats")).result(5)
                stats["codec"] = ua.submit(on_leg_info(_stream_codec)).result(5)
                stats["srtp"] = ua.submit(on_leg_info(lambda leg: leg.srtp)).result(5)
            ua.post(on_leg("bye"))
            wait_events(time.monotonic() + 5)
    finally:
        ua.stop()
    times = list(buffers.times)
    pcm = np.frombuffer(b"".join(bytes(v) for v in buffers.inbound), "<i2")
    report.update(_audio_report(pcm, times, answered_at))
    report.update(stats)
    report["answered"] = answered_at is not None
    return CallResult(report, pcm)


def _stream_codec(leg: Leg) -> str | None:
    """The audio stream's codec as name/clock rate (pjsua thread), e.g. ``PCMA/8000``."""
    try:
        info = leg.getStreamInfo(0)
    except pj.Error:
        return None
    return f"{info.codecName}/{info.codecClockRate}"


def _audio_report(pcm: np.ndarray, times: list[float], answered_at: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds_received": round(len(pcm) / CLOCK_RATE, 2)}
    n = BYTES_PER_FRAME // 2
    first = None
    for i, at in enumerate(times):
        frame = pcm[i * n:(i + 1) * n].astype(np.float64)
        if len(frame) < n:
            break
        rms = np.sqrt(np.mean(frame**2)) / 32768
        if rms > 0 and 20 * np.log10(rms) > SILENCE_DBFS and not is_ringback(frame):
            first = at
            break
    if first is not None and answered_at is not None:
        out["seconds_200_to_first_audio"] = round(first - answered_at, 4)
    if len(times) > 2:
        gaps = np.diff(np.array(times)) * 1000
        out["frame_interval_ms"] = {"p50": round(float(np.percentile(gaps, 50)), 2),
                                    "p99": round(float(np.percentile(gaps, 99)), 2)}
    return out
