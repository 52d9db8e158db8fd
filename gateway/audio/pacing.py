"""The outbound buffer between the agent (80 ms frames, cut into line packets) and the 20 ms media clock.

Kept shallow on purpose: whatever is queued here has been committed to the caller's ear and cannot be taken
back at barge-in, so queue depth sets the latency floor.

Contract: at most ``frame_packets + cushion_packets`` packets wait, the oldest shed first; a standing excess
over ``window_packets`` ticks is shed too; an empty tick plays silence (or repeats comfort noise) and counts as
an underrun once audio began; ``flush()`` drops everything. One producer (the asyncio loop: ``put``,
``flush``) and one consumer (the media clock thread: ``get``), each holding one small lock for microseconds.

Details: docs/audio.md#the-outbound-buffer-pacingpy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PacerStats:
    depth: int  # packets waiting now
    underruns: int  # ticks filled with silence / repeated filler after audio began
    shed: int  # packets dropped to keep the lag bounded (flushes not included)
    played: int  # packets handed to the clock from the buffer
    flushed: int  # packets dropped by flush()


class OutboundPacer:
    """A bounded FIFO of ``packet_samples``-sample int16 packets (see the module docstring)."""

    def __init__(self, packet_samples: int, *, cushion_packets: int = 2, frame_packets: int = 4,
                 window_packets: int = 25) -> None:
        if packet_samples < 1 or cushion_packets < 0 or frame_packets < 1 or window_packets < 1:
            raise ValueError("packet_samples and frame_packets must be positive, cushion_packets not negative")
        self.packet_samples = packet_samples
        self.cushion_packets = cushion_packets
        self.capacity = frame_packets + cushion_packets
        self.window_packets = window_packets
        self._ring = np.zeros((self.capacity, packet_samples), dtype=np.int16)
        self._filler = np.zeros(self.capacity, dtype=bool)
        self._last = np.zeros(packet_samples, dtype=np.int16)  # the last packet played
        self._last_filler = False
        self._head = 0  # index of the oldest packet
        self._count = 0
        self._lock = threading.Lock()
        self._started = False  # audio has been played since the start or the last flush
        self._window_min = self.capacity  # lowest depth seen at a tick in the current window
        self._window_ticks = 0
        self.underruns = 0
        self.shed = 0
        self.played = 0
        self.flushed = 0

    @property
    def depth(self) -> int:
        return self._count

    def put(self, packet: np.ndarray, filler: bool = False) -> None:
        """Queue one packet (producer side); a full buffer drops its oldest packet to make room."""
        if packet.shape != (self.packet_samples,):
            raise ValueError(f"packet must be {self.packet_samples} samples, got shape {packet.shape}")
        with self._lock:
            if self._count == self.capacity:
                self._head = (self._head + 1) % self.capacity
                self._count -= 1
                self.shed += 1
            slot = (self._head + self._count) % self.capacity
            self._ring[slot] = packet
            self._filler[slot] = filler
            self._count += 1

    def get(self, out: np.ndarray | None = None) -> np.ndarray:
        """The packet to play this tick (consumer side), copied into ``out`` (allocated if None): the
        oldest queued packet, or silence / the last filler packet again on underrun."""
        if out is None:
            out = np.empty(self.packet_samples, dtype=np.int16)
        with self._lock:
            if self._count:
                slot = self._head
                out[:] = self._ring[slot]
                self._last[:] = self._ring[slot]
                self._last_filler = bool(self._filler[slot])
                self._head = (slot + 1) % self.capacity
                self._count -= 1
                self.played += 1
                self._started = True
            else:
                if self._started:
                    self.underruns += 1
                if self._last_filler:
                    out[:] = self._last
                else:
                    out[:] = 0
            self._watch_lag()
        return out

    def _watch_lag(self) -> None:
        """Shed standing lag: depth left after the tick's packet above the cushion at every tick of a whole
        window (lock held)."""
        self._window_min = min(self._window_min, self._count)
        self._window_ticks += 1
        if self._window_ticks < self.window_packets:
            return
        excess = self._window_min - self.cushion_packets
        if excess > 0:
            drop = min(excess, self._count)
            self._head = (self._head + drop) % self.capacity
            self._count -= drop
            self.shed += drop
        self._window_ticks = 0
        self._window_min = self.capacity

    def flush(self) -> int:
        """Drop everything queued at once (barge-in, hold); returns the packets dropped. The next ticks
        play silence, not counted as underruns until audio comes again."""
        with self._lock:
            dropped = self._count
            self._count = 0
            self._head = 0
            self.flushed += dropped
            self._started = False
            self._last_filler = False
            self._window_ticks = 0
            self._window_min = self.capacity
        return dropped

    def stats(self) -> PacerStats:
        with self._lock:
            return PacerStats(self._count, self.underruns, self.shed, self.played, self.flushed)
