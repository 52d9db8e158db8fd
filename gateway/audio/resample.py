"""One stateful streaming resampler per call and direction, between a line rate and the model's 24 kHz.

Contract: the filter state is carried from packet to packet, so packet edges leave no clicks whatever the
packet sizes. ``engine="fir"`` (the default, a Kaiser windowed-sinc polyphase filter) has a constant, known
delay (``delay_seconds``) and turns each 20 ms packet into exactly 20 ms of output; ``engine="soxr"`` is kept
for comparison and other ratios (it emits in bursts, holding back 20-80 ms per direction).

Details (filter specs, measured delay and SNR): docs/audio.md#resampling-resamplepy.
"""

from __future__ import annotations

from fractions import Fraction
from math import ceil, lcm

import numpy as np
import soxr
from scipy.signal import firwin, kaiserord

from personagate_common.protocol import SAMPLE_RATE

try:  # the compiled inner loop (_polyphase.c), built by `make install`
    from . import _polyphase
except ImportError:  # a source tree not installed: the same filter through numpy, slower
    _polyphase = None

MODEL_RATE = SAMPLE_RATE  # the worker protocol's audio
LINE_RATES = (8_000, 16_000, 48_000)  # PCMU/PCMA, G.722 (its RTP clock says 8000; its audio is 16 kHz), WebRTC
QUALITIES = ("HQ", "VHQ")
ENGINES = ("fir", "soxr")
# quality -> (stopband attenuation in dB, passband edge as a fraction of the lower rate's Nyquist frequency)
FIR_DESIGN = {"HQ": (100.0, 0.85), "VHQ": (130.0, 0.90)}
MAX_FACTOR = 12  # the FIR engine's largest up or down factor (48 kHz <-> 24 kHz needs 2, 16 <-> 24 needs 3)


