"""A call's audio between pjsua's conference bridge (20 ms, 16 kHz) and the agent session (80 ms, 24 kHz).

Two halves on two threads:

- ``FramePort`` (an ``AudioMediaPort``, one per call) is called by the bridge's clock thread every 20 ms,
  holding the GIL. Its callbacks only copy: a received frame is copied (a C++ vector copy, no Python loop)
  into the inbound queue; a requested frame is the next prepared outbound frame, a ringback frame, or
  silence. Nothing there calls pjsua, allocates big objects, or waits.
- ``MediaBridge`` (asyncio, one per call) does the rest: 4 × 20 ms caller frames → one stateful soxr
  resampler (16 → 24 kHz) → 80 ms frames → ``AgentCall.send``; agent frames → a second stateful resampler
  (24 → 16 kHz) → 20 ms frames → the outbound queue, which is shallow (``OUTBOUND_FRAMES``) and sheds its
  oldest frames instead of building lag, so barge-in stays immediate.

The framing and resampling here are deliberately small; ``gateway/audio`` (resamplers, pacer) replaces them.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
from collections.abc import Callable

import numpy as np
import pjsua2 as pj
import soxr

from ..calls import AgentCall
from ..worker_client import FRAME_BYTES, AgentAudio
from .ua import BYTES_PER_FRAME, CLOCK_RATE, PTIME_MS, SAMPLES_PER_FRAME

MODEL_RATE = 24_000
INBOUND_FRAMES = 25  # 500 ms of caller audio waiting for the asyncio side; older frames are dropped
OUTBOUND_FRAMES = 8  # 160 ms (two model frames) of agent audio ahead of the bridge; more is shed
FRAMES_PER_WAKE = 4  # the asyncio side is woken once per 80 ms of caller audio


def _vector(pcm: bytes) -> pj.ByteVector:
    return pj.ByteVector(pcm)


SILENCE = _vector(bytes(BYTES_PER_FRAME))


def ringback_frames(rate: int = CLOCK_RATE) -> tuple[pj.ByteVector, ...]:
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
    return tuple(_vector(pcm[i:i + n].tobytes()) for i in range(0, len(pcm), n))


RINGBACK = ringback_frames()


class MediaBuffers:
    """What the bridge thread and the asyncio side share: bounded deques (append and popleft are atomic)."""

    def __init__(self, *, inbound_frames: int = INBOUND_FRAMES, outbound_frames: int | None = OUTBOUND_FRAMES
                 ) -> None:
        self.inbound: collections.deque[pj.ByteVector] = collections.deque(maxlen=inbound_frames)
        self.outbound: collections.deque[pj.ByteVector] = collections.deque()
        self.outbound_frames = outbound_frames  # None: unbounded (a caller playing a file)
        self.ringback: tuple[pj.ByteVector, ...] | None = None
        self._ring_at = 0
        self.received = 0
        self.sent = 0
        self.underruns = 0  # the bridge asked for agent audio and none was there (silence was sent)
        self.sheds = 0  # agent frames dropped because the outbound queue was full
        self.inbound_dropped = 0
        self.first_agent_audio: float | None = None
        self.notify: Callable[[], None] | None = None  # wakes the asyncio side (thread-safe)
        self._lock = threading.Lock()  # only between push_out's shed and the bridge's popleft

    # the bridge's clock thread

    def frame_received(self, frame: pj.MediaFrame) -> None:
        if frame.type != pj.PJMEDIA_FRAME_TYPE_AUDIO or frame.size != BYTES_PER_FRAME:
            return
        if len(self.inbound) == self.inbound.maxlen:
            self.inbound_dropped += 1
        self.inbound.append(pj.ByteVector(frame.buf))
        self.received += 1
        if self.received % FRAMES_PER_WAKE == 0 and self.notify is not None:
            self.notify()

    def frame_requested(self, frame: pj.MediaFrame) -> None:
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        try:
            frame.buf = self.outbound.popleft()
            self.sent += 1
        except IndexError:
            ringback = self.ringback
            if ringback is not None:
                frame.buf = ringback[self._ring_at % len(ringback)]
                self._ring_at += 1
            else:
                if self.sent:
                    self.underruns += 1
                frame.buf = SILENCE
        frame.size = BYTES_PER_FRAME

    # the asyncio side

    def take_inbound(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(self.inbound.popleft())
            except IndexError:
                break
        return b"".join(bytes(c) for c in chunks)

    def push_out(self, pcm: bytes) -> None:
        """Queue 20 ms frames (``pcm`` a multiple of 640 bytes) for the caller, shedding the oldest."""
        frames = [_vector(pcm[i:i + BYTES_PER_FRAME]) for i in range(0, len(pcm), BYTES_PER_FRAME)]
        with self._lock:
            self.outbound.extend(frames)
            while self.outbound_frames is not None and len(self.outbound) > self.outbound_frames:
                try:
                    self.outbound.popleft()
                except IndexError:
                    break
                self.sheds += 1


class FramePort(pj.AudioMediaPort):
    """The call's tap on the bridge: 16 kHz mono s16le, 20 ms. Made and destroyed on the pjsua thread."""

    def __init__(self, buffers: MediaBuffers) -> None:
        super().__init__()
        self.buffers = buffers

    def create(self, name: str) -> None:
        fmt = pj.MediaFormatAudio()
        fmt.type = pj.PJMEDIA_TYPE_AUDIO
        fmt.clockRate = CLOCK_RATE
        fmt.channelCount = 1
        fmt.bitsPerSample = 16
        fmt.frameTimeUsec = PTIME_MS * 1000
        self.createPort(name, fmt)

    def onFrameReceived(self, frame: pj.MediaFrame) -> None:
        self.buffers.frame_received(frame)

    def onFrameRequested(self, frame: pj.MediaFrame) -> None:
        self.buffers.frame_requested(frame)


