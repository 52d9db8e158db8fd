"""One stateful streaming resampler per call and direction (soxr), between a line rate and the model's 24 kHz.

The filter state is carried from packet to packet, so packet edges leave no clicks, and soxr's output is
time-aligned with its input (its filter delay is trimmed at the start): output sample ``k`` is input time
``k / out_rate``. What a stream holds back is its *delay*: samples already given to it that have not come
out yet (``delay_seconds``).

Quality: soxr's ``HQ`` (default) or ``VHQ`` recipe. Measured (``tests/test_audio_path.py``, int16): a 5 kHz
tone or a 4-12 kHz sweep going 24 -> 8 kHz leaves 87 dB under its level in the 0-4 kHz band, which is the
int16 noise floor (in float32, aliases are over 130 dB down); 8 -> 24 -> 8 kHz keeps speech-like audio at
63 dB SNR (16 -> 24 -> 16 kHz: 73 dB), with no delay to align (the two streams are time-aligned).

The cost is latency: soxr's block engine emits in bursts (1468 samples every third 20 ms packet at
8 -> 24 kHz HQ; 3300 every eighth with VHQ) and so holds back about 40 ms per direction with HQ (up to
160 ms with VHQ). soxr's variable-rate engine (``vr=True``) emits every packet and holds back 20-40 ms,
but it loses the round trip's SNR (under 20 dB): not used. ``delay_seconds`` reports what is held now.
"""

from __future__ import annotations

import numpy as np
import soxr

MODEL_RATE = 24_000
LINE_RATES = (8_000, 16_000, 48_000)  # PCMU/PCMA, G.722 (its RTP clock says 8000; its audio is 16 kHz), WebRTC
QUALITIES = ("HQ", "VHQ")


class StreamResampler:
    """A mono stream from ``in_rate`` to ``out_rate``: int16 (default) or float32 in, the same type out.

    ``process`` takes any number of samples (a packet, a frame) and returns whatever output is ready,
    possibly none; ``flush`` ends the stream (the held-back tail comes out) and makes it ready for a new one.
    Not thread-safe: one stream belongs to one direction of one call.
    """

    def __init__(self, in_rate: int, out_rate: int, dtype: np.dtype | type | str = np.int16, *,
                 quality: str = "HQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {', '.join(QUALITIES)}, got {quality!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.int16), np.dtype(np.float32)):
            raise ValueError(f"dtype must be int16 or float32, got {self.dtype}")
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self.quality = quality
        self._stream = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype=self.dtype.name, quality=quality)
        self._in = 0  # samples given since the stream began
        self._out = 0  # samples returned since the stream began

    @property
    def ratio(self) -> float:
        return self.out_rate / self.in_rate

    @property
    def delay_samples(self) -> float:
        """Output samples held back: given as input, not yet returned (in ``out_rate`` samples)."""
        return self._in * self.ratio - self._out

    @property
    def delay_seconds(self) -> float:
        return self.delay_samples / self.out_rate

    @property
    def clipped(self) -> int:
        """Samples clipped to the int16 range so far (a hot int16 signal overshooting through the filter)."""
        return int(self._stream.num_clips())

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next ``samples`` (1-D, this stream's dtype); returns the output ready now (a new
        array, possibly empty)."""
        if samples.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} samples, got {samples.dtype}")
        out = self._stream.resample_chunk(samples)
        self._in += len(samples)
        self._out += len(out)
        return out

    def flush(self) -> np.ndarray:
        """End the stream: return what it held back, and start afresh (filter state cleared)."""
        out = self._stream.resample_chunk(np.zeros(0, dtype=self.dtype), last=True)
        self.reset()
        return out

    def reset(self) -> None:
        """Drop the filter state and what is held back (a new stream, e.g. after hold)."""
        self._stream.clear()
        self._in = self._out = 0
