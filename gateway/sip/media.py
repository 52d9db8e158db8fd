"""A call's audio between pjsua's conference bridge (20 ms, 16 kHz) and the agent session (80 ms, 24 kHz).

Two halves on two threads: ``ua.FramePort``'s callbacks run on the bridge's clock thread holding the GIL, so
they only copy frames into and out of the call's ``MediaBuffers`` (never calling pjsua, allocating or
waiting); ``MediaBridge`` (asyncio, one per call) does the rest with ``gateway/audio`` (resampling, 80 ms
framing, the shallow ``OutboundPacer`` that sheds rather than builds lag, so barge-in stays immediate).

What the agent hears and when (the speaks-first gate) is the call core's: ``gateway/call/audio.py``.

Details: docs/sip.md#recording-and-the-consent-announcement.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
from collections.abc import Callable

import numpy as np
import pjsua2 as pj

from ..audio import OutboundPacer
from ..audio.pacing import PacerStats
from ..call.audio import AgentStream, AgentToLine, CallerGate, CallerToAgent
from ..call.line import BYTES_PER_FRAME, CLOCK_RATE, PTIME_MS, SAMPLES_PER_FRAME
from ..call.recording import CallRecorder
from .ua import AgentSink

INBOUND_FRAMES = 25  # 500 ms of caller audio waiting for the asyncio side; older frames are dropped
FRAMES_PER_WAKE = 4  # the asyncio side is woken once per 80 ms of caller audio
CUSHION_PACKETS = 1  # outbound packets kept against the worker's jitter: sip_outbound_cushion_packets' default


def ringback_frames(rate: int = CLOCK_RATE) -> tuple[bytes, ...]:
    """North American ringback (440 + 480 Hz, 2 s on, 4 s off) at −19 dBFS per tone, as 20 ms frames."""
    on = int(2.0 * rate)
    t = np.arange(on) / rate
    tone = 0.11 * (np.sin(2 * math.pi * 440 * t) + np.sin(2 * math.pi * 480 * t))
    ramp = int(0.01 * rate)
    envelope = np.ones(on)
    envelope[:ramp] = np.linspace(0, 1, ramp)
    envelope[-ramp:] = np.linspace(1, 0, ramp)
    cycle = np.concatenate([tone * envelope, np.zeros(int(4.0 * rate))])
    pcm = np.round(cycle * 32767).astype("<i2")
    n = rate * PTIME_MS // 1000
    return tuple(pcm[i:i + n].tobytes() for i in range(0, len(pcm), n))


RINGBACK = ringback_frames()


class MediaBuffers:
    """What the bridge thread and the asyncio side share: a bounded deque of caller frames (append and
    popleft are atomic) and the outbound pacer (``gateway/audio``: shallow, sheds, counts underruns).

    Frames cross the SWIG boundary in one copy each way (``copy_to_bytearray``, ``assign_from_bytes``): a
    ``bytes(vector)`` or ``ByteVector(bytes)`` would convert each of a frame's 640 bytes through Python."""

    def __init__(self, *, inbound_frames: int | None = INBOUND_FRAMES, cushion_packets: int = CUSHION_PACKETS) -> None:
        self.inbound: collections.deque[bytearray] = collections.deque(maxlen=inbound_frames)
        self.pacer = OutboundPacer(SAMPLES_PER_FRAME, cushion_packets=cushion_packets)
        self._out = np.zeros(SAMPLES_PER_FRAME, dtype=np.int16)  # the pacer copies each packet into it
        self.ringback: tuple[bytes, ...] | None = None
        self._ring_at = 0
        self._announcement: tuple[bytes, ...] | None = None
        self._announce_at = 0
        self._announced: Callable[[], None] | None = None  # called (clock thread) after its last frame
        self.recorder: CallRecorder | None = None
        self._heard: bytearray | None = None  # the caller's frame this tick, for the recorder
        self.received = 0
        self.inbound_dropped = 0
        self.notify: Callable[[], None] | None = None  # wakes the asyncio side (thread-safe)
        # Caller frames that complete the next model frame: the asyncio side is woken as that frame fills, not
        # on a count of its own, which would hold a frame back up to 60 ms depending on when the call began.
        self.wake_frames = FRAMES_PER_WAKE

    # the bridge's clock thread

    def frame_received(self, frame: pj.MediaFrame) -> None:
        if frame.type != pj.PJMEDIA_FRAME_TYPE_AUDIO or frame.size != BYTES_PER_FRAME:
            return
        if len(self.inbound) == self.inbound.maxlen:
            self.inbound_dropped += 1
        pcm = bytearray(BYTES_PER_FRAME)
        frame.buf.copy_to_bytearray(pcm)
        self.inbound.append(pcm)
        self._heard = pcm
        self.received += 1
        notify = self.notify  # read once: the asyncio side may clear it meanwhile
        if notify is not None and len(self.inbound) >= self.wake_frames:
            notify()

    def frame_requested(self, frame: pj.MediaFrame) -> None:
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        ringback = self.ringback
        announcement = self._announcement
        pcm: bytes | np.ndarray
        if announcement is not None:
            pcm = announcement[self._announce_at]
            self._announce_at += 1
            if self._announce_at == len(announcement):
                self._announcement = None
                if self._announced is not None:
                    self._announced()
        elif ringback is not None and not self.pacer.depth:
            pcm = ringback[self._ring_at % len(ringback)]
            self._ring_at += 1
        else:
            pcm = self.pacer.get(self._out)
        frame.buf.assign_from_bytes(pcm)
        frame.size = BYTES_PER_FRAME
        recorder = self.recorder
        if recorder is not None:
            recorder.put(self._heard, pcm if isinstance(pcm, bytes) else pcm.tobytes())
            self._heard = None

    def announce(self, frames: tuple[bytes, ...], done: Callable[[], None]) -> None:
        """Play ``frames`` (20 ms s16le at the bridge's rate) once, before anything else; ``done`` is called
        from the clock thread after the last one has gone out."""
        if not frames:
            done()
            return
        self._announce_at = 0
        self._announced = done
        self._announcement = frames

    # the asyncio side

    def take_inbound(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(self.inbound.popleft())
            except IndexError:
                break
        return b"".join(chunks)

    def waiting(self) -> int:
        """Caller frames waiting for ``take_inbound``."""
        return len(self.inbound)

    def set_waker(self, wake: Callable[[], None] | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``wake`` called on ``loop`` once ``wake_frames`` caller frames wait (None: no more)."""
        self.notify = None if wake is None or loop is None else (lambda: loop.call_soon_threadsafe(wake))


class PortMedia(AgentSink):
    """An agent call's media: the Python side of its ``pj.AgentPort`` (deploy/pjsua2/ext/agent_port.hpp), with
    ``MediaBuffers``' interface for ``MediaBridge`` and ``InboundCall``. The port does the 20 ms work in C++ on
    the bridge's clock thread (caller frames in, the pacer, ringback, the announcement, recording taps); this side
    is woken on the event loop by the port's events (``UserAgent.ports.dispatch``), one call of the port per
    80 ms frame each way. Settings made before the call's audio is up (ringback while ringing) are applied when
    the port is attached; what the port counted is kept when it is given back, for the call record."""

    def __init__(self, *, inbound_frames: int = INBOUND_FRAMES, cushion_packets: int = CUSHION_PACKETS) -> None:
        self.inbound_frames = inbound_frames
        self.cushion_packets = cushion_packets
        self.pacer = _PortPacer(self)
        self._lock = threading.Lock()  # the pjsua thread attaches and detaches while the loop sets things
        self._port: pj.AgentPort | None = None
        self._wake: Callable[[], None] | None = None
        self._wake_frames = FRAMES_PER_WAKE
        self._ringback = False
        self._announcement: bytes | None = None  # waiting for the port
        self._announced: Callable[[], None] | None = None
        self._recorder: CallRecorder | None = None
        self._received = self._inbound_dropped = 0  # kept from the port when it is given back
        self._pacer_stats = PacerStats(0, 0, 0, 0, 0)

    # the pjsua thread (ua.FramePorts)

    def attach(self, port: pj.AgentPort) -> None:
        with self._lock:
            port.reset(self.inbound_frames, self.cushion_packets)
            port.setWakeFrames(self._wake_frames)
            port.setRingback(self._ringback)
            port.setRecording(self._recorder is not None)
            if self._announcement is not None:
                port.announce(self._announcement)
                self._announcement = None
            self._port = port

    def detach(self) -> None:
        with self._lock:
            port, self._port = self._port, None
            if port is None:
                return
            self._received, self._inbound_dropped = port.getReceived(), port.getInboundDropped()
            s = port.pacerStats()
            self._pacer_stats = PacerStats(s.depth, s.underruns, s.shed, s.played, s.flushed)
            recorded = port.takeRecorded() if self._recorder is not None else b""
        self._record(recorded)

    # the event loop

    def on_events(self, events: int) -> None:
        if events & pj.AGENT_PORT_RECORDED:
            port = self._port
            if port is not None:
                self._record(port.takeRecorded())
        if events & pj.AGENT_PORT_ANNOUNCED:
            done, self._announced = self._announced, None
            if done is not None:
                done()
        if events & pj.AGENT_PORT_INBOUND and self._wake is not None:
            self._wake()

    def set_waker(self, wake: Callable[[], None] | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``wake`` called (on the event loop, where the port's events are dispatched) once ``wake_frames`` caller
        frames wait (None: no more)."""
        self._wake = wake

    @property
    def wake_frames(self) -> int:
        return self._wake_frames

    @wake_frames.setter
    def wake_frames(self, frames: int) -> None:
        if frames == self._wake_frames:
            return
        with self._lock:
            self._wake_frames = frames
            if self._port is not None:
                self._port.setWakeFrames(frames)

    def take_inbound(self) -> bytes:
        port = self._port
        return port.takeInbound() if port is not None else b""

    def waiting(self) -> int:
        port = self._port
        return port.inboundWaiting() if port is not None else 0

    @property
    def received(self) -> int:
        port = self._port
        return port.getReceived() if port is not None else self._received

    @property
    def inbound_dropped(self) -> int:
        port = self._port
        return port.getInboundDropped() if port is not None else self._inbound_dropped

    @property
    def ringback(self) -> bool:
        return self._ringback

    @ringback.setter
    def ringback(self, frames: tuple[bytes, ...] | None) -> None:
        """``RINGBACK`` to play it while no agent audio is queued; None to stop."""
        with self._lock:
            self._ringback = frames is not None
            if self._port is not None:
                self._port.setRingback(self._ringback)

    def announce(self, frames: tuple[bytes, ...], done: Callable[[], None]) -> None:
        """Play ``frames`` (20 ms s16le at the bridge's rate) once, before anything else; ``done`` is called on the
        event loop after the last one has gone out."""
        if not frames:
            done()
            return
        self._announced = done
        with self._lock:
            if self._port is not None:
                self._port.announce(b"".join(frames))
            else:
                self._announcement = b"".join(frames)

    @property
    def recorder(self) -> CallRecorder | None:
        return self._recorder

    @recorder.setter
    def recorder(self, recorder: CallRecorder | None) -> None:
        """Each 20 ms tick's caller frame and the frame sent go to ``recorder`` (None: no more)."""
        with self._lock:
            port = self._port
            recorded = port.takeRecorded() if port is not None and self._recorder is not None else b""
            previous, self._recorder = self._recorder, recorder
            if port is not None:
                port.setRecording(recorder is not None)
        if previous is not None:
            _record_into(previous, recorded)

    def _record(self, recorded: bytes) -> None:
        recorder = self._recorder
        if recorder is not None:
            _record_into(recorder, recorded)


def _record_into(recorder: CallRecorder, recorded: bytes) -> None:
    """Ticks from ``AgentPort.takeRecorded`` (caller frame, then the frame sent: 2 x 640 bytes each)."""
    tick = 2 * BYTES_PER_FRAME
    for at in range(0, len(recorded) - tick + 1, tick):
        recorder.put(recorded[at:at + BYTES_PER_FRAME], recorded[at + BYTES_PER_FRAME:at + tick])


class _PortPacer:
    """``OutboundPacer``'s producer side for a ``PortMedia``: the pacer itself runs in the port (C++)."""

    def __init__(self, media: PortMedia) -> None:
        self._media = media

    def put(self, packet: np.ndarray, filler: bool = False) -> None:
        port = self._media._port
        if port is not None and not port.putPacket(packet, filler):
            raise ValueError(f"packet must be {SAMPLES_PER_FRAME} int16 samples, got {packet.nbytes} bytes")

    def flush(self) -> int:
        port = self._media._port
        return port.flush() if port is not None else 0

    @property
    def depth(self) -> int:
        return self.stats().depth

    def stats(self) -> PacerStats:
        port = self._media._port
        if port is None:
            return self._media._pacer_stats
        s = port.pacerStats()
        return PacerStats(s.depth, s.underruns, s.shed, s.played, s.flushed)


class MediaBridge:
    """A live call's audio on the event loop: the port's caller frames through the call core's ``CallerToAgent``
    (the speaks-first gate, 80 ms framing) to the agent, and the agent's frames through ``AgentToLine`` to the
    port's pacer. Woken once per model frame's worth of caller audio, or per packet while the first is awaited."""

    def __init__(self, buffers: MediaBuffers | PortMedia, agent: AgentStream, gate: CallerGate,
                 on_agent_audio: Callable[[], None]) -> None:
        self.buffers = buffers
        self.agent = agent
        self.gate = gate
        self._wake = asyncio.Event()
        self._on_agent_audio = on_agent_audio
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.buffers.set_waker(self._wake.set, asyncio.get_running_loop())
        self._tasks = [asyncio.create_task(self._caller_to_agent(), name=f"sip-{self.agent.call_id}-in"),
                       asyncio.create_task(self._agent_to_caller(), name=f"sip-{self.agent.call_id}-out")]

    async def stop(self) -> None:
        self.buffers.set_waker(None)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _caller_to_agent(self) -> None:
        to_agent = CallerToAgent(CLOCK_RATE, self.agent, self.gate)
        buffers = self.buffers
        buffers.take_inbound()  # what arrived before the call was live (ringing) is not the agent's
        while True:
            buffers.wake_frames = to_agent.frames_short()
            if buffers.waiting() < buffers.wake_frames:  # else a frame came meanwhile and did not wake us
                await self._wake.wait()
                self._wake.clear()
            pcm = buffers.take_inbound()
            if pcm:
                to_agent.push(pcm)

    async def _agent_to_caller(self) -> None:
        await AgentToLine(CLOCK_RATE, self.buffers.pacer, on_first_audio=self._on_agent_audio).run(self.agent)


__all__ = ["RINGBACK", "MediaBridge", "MediaBuffers", "PortMedia"]
