"""The call audio path (gateway/audio): resampling, framing and the outbound pacer, with what the caller
hears as the test names."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.audio import LineToModel, ModelToLine, OutboundPacer, Rechunker, StreamResampler
from gateway.audio.framing import MODEL_FRAME_BYTES, MODEL_FRAME_SAMPLES

MODEL_RATE = 24_000


def _through_model_to_line(signal: np.ndarray, line_rate: int = 8000, quality: str = "HQ") -> np.ndarray:
    """Agent audio at 24 kHz (int16), fed frame by frame, as the line packets that come out."""
    path = ModelToLine(line_rate, quality=quality)
    packets: list[np.ndarray] = []
    for start in range(0, len(signal) - MODEL_FRAME_SAMPLES + 1, MODEL_FRAME_SAMPLES):
        packets += path.push(signal[start:start + MODEL_FRAME_SAMPLES].tobytes())
    assert all(len(p) == path.packet_samples for p in packets)
    return np.concatenate(packets).astype(np.float64)


def _band_power(x: np.ndarray, rate: int, below_hz: float) -> float:
    """Mean power of ``x`` below ``below_hz``, from a Hann-windowed FFT (Parseval-normalised)."""
    window = np.hanning(len(x))
    spectrum = np.abs(np.fft.rfft(x * window)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    spectrum[1:-1] *= 2  # one-sided
    return float(spectrum[freqs < below_hz].sum() / (len(x) * np.sum(window**2)))


def _db(ratio: float) -> float:
    return 10 * np.log10(max(ratio, 1e-30))


@pytest.mark.parametrize("quality", ["HQ", "VHQ"])
def test_caller_hears_no_alias_of_a_5khz_agent_tone_on_an_8khz_line(quality: str) -> None:
    t = np.arange(2 * MODEL_RATE) / MODEL_RATE
    tone = (0.5 * 32767 * np.sin(2 * np.pi * 5000 * t)).astype(np.int16)
    tone_power = _band_power(tone.astype(np.float64), MODEL_RATE, 12_000)
    line = _through_model_to_line(tone, quality=quality)[800:]  # past the stream's first 100 ms
    alias_db = _db(_band_power(line, 8000, 4000) / tone_power)
    assert alias_db < -60, f"alias in band at {alias_db:.1f} dB under the tone"


def test_caller_hears_no_alias_of_a_4_to_12khz_agent_sweep_on_an_8khz_line() -> None:
    seconds = 4
    t = np.arange(seconds * MODEL_RATE) / MODEL_RATE
    phase = 2 * np.pi * (4000 * t + (12000 - 4000) / (2 * seconds) * t**2)  # linear chirp 4 -> 12 kHz
    sweep = (0.5 * 32767 * np.sin(phase)).astype(np.int16)
    sweep_power = _band_power(sweep.astype(np.float64), MODEL_RATE, 12_000)
    line = _through_model_to_line(sweep)
    alias_db = _db(_band_power(line, 8000, 4000) / sweep_power)
    assert alias_db < -60, f"alias in band at {alias_db:.1f} dB under the sweep"


def test_caller_hears_a_1khz_agent_tone_at_its_level_on_an_8khz_line() -> None:
    t = np.arange(2 * MODEL_RATE) / MODEL_RATE
    tone = (0.5 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    line = _through_model_to_line(tone)[800:-800]
    level_db = _db(np.mean(line**2) / np.mean(tone.astype(np.float64) ** 2))
    assert abs(level_db) < 0.1


def _speech_like(rate: int, seconds: float, seed: int = 7) -> np.ndarray:
    """Voiced, syllable-shaped audio with a gliding pitch and a little breath noise, within 3.4 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    pitch = 150 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum((k * pitch < 3400) * np.sin(k * phase) / k for k in range(1, 25))
    noise = np.convolve(rng.standard_normal(len(t)), np.hanning(9) / 4.5, mode="same") * 0.05
    envelope = 0.2 + 0.8 * np.abs(np.sin(2 * np.pi * 2.5 * t))
    x = (voiced + noise) * envelope
    return (0.3 * 32767 * x / np.abs(x).max()).astype(np.int16)


