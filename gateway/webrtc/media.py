"""A browser call's audio between aiortc (Opus, 48 kHz, 20 ms) and the agent session (24 kHz, 80 ms).

``CallerAudio`` reads aiortc's unbounded decode queue as frames come (dropping a backlog older than
``INBOUND_BACKLOG_FRAMES`` rather than feeding the agent late) into one stateful ``LineToModel(48000)``;
``HumanAudio`` sends the browser's audio to the human's SIP leg instead once an escalation is answered;
``AgentTrack`` paces agent audio itself on the event loop's clock, because aiortc sends whatever ``recv()``
returns as fast as it returns it: packet *n* is due at ``start + n·20 ms``, and a stall over ``STALL_SECONDS``
rebases the clock (and the RTP timestamps) instead of bursting the backlog. Frames go out stereo: aiortc's
Opus encoder is stereo, and its converter would mix mono in 3 dB down.

Contract: until the call is live the agent hears nothing; from then on, the call core's speaks-first gate
decides (``gateway/call/audio.py``).

Details: docs/webrtc.md#media.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from aiortc import MediaStreamTrack, RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from ..audio import OutboundPacer, Repacketizer
from ..call.line import CLOCK_RATE as LEG_RATE
from ..call.line import SAMPLES_PER_FRAME as LEG_PACKET_SAMPLES

if TYPE_CHECKING:
    from ..call.audio import CallerToAgent
    from ..call.recording import CallRecorder
    from ..sip.media import MediaBuffers

log = logging.getLogger(__name__)

RATE = 48_000
PACKET_SECONDS = 0.02
PACKET_SAMPLES = 960  # 20 ms at 48 kHz
STALL_SECONDS = 0.1  # the outbound clock this late: rebase instead of bursting
INBOUND_BACKLOG_FRAMES = 5  # 100 ms of decoded browser audio may wait; older frames are dropped
TIME_BASE = fractions.Fraction(1, RATE)
MAX_OPUS_FRAME_SAMPLES = 6 * PACKET_SAMPLES  # a browser may send Opus frames of up to 120 ms
HUMAN_BURST_SAMPLES = 25 * LEG_PACKET_SAMPLES  # what the human's tap may hold at once (MediaBuffers' inbound bound)
RECORDED_CALLER_PACKETS = 40  # the caller's side of a recording waits at most this many ticks for the clock


class AgentTrack(MediaStreamTrack):
    """The agent's voice as the browser hears it: 20 ms mono frames at 48 kHz, paced in real time."""

    kind = "audio"

    def __init__(self, pacer: OutboundPacer) -> None:
        super().__init__()
        self.pacer = pacer
        self.stalls = 0
        self._packet = np.zeros(PACKET_SAMPLES, dtype=np.int16)
        self._stereo = np.zeros((1, 2 * PACKET_SAMPLES), dtype=np.int16)
        self._start: float | None = None
        self._sent = 0  # packets (and timestamp steps) since the start
        self._announcement: tuple[bytes, ...] = ()
        self._announce_at = 0
        self._announced: Callable[[], None] | None = None
        self.recording: BrowserRecording | None = None

    def announce(self, frames: tuple[bytes, ...], done: Callable[[], None]) -> None:
        """Play ``frames`` (20 ms, 48 kHz s16le) before anything else; ``done`` once the last has gone out."""
        self._announcement, self._announce_at, self._announced = frames, 0, done
        if not frames:
            done()

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._start is None:
            self._start = now
        else:
            due = self._start + self._sent * PACKET_SECONDS
            if now - due > STALL_SECONDS:
                self.stalls += 1
                self._sent += int((now - due) / PACKET_SECONDS)  # the timestamps skip the gap
            elif due > now:
                await asyncio.sleep(due - now)
        if self._announce_at < len(self._announcement):
            self._packet[:] = np.frombuffer(self._announcement[self._announce_at], "<i2")
            self._announce_at += 1
            if self._announce_at == len(self._announcement) and self._announced is not None:
                self._announced()
        else:
            self.pacer.get(self._packet)
        if self.recording is not None:
            self.recording.tick(self._packet)
        self._stereo[0, 0::2] = self._packet
        self._stereo[0, 1::2] = self._packet
        frame = AudioFrame.from_ndarray(self._stereo, format="s16", layout="stereo")
        frame.sample_rate = RATE
        frame.pts = self._sent * PACKET_SAMPLES
        frame.time_base = TIME_BASE
        self._sent += 1
        return frame