class MediaBridge:
    """Caller audio to the agent and agent audio to the caller, for one live call (asyncio side)."""

    def __init__(self, buffers: MediaBuffers, call: AgentCall, on_agent_audio: Callable[[], None] | None = None
                 ) -> None:
        self.buffers = buffers
        self.call = call
        self._wake = asyncio.Event()
        self._on_agent_audio = on_agent_audio
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.buffers.notify = lambda: loop.call_soon_threadsafe(self._wake.set)
        self._tasks = [asyncio.create_task(self._caller_to_agent(), name=f"sip-{self.call.call_id}-in"),
                       asyncio.create_task(self._agent_to_caller(), name=f"sip-{self.call.call_id}-out")]

    async def stop(self) -> None:
        self.buffers.notify = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _caller_to_agent(self) -> None:
        up = soxr.ResampleStream(CLOCK_RATE, MODEL_RATE, 1, dtype="int16", quality="HQ")
        pending = bytearray()
        self.buffers.take_inbound()  # what arrived before the call was live (ringing) is not the agent's
        while True:
            await self._wake.wait()
            self._wake.clear()
            pcm = self.buffers.take_inbound()
            if not pcm:
                continue
            pending += up.resample_chunk(np.frombuffer(pcm, "<i2")).tobytes()
            while len(pending) >= FRAME_BYTES:
                self.call.send(bytes(pending[:FRAME_BYTES]))
                del pending[:FRAME_BYTES]

    async def _agent_to_caller(self) -> None:
        down = soxr.ResampleStream(MODEL_RATE, CLOCK_RATE, 1, dtype="int16", quality="HQ")
        pending = bytearray()
        async for event in self.call.frames():
            if not isinstance(event, AgentAudio):
                continue
            pending += down.resample_chunk(np.frombuffer(event.pcm, "<i2")).tobytes()
            whole = len(pending) - len(pending) % BYTES_PER_FRAME
            if whole:
                self.buffers.push_out(bytes(pending[:whole]))
                del pending[:whole]
                if self._on_agent_audio is not None and not event.filler:
                    self._on_agent_audio()


__all__ = ["RINGBACK", "SAMPLES_PER_FRAME", "FramePort", "MediaBridge", "MediaBuffers"]