@pytest.mark.parametrize("line_rate", [8000, 16000])
def test_caller_and_agent_hear_speech_unchanged_through_8k_24k_8k_round_trip(line_rate: int) -> None:
    x = _speech_like(line_rate, 4.0)
    packet = line_rate // 50
    inbound, outbound = LineToModel(line_rate), ModelToLine(line_rate)
    packets: list[np.ndarray] = []
    for start in range(0, len(x), packet):
        for frame in inbound.push(x[start:start + packet]):
            assert len(frame) == MODEL_FRAME_BYTES
            packets += outbound.push(frame)
    y = np.concatenate(packets).astype(np.float64)
    ref = x.astype(np.float64)
    # Align by cross-correlation: soxr's streams are time-aligned, so the lag must come out as 0.
    core = slice(line_rate // 4, len(y) - line_rate // 4)
    lags = range(-8, 9)
    errors = [np.sum((y[core] - np.roll(ref, lag)[core]) ** 2) for lag in lags]
    lag = list(lags)[int(np.argmin(errors))]
    assert lag == 0
    snr = _db(np.sum(ref[core] ** 2) / min(errors))
    assert snr > 50, f"round trip SNR {snr:.1f} dB"
    # what is still inside the two paths is what they report as held back
    held = len(x) - len(y)
    assert held > 0
    assert held < (inbound.delay_seconds + 0.08 + 0.05) * line_rate


def test_caller_hears_every_sample_once_when_packets_vary_in_size() -> None:
    rng = np.random.default_rng(3)
    chunker = Rechunker(MODEL_FRAME_SAMPLES, np.int16, capacity=4 * MODEL_FRAME_SAMPLES)
    total = 0
    received: list[np.ndarray] = []
    counter = np.arange(400_000, dtype=np.int64)
    while total < len(counter) - 2000:
        n = int(rng.choice([0, 1, 80, 159, 160, 161, 320, 479, 480, 734, 1468, 1999]))
        chunker.push((counter[total:total + n] % 30000).astype(np.int16))
        total += n
        while (frame := chunker.pop()) is not None:
            assert len(frame) == MODEL_FRAME_SAMPLES
            received.append(frame)
    out = np.concatenate(received)
    assert len(out) == total - chunker.pending
    assert np.array_equal(out, (counter[:len(out)] % 30000).astype(np.int16))


def test_caller_frames_are_exact_80ms_with_nothing_lost_over_a_long_call_of_irregular_packets() -> None:
    """Ten minutes of 16 kHz line audio in packets of 10-30 ms: frames of exactly 3840 bytes, and as many
    samples come out as went in, less what the resampler and the partial frame hold."""
    rng = np.random.default_rng(5)
    path = LineToModel(16000)
    sent = frames = 0
    packet = np.zeros(480, dtype=np.int16)
    while sent < 16000 * 600:
        n = int(rng.integers(160, 481))
        for frame in path.push(packet[:n]):
            assert len(frame) == MODEL_FRAME_BYTES
            frames += 1
        sent += n
    expected = sent * 3 / 2  # samples at 24 kHz
    assert frames * MODEL_FRAME_SAMPLES == pytest.approx(expected - path.delay_seconds * MODEL_RATE, abs=1)


def test_resampler_rejects_the_wrong_sample_type() -> None:
    with pytest.raises(TypeError):
        StreamResampler(8000, 24000).process(np.zeros(160, dtype=np.float32))
    with pytest.raises(ValueError):
        StreamResampler(8000, 24000, quality="LQ")


def test_resampler_float32_stream_matches_its_int16_twin() -> None:
    x = _speech_like(8000, 1.0)
    a, b = StreamResampler(8000, 24000, np.int16), StreamResampler(8000, 24000, np.float32)
    ya = np.concatenate([a.process(x[i:i + 160]) for i in range(0, len(x), 160)])
    yb = np.concatenate([b.process((x[i:i + 160] / 32768).astype(np.float32)) for i in range(0, len(x), 160)])
    assert len(ya) == len(yb)
    assert np.max(np.abs(ya / 32768 - yb)) < 2 / 32768
    tail = a.flush()
    assert len(ya) + len(tail) == pytest.approx(3 * len(x), abs=2)
    assert a.delay_samples == 0


def _packet(value: int, samples: int = 160) -> np.ndarray:
    return np.full(samples, value, dtype=np.int16)


def test_caller_hears_bounded_lag_after_a_burst_of_50_agent_frames() -> None:
    pacer = OutboundPacer(160, cushion_packets=2)
    for i in range(200):  # 50 frames of 4 packets at once
        pacer.put(_packet(i))
    assert pacer.depth == pacer.capacity == 6
    assert pacer.shed == 194
    out = np.empty(160, dtype=np.int16)
    played = [int(pacer.get(out)[0]) for _ in range(6)]
    assert played == list(range(194, 200))  # the newest audio, oldest first: the oldest was shed


def test_caller_hears_silence_and_an_underrun_is_counted_when_the_agent_is_late() -> None:
    pacer = OutboundPacer(160)
    assert not pacer.get().any()  # nothing yet: silence, not an underrun
    assert pacer.underruns == 0
    for i in range(4):
        pacer.put(_packet(i + 1))
    assert [int(pacer.get()[0]) for _ in range(4)] == [1, 2, 3, 4]
    assert not pacer.get().any()
    assert not pacer.get().any()
    assert pacer.underruns == 2
    assert pacer.stats().played == 4


def test_caller_hears_comfort_noise_continue_through_an_underrun() -> None:
    pacer = OutboundPacer(160)
    noise = np.random.default_rng(1).integers(-300, 300, 160).astype(np.int16)
    pacer.put(noise, filler=True)
    pacer.get()
    assert np.array_equal(pacer.get(), noise)
    assert pacer.underruns == 1
    pacer.put(_packet(5))
    pacer.get()
    assert not pacer.get().any()  # after real audio, silence again


def test_caller_hears_barge_in_at_once_when_the_buffer_is_flushed() -> None:
    pacer = OutboundPacer(160)
    for i in range(6):
        pacer.put(_packet(i + 1))
    pacer.get()
    assert pacer.flush() == 5
    assert pacer.depth == 0
    assert not pacer.get().any()
    assert pacer.underruns == 0  # the silence after a flush is meant
    assert pacer.stats().flushed == 5


def test_caller_hears_standing_lag_shed_down_to_the_cushion() -> None:
    """Audio that keeps arriving early (the buffer never drains below 3 packets, well under its cap) is
    trimmed after one window, down to the configured cushion, without an underrun."""
    pacer = OutboundPacer(160, cushion_packets=1, frame_packets=8, window_packets=20)
    for _ in range(3):  # 60 ms early, steadily
        pacer.put(_packet(1))
    left = []
    for tick in range(200):
        if tick % 4 == 0:
            for _ in range(4):
                pacer.put(_packet(2))
        pacer.get()
        left.append(pacer.depth)
    assert max(left) < pacer.capacity  # never at the cap: the window did the shedding
    assert min(left[:19]) == 3  # the window closes at the 20th tick
    assert pacer.shed == 2
    assert min(left[-40:]) == 1
    assert pacer.underruns == 0


def test_pacer_refuses_a_packet_of_the_wrong_size() -> None:
    with pytest.raises(ValueError):
        OutboundPacer(160).put(np.zeros(320, dtype=np.int16))


def test_agent_frames_become_four_20ms_packets_on_every_line_rate() -> None:
    for rate in (8000, 16000, 48000):
        path = ModelToLine(rate)
        counts = [len(path.push(np.zeros(MODEL_FRAME_SAMPLES, dtype=np.int16))) for _ in range(50)]
        assert sum(counts) >= 4 * 50 - 4 * 3  # what soxr holds back: under three frames
        assert all(0 <= c <= 12 for c in counts)
