"""Re-chunking between 20 ms line packets and 80 ms model frames.

A resampler may emit irregular counts (soxr's bursts; a packet that ends between two output samples), so both directions go through a ``Rechunker``: samples of any count in, chunks of an
exact size out, no sample lost, duplicated or reordered. Its storage is allocated once.

- ``LineToModel(line_rate)``: line packets (int16 at the line rate) -> 1920-sample 24 kHz frames as the
  3840 bytes ``AgentCall.send`` takes.
- ``ModelToLine(line_rate)``: agent frames (3840 bytes, or int16 samples) -> line packets of
  ``line_rate * packet_ms / 1000`` int16 samples, for the ``OutboundPacer``. It is a ``Repacketizer``: any rate
  to packets of any other (a browser bridged to a SIP leg, 48 ⇄ 16 kHz; a browser call's recording).
"""

from __future__ import annotations

import numpy as np

from personagate_common.protocol import FRAME_BYTES, FRAME_SAMPLES

from .resample import MODEL_RATE, StreamResampler

MODEL_FRAME_SAMPLES = FRAME_SAMPLES  # one model step: 80 ms at 24 kHz
MODEL_FRAME_BYTES = FRAME_BYTES

PACKET_MS = 20


class Rechunker:
    """Samples of any count in, chunks of exactly ``chunk`` samples out (FIFO).

    Holds at most ``capacity`` samples (default: four chunks); pushing more than fits raises
    OverflowError, since losing audio silently here would be a bug (pop chunks as they become ready).
    """

    def __init__(self, chunk: int, dtype: np.dtype | type | str = np.int16, capacity: int | None = None) -> None:
        if chunk < 1:
            raise ValueError("chunk must be at least 1 sample")
        self.chunk = chunk
        self.dtype = np.dtype(dtype)
        self._buf = np.zeros(capacity or 4 * chunk, dtype=self.dtype)
        self._len = 0  # samples waiting at the start of _buf

    @property
    def pending(self) -> int:
        """Samples waiting for a chunk to fill."""
        return self._len

    def push(self, samples: np.ndarray) -> None:
        n = len(samples)
        if self._len + n > len(self._buf):
            raise OverflowError(f"{self._len + n} samples pending, capacity {len(self._buf)}: pop chunks first")
        self._buf[self._len:self._len + n] = samples
        self._len += n

    def pop(self) -> np.ndarray | None:
        """The next full chunk (a new array), or None while fewer than ``chunk`` samples wait."""
        if self._len < self.chunk:
            return None
        out = self._buf[:self.chunk].copy()
        rest = self._len - self.chunk
        if rest:
            self._buf[:rest] = self._buf[self.chunk:self._len]  # at most a few chunks: one memmove
        self._len = rest
        return out

    def pop_partial(self) -> np.ndarray | None:
        """What waits for the next chunk to fill (a new array, shorter than a chunk), or None if nothing does."""
        if not self._len:
            return None
        out = self._buf[:self._len].copy()
        self._len = 0
        return out

    def clear(self) -> None:
        self._len = 0


class LineToModel:
    """Caller audio: line packets at ``line_rate`` -> 80 ms model frames (s16le bytes, 24 kHz)."""

    def __init__(self, line_rate: int, *, quality: str = "HQ", engine: str = "fir") -> None:
        self.line_rate = line_rate
        self.resampler = StreamResampler(line_rate, MODEL_RATE, np.int16, quality=quality, engine=engine)
        # room for a frame in progress plus a burst of several packets' worth of resampled audio
        self._frames = Rechunker(MODEL_FRAME_SAMPLES, np.int16, capacity=8 * MODEL_FRAME_SAMPLES)

    def push(self, packet: np.ndarray | bytes) -> list[bytes]:
        """One line packet (int16 samples or s16le bytes, any length); returns the model frames it
        completes (usually none or one)."""
        samples = np.frombuffer(packet, dtype="<i2") if isinstance(packet, bytes | bytearray | memoryview) else packet
        frames = self._frames
        frames.push(self.resampler.process(samples))
        out: list[bytes] = []
        while (frame := frames.pop()) is not None:
            out.append(frame.astype("<i2", copy=False).tobytes())
        return out

    def complete_with_silence(self) -> bytes | None:
        """The frame in progress, completed now with silence in front of the caller audio it holds (None when it
        holds none). How a front end releases an agent to speak first: the worker steps a session only on caller
        audio, so the agent's greeting would otherwise wait for a whole 80 ms of the caller's audio to gather.
        Frames after it complete on the same 80 ms cadence as before, one every four 20 ms packets, so none
        ever waits behind another at the worker. (A separate silent frame sent at the release would: the next
        frame, complete less than 80 ms later, could reach the worker before its tick took the first, and the
        extra frame would then wait there, 80 ms later for every word, for the rest of the call.)"""
        held = self._frames.pop_partial()
        if held is None:
            return None
        frame = np.zeros(MODEL_FRAME_SAMPLES, dtype="<i2")
        frame[MODEL_FRAME_SAMPLES - len(held):] = held
        return frame.tobytes()

    @property
    def pending_samples(self) -> int:
        """24 kHz samples waiting for their frame to fill."""
        return self._frames.pending

    @property
    def delay_seconds(self) -> float:
        """How long caller audio waits here now: the resampler's delay plus the partial frame."""
        return self.resampler.delay_seconds + self._frames.pending / MODEL_RATE

    def reset(self) -> None:
        """Start afresh (after hold, or a re-INVITE that changed the codec's rate: make a new one then)."""
        self.resampler.reset()
        self._frames.clear()


class Repacketizer:
    """A stream at ``in_rate`` (int16, any count per push) -> packets of ``packet_ms`` at ``out_rate``, through one
    stateful resampler. ``max_push_samples``: the most one push brings (sizes the buffer)."""

    def __init__(self, in_rate: int, out_rate: int, *, max_push_samples: int, packet_ms: int = PACKET_MS,
                 quality: str = "HQ", engine: str = "fir") -> None:
        if out_rate * packet_ms % 1000:
            raise ValueError(f"{packet_ms} ms is not a whole number of samples at {out_rate} Hz")
        self.packet_samples = out_rate * packet_ms // 1000
        self.resampler = StreamResampler(in_rate, out_rate, np.int16, quality=quality, engine=engine)
        push_out = -(-max_push_samples * out_rate // in_rate)
        self._packets = Rechunker(self.packet_samples, np.int16, capacity=4 * push_out + 4 * self.packet_samples)

    def push(self, samples: np.ndarray | bytes) -> list[np.ndarray]:
        """Samples (int16, or s16le bytes); returns the packets they complete, as int16 arrays of
        ``packet_samples``."""
        if isinstance(samples, bytes | bytearray | memoryview):
            samples = np.frombuffer(samples, dtype="<i2")
        packets = self._packets
        packets.push(self.resampler.process(samples))
        out: list[np.ndarray] = []
        while (packet := packets.pop()) is not None:
            out.append(packet)
        return out

    def reset(self) -> None:
        self.resampler.reset()
        self._packets.clear()


class ModelToLine(Repacketizer):
    """Agent audio: 80 ms model frames (3840 bytes s16le, or 1920 int16 samples) -> line packets of ``packet_ms`` at
    ``line_rate`` (int16; usually four per frame)."""

    def __init__(self, line_rate: int, *, packet_ms: int = PACKET_MS, quality: str = "HQ",
                 engine: str = "fir") -> None:
        super().__init__(MODEL_RATE, line_rate, max_push_samples=MODEL_FRAME_SAMPLES, packet_ms=packet_ms,
                         quality=quality, engine=engine)
        self.line_rate = line_rate