class CallerAudio:
    """Reads the browser's audio track for the whole call; passes it on once the call is live (``connect``: through
    the call core's speaks-first gate to the agent), or to the human after an escalation (``divert``)."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.track = track
        self.frames = 0  # frames read
        self.dropped = 0  # frames dropped unread (the loop was behind)
        self._to_agent: CallerToAgent | None = None
        self._divert: Callable[[np.ndarray], None] | None = None
        self.recording: BrowserRecording | None = None

    def connect(self, to_agent: CallerToAgent) -> None:
        """From now on the caller's audio goes to the agent, as ``to_agent``'s gate lets it."""
        self._to_agent = to_agent

    def divert(self, sink: Callable[[np.ndarray], None]) -> None:
        """From now on the caller's audio (48 kHz mono int16, per frame) goes to ``sink``, not the agent."""
        self._divert = sink

    async def run(self) -> None:
        """Until the track ends (the browser hung up or the connection closed)."""
        queue: asyncio.Queue[object] | None = getattr(self.track, "_queue", None)  # aiortc's, unbounded
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            self.frames += 1
            if queue is not None:
                self._drop_backlog(queue)
            pcm = _mono(frame)
            if self.recording is not None:
                self.recording.heard_caller(pcm)
            if self._divert is not None:
                self._divert(pcm)
            elif self._to_agent is not None:  # else ringing: the agent is not live yet
                self._to_agent.push(pcm.tobytes())

    def _drop_backlog(self, queue: asyncio.Queue[object]) -> None:
        while queue.qsize() > INBOUND_BACKLOG_FRAMES:
            item = queue.get_nowait()
            if item is None:  # the track's end: keep it for the next recv()
                queue.put_nowait(None)
                return
            self.dropped += 1


def set_jitter_buffer(receiver: RTCRtpReceiver, packets: int) -> bool:
    """Make ``receiver`` hold ``packets`` packets of the browser's audio before it decodes the oldest (aiortc
    holds 4: 80 ms added to everything the caller says, before the agent hears it). Set before media flows.

    Its capacity is the smallest power of two above ``packets``, not aiortc's 16: the buffer stops at a lost
    packet until the gap is ``capacity`` packets old, then goes on releasing one packet per packet received, so
    whatever it held at a loss it holds for the rest of the call. With 16, one lost packet would add 240 ms to
    every word after it; with 4 (2 packets held) the hold stays at 2 after losses, and at most 3 after packets
    arrive out of order (``tests/test_webrtc_media.py``).

    aiortc has no setting for it: its private buffer is replaced; False (aiortc's own kept) if it has none."""
    name = "_RTCRtpReceiver__jitter_buffer"
    if not isinstance(getattr(receiver, name, None), JitterBuffer):
        log.warning("aiortc's receiver has no jitter buffer where expected: webrtc_jitter_buffer_packets ignored")
        return False
    setattr(receiver, name, JitterBuffer(capacity=1 << packets.bit_length(), prefetch=packets))
    return True


def _mono(frame: AudioFrame) -> np.ndarray:
    """A decoded frame (s16, packed, any channel count) as mono int16."""
    samples = frame.to_ndarray().reshape(-1)
    channels = len(frame.layout.channels)
    if channels == 1:
        return samples.astype(np.int16, copy=False)
    return samples.reshape(-1, channels).mean(axis=1).astype(np.int16)


class HumanAudio:
    """The browser ⇄ a human's SIP leg (its ``MediaBuffers`` tap, 16 kHz, 20 ms), after an escalation."""

    def __init__(self, buffers: MediaBuffers, browser_pacer: OutboundPacer) -> None:
        self.buffers = buffers
        self.browser_pacer = browser_pacer
        self._to_human = Repacketizer(RATE, LEG_RATE, max_push_samples=MAX_OPUS_FRAME_SAMPLES)
        self._to_browser = Repacketizer(LEG_RATE, RATE, max_push_samples=HUMAN_BURST_SAMPLES)
        self._wake = asyncio.Event()

    def from_browser(self, pcm: np.ndarray) -> None:
        """One frame of the browser's audio (48 kHz mono) for the human."""
        for packet in self._to_human.push(pcm):
            self.buffers.pacer.put(packet)

    async def run(self) -> None:
        """The human's audio to the browser, as it comes (woken per 20 ms frame), until cancelled."""
        loop = asyncio.get_running_loop()
        self.buffers.wake_frames = 1
        self.buffers.notify = lambda: loop.call_soon_threadsafe(self._wake.set)
        self._wake.set()  # what the tap heard since the human answered is the human's first words: play it
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                for packet in self._to_browser.push(self.buffers.take_inbound()):
                    self.browser_pacer.put(packet)
        finally:
            self.buffers.notify = None


class BrowserRecording:
    """A browser call into a ``CallRecorder`` (16 kHz stereo: the caller left, what the caller heard right): both
    sides resampled from 48 kHz, one tick per packet of the outbound track's clock, so they stay aligned."""

    def __init__(self, recorder: CallRecorder) -> None:
        self.recorder = recorder
        self._caller = Repacketizer(RATE, LEG_RATE, max_push_samples=MAX_OPUS_FRAME_SAMPLES)
        # the caller's packets waiting for their tick; if the clock stalls for long, the oldest go
        self._caller_packets: collections.deque[np.ndarray] = collections.deque(maxlen=RECORDED_CALLER_PACKETS)
        self._heard = Repacketizer(RATE, LEG_RATE, max_push_samples=PACKET_SAMPLES)

    def heard_caller(self, pcm: np.ndarray) -> None:
        """One frame of the caller's audio (48 kHz mono)."""
        self._caller_packets.extend(self._caller.push(pcm))

    def tick(self, sent: np.ndarray) -> None:
        """One packet sent to the browser (48 kHz), with the caller's packet of the same tick, to the recorder."""
        for heard in self._heard.push(sent):
            caller = self._caller_packets.popleft() if self._caller_packets else None
            self.recorder.put(caller.tobytes() if caller is not None else None, heard.tobytes())
