"""A call's audio between pjsua's conference bridge (20 ms, 16 kHz) and the agent session (80 ms, 24 kHz).

Two halves on two threads:

- ``ua.FramePort`` (an ``AudioMediaPort`` lent to the call) is called by the bridge's clock thread every 20 ms,
  holding the GIL, and hands each frame to the call's ``MediaBuffers``. Its callbacks only copy: a received frame is copied (a C++ vector copy, no Python loop)
  into the inbound queue; a requested frame is the next frame of the consent announcement, a ringback frame,
  the next prepared outbound frame, or silence; with a recorder attached each tick's pair (what came in, what
  went out) is appended to its bounded queue (``recording.py``). Nothing there calls pjsua, allocates big
  objects, or waits.
- ``MediaBridge`` (asyncio, one per call) does the rest: 20 ms caller frames → ``LineToModel`` (a stateful
  resampler from ``gateway/audio``, 16 → 24 kHz, and exact 80 ms framing) → ``AgentCall.send``; agent frames → ``ModelToLine``
  (24 → 16 kHz, 20 ms packets) → ``OutboundPacer``, which is shallow and sheds instead of building lag, so
  barge-in stays immediate, and counts underruns (silence played) and sheds.

**Holding the agent.** The worker steps a session only when it gets a caller frame, so the bridge can keep
the agent silent, with its state untouched, simply by not sending caller audio yet (``MediaBridge._hold``):

- while the consent announcement plays (``hold_until`` is set when its last frame has gone out): the agent
  neither talks over the notice nor hears the caller during it; its greeting comes after the notice;
- for a persona with ``speaks_first: false``, until the caller speaks: a simple energy detector on the
  caller's 20 ms frames (``gateway/audio/speech.py``) opens the hold, and the
  frames that fired it go to the agent too (``PRE_ROLL_FRAMES``), so it hears the caller's first syllable.
  Since the model has not stepped until then, it has not greeted anyone: what it says first is an answer
  to the caller. A caller who says nothing (waiting for a greeting) is not left in silence: after
  ``wait_for_caller`` seconds (``sip_caller_first_wait_seconds``) the agent is released and speaks first.

Resampling, framing and the outbound pacer are ``gateway/audio``'s.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable

import numpy as np
import pjsua2 as pj

from ..audio import LineToModel, ModelToLine, OutboundPacer
from ..audio.speech import SpeechStart
from ..calls import AgentCall
from ..worker_client import AgentAudio
from .recording import CallRecorder
from .ua import BYTES_PER_FRAME, CLOCK_RATE, PTIME_MS, SAMPLES_PER_FRAME

MODEL_RATE = 24_000
INBOUND_FRAMES = 25  # 500 ms of caller audio waiting for the asyncio side; older frames are dropped
FRAMES_PER_WAKE = 4  # the asyncio side is woken once per 80 ms of caller audio
CUSHION_PACKETS = 1  # outbound packets kept against the worker's jitter: sip_outbound_cushion_packets' default
LINE_FRAME_MODEL_SAMPLES = MODEL_RATE * PTIME_MS // 1000  # one 20 ms line frame, resampled: 480
# The caller audio handed to the agent when the caller starts to speak (``SpeechStart``): the last 80 ms (one
# model frame), which hold the frames that fired it. No more: the worker steps one frame per 80 ms, so a longer
# burst would wait in its input queue, and every word after it would reach the agent that much later for the
# rest of the call.
PRE_ROLL_FRAMES = 4


def _vector(pcm: bytes) -> pj.ByteVector:
    return pj.ByteVector(pcm)


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
    """What the bridge thread and the asyncio side share: a bounded deque of caller frames (append and
    popleft are atomic) and the outbound pacer (``gateway/audio``: shallow, sheds, counts underruns)."""

    def __init__(self, *, inbound_frames: int | None = INBOUND_FRAMES, cushion_packets: int = CUSHION_PACKETS) -> None:
        self.inbound: collections.deque[pj.ByteVector] = collections.deque(maxlen=inbound_frames)
        self.pacer = OutboundPacer(SAMPLES_PER_FRAME, cushion_packets=cushion_packets)
        self._out = np.zeros(SAMPLES_PER_FRAME, dtype=np.int16)  # the pacer copies each packet into it
        self.ringback: tuple[pj.ByteVector, ...] | None = None
        self._ring_at = 0
        self._announcement: tuple[tuple[pj.ByteVector, bytes], ...] | None = None
        self._announce_at = 0
        self._announced: Callable[[], None] | None = None  # called (clock thread) after its last frame
        self.recorder: CallRecorder | None = None
        self._heard: pj.ByteVector | None = None  # the caller's frame this tick, for the recorder
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
        vector = pj.ByteVector(frame.buf)
        self.inbound.append(vector)
        self._heard = vector
        self.received += 1
        notify = self.notify  # read once: the asyncio side may clear it meanwhile
        if notify is not None and len(self.inbound) >= self.wake_frames:
            notify()

    def frame_requested(self, frame: pj.MediaFrame) -> None:
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        ringback = self.ringback
        announcement = self._announcement
        sent: bytes | None = None
        if announcement is not None:
            frame.buf, sent = announcement[self._announce_at]
            self._announce_at += 1
            if self._announce_at == len(announcement):
                self._announcement = None
                if self._announced is not None:
                    self._announced()
        elif ringback is not None and not self.pacer.depth:
            frame.buf = ringback[self._ring_at % len(ringback)]
            self._ring_at += 1
        else:
            sent = self.pacer.get(self._out).tobytes()
            frame.buf = pj.ByteVector(sent)
        frame.size = BYTES_PER_FRAME
        recorder = self.recorder
        if recorder is not None:
            recorder.put(self._heard, sent if sent is not None else bytes(frame.buf))
            self._heard = None

    def announce(self, frames: tuple[bytes, ...], done: Callable[[], None]) -> None:
        """Play ``frames`` (20 ms s16le at the bridge's rate) once, before anything else; ``done`` is called
        from the clock thread after the last one has gone out."""
        if not frames:
            done()
            return
        self._announce_at = 0
        self._announced = done
        self._announcement = tuple((pj.ByteVector(f), f) for f in frames)

    # the asyncio side

    def take_inbound(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(self.inbound.popleft())
            except IndexError:
                break
        return b"".join(bytes(c) for c in chunks)


class MediaBridge:
    """Caller audio to the agent and agent audio to the caller, for one live call (asyncio side)."""

    def __init__(self, buffers: MediaBuffers, call: AgentCall, on_agent_audio: Callable[[], None] | None = None,
                 *, hold_until: asyncio.Event | None = None, wait_for_caller: float | None = None) -> None:
        """``hold_until``: no caller audio reaches the agent before it is set (the announcement);
        ``wait_for_caller``: nor, after that, before the caller speaks (``speaks_first: false``) or this many
        seconds pass (``math.inf``: however long)."""
        self.buffers = buffers
        self.call = call
        self._wake = asyncio.Event()
        self._on_agent_audio = on_agent_audio
        self._hold_until = hold_until
        self._wait_for_caller = wait_for_caller
        # time.monotonic() when the agent first heard the caller, and why then: "answer" (no hold),
        # "announcement" (its end), "caller" (the caller's voice), "wait" (the caller said nothing in time)
        self.released_at: float | None = None
        self.released_by: str | None = None
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
        line = LineToModel(CLOCK_RATE)
        buffers = self.buffers
        buffers.take_inbound()  # what arrived before the call was live (ringing) is not the agent's
        pcm, self.released_by = await self._hold()
        self.released_at = time.monotonic()
        # Released to speak first: the first caller packet completes a frame at once, led by silence
        # (``LineToModel.complete_with_silence``), so the agent starts 60 ms sooner, on the same 80 ms cadence.
        start_now = self.released_by != "caller"
        while True:
            if pcm:
                frames = line.push(pcm)
                if start_now and not frames:
                    frames = [frame for frame in (line.complete_with_silence(),) if frame is not None]
                start_now = False
                for frame in frames:
                    self.call.send(frame)
            filled = round(line.pending_samples / LINE_FRAME_MODEL_SAMPLES)
            buffers.wake_frames = 1 if start_now else max(1, FRAMES_PER_WAKE - filled)
            if len(buffers.inbound) < buffers.wake_frames:  # else a frame came meanwhile and did not wake us
                await self._wake.wait()
                self._wake.clear()
            pcm = buffers.take_inbound()

    async def _hold(self) -> tuple[bytes, str]:
        """Until the agent may hear the caller (see the module's docstring); returns the caller audio it hears
        first (the pre-roll), dropping the rest, and what released it."""
        if self._hold_until is not None:
            until = asyncio.create_task(self._hold_until.wait())
            until.add_done_callback(lambda _: self._wake.set())
            try:
                while not self._hold_until.is_set():
                    await self._wake.wait()
                    self._wake.clear()
                    self.buffers.take_inbound()  # the caller talking over the notice: not for the agent
            finally:
                until.cancel()
        if self._wait_for_caller is None:
            return b"", "answer" if self._hold_until is None else "announcement"
        try:
            async with asyncio.timeout(None if math.isinf(self._wait_for_caller) else self._wait_for_caller):
                return await self._caller_speaks(), "caller"
        except TimeoutError:
            return b"", "wait"

    async def _caller_speaks(self) -> bytes:
        start = SpeechStart(SAMPLES_PER_FRAME, PRE_ROLL_FRAMES * SAMPLES_PER_FRAME)
        while True:
            await self._wake.wait()
            self._wake.clear()
            heard = start.push(self.buffers.take_inbound())
            if heard is not None:
                return heard

    async def _agent_to_caller(self) -> None:
        line = ModelToLine(CLOCK_RATE, packet_ms=PTIME_MS)
        pacer = self.buffers.pacer
        async for event in self.call.frames():
            if not isinstance(event, AgentAudio):
                continue
            for packet in line.push(event.pcm):
                pacer.put(packet, filler=event.filler)
            if self._on_agent_audio is not None and not event.filler:
                self._on_agent_audio()


__all__ = ["RINGBACK", "MediaBridge", "MediaBuffers"]