class StreamResampler:
    """A mono stream from ``in_rate`` to ``out_rate``: int16 (default) or float32 in, the same type out.

    ``process`` takes any number of samples (a packet, a frame) and returns the output ready now;
    ``flush`` ends the stream (what the filter still holds comes out) and starts a new one; ``reset`` drops
    it. ``delay_seconds`` is how far output lags input: the filter delay (``fir``), or what soxr holds back
    now (``soxr``, whose output is otherwise time-aligned). Not thread-safe: one stream belongs to one
    direction of one call.
    """

    def __init__(self, in_rate: int, out_rate: int, dtype: np.dtype | type | str = np.int16, *,
                 quality: str = "HQ", engine: str = "fir") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {', '.join(QUALITIES)}, got {quality!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.int16), np.dtype(np.float32)):
            raise ValueError(f"dtype must be int16 or float32, got {self.dtype}")
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self.quality, self.engine = quality, engine
        self._impl: _Fir | _Soxr = (_Fir if engine == "fir" else _Soxr)(self.in_rate, self.out_rate, self.dtype,
                                                                         quality)
        self._in = self._out = 0

    @property
    def ratio(self) -> float:
        return self.out_rate / self.in_rate

    @property
    def delay_samples(self) -> float:
        """How far output lags input now, in output samples."""
        return self._impl.delay_samples()

    @property
    def delay_seconds(self) -> float:
        return self.delay_samples / self.out_rate

    @property
    def held_samples(self) -> float:
        """Output samples owed for the input given so far and not returned yet (soxr: its delay; fir:
        under one input sample's worth, since its delay is a shift of the content, not of the count)."""
        return self._in * self.ratio - self._out

    @property
    def clipped(self) -> int:
        """int16 output samples clipped so far (a hot signal overshooting through the filter)."""
        return self._impl.clipped()

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next ``samples`` (1-D, this stream's dtype); returns the output ready now (a new
        array, possibly empty)."""
        if samples.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} samples, got {samples.dtype}")
        out = self._impl.process(samples)
        self._in += len(samples)
        self._out += len(out)
        return out

    def flush(self) -> np.ndarray:
        """End the stream: return what it still holds, and start a new one."""
        out = self._impl.flush()
        self.reset()
        return out

    def reset(self) -> None:
        """Drop the filter state (a new stream, e.g. after hold)."""
        self._impl.reset()
        self._in = self._out = 0


class _Soxr:
    def __init__(self, in_rate: int, out_rate: int, dtype: np.dtype, quality: str) -> None:
        self.ratio = out_rate / in_rate
        self.dtype = dtype
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype=dtype.name, quality=quality)
        self._in = self._out = 0

    def delay_samples(self) -> float:
        return self._in * self.ratio - self._out

    def clipped(self) -> int:
        return int(self._stream.num_clips())

    def process(self, samples: np.ndarray) -> np.ndarray:
        out = self._stream.resample_chunk(samples)
        self._in += len(samples)
        self._out += len(out)
        return out

    def flush(self) -> np.ndarray:
        return self._stream.resample_chunk(np.zeros(0, dtype=self.dtype), last=True)

    def reset(self) -> None:
        self._stream.clear()
        self._in = self._out = 0


class _Fir:
    """Polyphase FIR resampling by ``up / down`` (a reduced fraction).

    Conceptually: zero-stuff the input by ``up``, low-pass at the lower rate's Nyquist frequency, keep every
    ``down``-th sample. Output sample ``k`` sits at upsampled index ``k * down``: it reads input
    ``base = k * down // up`` and the ``taps`` before it through the phase ``k * down % up`` of the filter.
    Outputs of equal ``k % up`` share a phase and step ``down`` inputs apart, so a packet of whole periods is
    one matrix product of a strided window view (no copy) with the phases side by side; other chunk sizes
    take one product per phase. No Python loop over samples either way.
    """

    def __init__(self, in_rate: int, out_rate: int, dtype: np.dtype, quality: str) -> None:
        ratio = Fraction(out_rate, in_rate)
        self.up, self.down = ratio.numerator, ratio.denominator
        if max(self.up, self.down) > MAX_FACTOR:
            raise ValueError(f"the fir engine takes ratios up to {MAX_FACTOR}:1 after reduction; "
                             f"{in_rate} -> {out_rate} Hz is {self.up}:{self.down} (use engine='soxr')")
        self.dtype = dtype
        attenuation, passband = FIR_DESIGN[quality]
        up_rate = in_rate * self.up
        nyquist = min(in_rate, out_rate) / 2
        width = (1 - passband) * nyquist
        numtaps, beta = kaiserord(attenuation, width / (up_rate / 2))
        # odd length, linear phase, with a delay that is a whole number of input and of output samples
        step = lcm(self.up, self.down)
        self.group_delay = ceil((numtaps - 1) / 2 / step) * step  # in upsampled samples
        numtaps = 2 * self.group_delay + 1
        h = firwin(numtaps, nyquist - width / 2, window=("kaiser", beta), fs=up_rate) * self.up
        self.taps = ceil(numtaps / self.up)
        padded = np.zeros(self.taps * self.up)
        padded[:numtaps] = h
        # phases[r][i] multiplies input base - (taps - 1) + i: phase r's coefficients h[r + t*up], reversed
        self._phases = padded.reshape(self.taps, self.up).T[:, ::-1].astype(np.float32).copy()
        # Output j of a period (up outputs) reads inputs (j * down) // up later than output 0, through phase
        # (j * down) % up: the phases side by side, shifted by that offset, make one [taps + span, up] matrix.
        self._span = (self.up - 1) * self.down // self.up
        wide = np.zeros((self.up, self.taps + self._span), dtype=np.float32)
        for j in range(self.up):
            offset = j * self.down // self.up
            wide[j, offset:offset + self.taps] = self._phases[j * self.down % self.up]
        self._wide = np.ascontiguousarray(wide.T)
        self._wide_rows = wide  # the compiled loop reads each output's row whole
        self._clips = 0
        self._buf = np.zeros(0, dtype=np.float32)
        self.reset()

    def delay_samples(self) -> float:
        return self.group_delay / self.down

    def clipped(self) -> int:
        return self._clips

    def reset(self) -> None:
        # The stream starts after ``taps`` samples of silence: window index 0 is input index -taps.
        self._start = -self.taps  # input index of window[0]
        self._len = self.taps  # samples in the window
        self._in = 0  # input samples received
        self._next = 0  # next output index
        if len(self._buf) < 4 * self.taps:
            self._buf = np.zeros(4 * self.taps + 4096, dtype=np.float32)
        self._buf[:self.taps] = 0

    def process(self, samples: np.ndarray) -> np.ndarray:
        n = len(samples)
        if self._len + n > len(self._buf):  # a larger chunk than seen before: grow once
            grown = np.zeros(2 * (self._len + n), dtype=np.float32)
            grown[:self._len] = self._buf[:self._len]
            self._buf = grown
        if self.dtype == np.int16:
            np.multiply(samples, np.float32(1 / 32768), out=self._buf[self._len:self._len + n])
        else:
            self._buf[self._len:self._len + n] = samples
        self._len += n
        self._in += n
        out = self._run(self._in - 1)
        self._trim()
        return out

    def flush(self) -> np.ndarray:
        """The outputs still inside the filter: feed silence for its length."""
        return self.process(np.zeros(ceil(self.group_delay / self.up) + 1, dtype=self.dtype))

    def _run(self, last_input: int) -> np.ndarray:
        up, down, taps = self.up, self.down, self.taps
        last = ((last_input + 1) * up - 1) // down  # the last output whose newest input has arrived
        first = self._next
        count = last - first + 1
        if count <= 0:
            return np.zeros(0, dtype=self.dtype)
        if _polyphase is not None:
            out = np.empty(count, dtype=self.dtype)
            self._clips += _polyphase.run(self._buf, self._phases, self._wide_rows, up, down, taps, self._start, first,
                                          out)
            self._next = last + 1
            return out
        return self._run_numpy(first, count, last)

    def _run_numpy(self, first: int, count: int, last: int) -> np.ndarray:
        up, down, taps = self.up, self.down, self.taps
        if first % up == 0 and count % up == 0:
            # Whole periods (every 20 ms packet): output first + q*up + j reads row q of a strided view of
            # the window through row j of the widened phase matrix: one matrix product in all.
            start = first * down // up - (taps - 1) - self._start
            rows = np.ndarray((count // up, taps + self._span), np.float32, self._buf, start * 4, (down * 4, 4))
            result = np.matmul(rows, self._wide).ravel()
        else:
            result = np.empty(count, dtype=np.float32)
            window = np.ndarray((self._len - taps + 1, taps), np.float32, self._buf, 0, (4, 4))
            for j in range(min(up, count)):  # one matrix product per phase
                k = first + j
                start = k * down // up - (taps - 1) - self._start
                n = (count - j + up - 1) // up
                np.matmul(window[start:start + (n - 1) * down + 1:down], self._phases[k * down % up],
                          out=result[j::up])
        self._next = last + 1
        if self.dtype == np.float32:
            return result
        result *= 32768
        np.rint(result, out=result)
        over = (result > 32767) | (result < -32768)
        if over.any():
            self._clips += int(over.sum())
            np.clip(result, -32768, 32767, out=result)
        return result.astype(np.int16)

    def _trim(self) -> None:
        """Keep only the inputs later outputs still read."""
        needed = self._next * self.down // self.up - (self.taps - 1)  # first input of the next output
        drop = needed - self._start
        if drop > 0:
            keep = self._len - drop
            self._buf[:keep] = self._buf[drop:self._len]
            self._start, self._len = needed, keep
