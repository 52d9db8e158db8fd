"""The call audio path (gateway/audio): resampling, framing and the outbound pacer, with what the caller
hears as the test names."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.audio import LineToModel, ModelToLine, OutboundPacer, Rechunker, StreamResampler
from gateway.audio.framing import MODEL_FRAME_BYTES, MODEL_FRAME_SAMPLES

MODEL_RATE = 24_000


def _through_model_to_line(signal: np.ndarray, line_rate: int = 8000, quality: str = "HQ",
                           engine: str = "fir") -> np.ndarray:
    """Agent audio at 24 kHz (int16), fed frame by frame, as the line packets that come out."""
    path = ModelToLine(line_rate, quality=quality, engine=engine)
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


ENGINES = [("fir", "HQ"), ("fir", "VHQ"), ("soxr", "HQ"), ("soxr", "VHQ")]


@pytest.mark.parametrize(("engine", "quality"), ENGINES)
def test_caller_hears_no_alias_of_a_5khz_agent_tone_on_an_8khz_line(engine: str, quality: str) -> None:
    t = np.arange(2 * MODEL_RATE) / MODEL_RATE
    tone = (0.5 * 32767 * np.sin(2 * np.pi * 5000 * t)).astype(np.int16)
    tone_power = _band_power(tone.astype(np.float64), MODEL_RATE, 12_000)
    line = _through_model_to_line(tone, quality=quality, engine=engine)[800:]  # past the first 100 ms
    alias_db = _db(_band_power(line, 8000, 4000) / tone_power)
    assert alias_db < -60, f"alias in band at {alias_db:.1f} dB under the tone"


@pytest.mark.parametrize("engine", ["fir", "soxr"])
def test_caller_hears_no_alias_of_a_4_to_12khz_agent_sweep_on_an_8khz_line(engine: str) -> None:
    seconds = 4
    t = np.arange(seconds * MODEL_RATE) / MODEL_RATE
    phase = 2 * np.pi * (4000 * t + (12000 - 4000) / (2 * seconds) * t**2)  # linear chirp 4 -> 12 kHz
    sweep = (0.5 * 32767 * np.sin(phase)).astype(np.int16)
    sweep_power = _band_power(sweep.astype(np.float64), MODEL_RATE, 12_000)
    line = _through_model_to_line(sweep, engine=engine)
    alias_db = _db(_band_power(line, 8000, 4000) / sweep_power)
    assert alias_db < -60, f"alias in band at {alias_db:.1f} dB under the sweep"


@pytest.mark.parametrize("engine", ["fir", "soxr"])
@pytest.mark.parametrize("hz", [300, 1000, 3400])
def test_caller_hears_agent_tones_across_the_phone_band_at_their_level(engine: str, hz: int) -> None:
    t = np.arange(2 * MODEL_RATE) / MODEL_RATE
    tone = (0.5 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)
    line = _through_model_to_line(tone, engine=engine)[800:-800]
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


@pytest.mark.parametrize("engine", ["fir", "soxr"])
@pytest.mark.parametrize("line_rate", [8000, 16000])
def test_caller_and_agent_hear_speech_unchanged_through_8k_24k_8k_round_trip(line_rate: int, engine: str) -> None:
    x = _speech_like(line_rate, 4.0)
    packet = line_rate // 50
    inbound, outbound = LineToModel(line_rate, engine=engine), ModelToLine(line_rate, engine=engine)
    expected_lag = 0
    if engine == "fir":  # a constant delay, reported; soxr's streams are time-aligned
        expected_lag = round((inbound.resampler.delay_seconds + outbound.resampler.delay_seconds) * line_rate)
        assert expected_lag == {8000: 86, 16000: 88}[line_rate]  # 5.4 ms each way at 8 kHz, 2.75 ms at 16
    packets: list[np.ndarray] = []
    for start in range(0, len(x), packet):
        for frame in inbound.push(x[start:start + packet]):
            assert len(frame) == MODEL_FRAME_BYTES
            packets += outbound.push(frame)
    y = np.concatenate(packets).astype(np.float64)
    ref = x.astype(np.float64)
    # Align by cross-correlation: the best lag must be the reported delay.
    core = slice(line_rate // 4, len(y) - line_rate // 4)
    lags = range(expected_lag - 8, expected_lag + 9)
    errors = [np.sum((y[core] - np.roll(ref, lag)[core]) ** 2) for lag in lags]
    assert list(lags)[int(np.argmin(errors))] == expected_lag
    snr = _db(np.sum(ref[core] ** 2) / min(errors))
    assert snr > 50, f"round trip SNR {snr:.1f} dB"


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


@pytest.mark.parametrize("engine", ["fir", "soxr"])
def test_caller_frames_are_exact_80ms_with_nothing_lost_over_a_long_call_of_irregular_packets(engine: str) -> None:
    """Ten minutes of 16 kHz line audio in packets of 10-30 ms: frames of exactly 3840 bytes, and as many
    samples come out as went in, less what the resampler holds and the partial frame."""
    rng = np.random.default_rng(5)
    path = LineToModel(16000, engine=engine)
    sent = frames = 0
    packet = np.zeros(480, dtype=np.int16)
    while sent < 16000 * 600:
        n = int(rng.integers(160, 481))
        for frame in path.push(packet[:n]):
            assert len(frame) == MODEL_FRAME_BYTES
            frames += 1
        sent += n
    expected = sent * 3 / 2  # samples at 24 kHz
    held = path.resampler.held_samples + path.pending_samples
    assert frames * MODEL_FRAME_SAMPLES == pytest.approx(expected - held, abs=1e-6)


def test_resampler_rejects_the_wrong_sample_type() -> None:
    with pytest.raises(TypeError):
        StreamResampler(8000, 24000).process(np.zeros(160, dtype=np.float32))
    with pytest.raises(ValueError):
        StreamResampler(8000, 24000, quality="LQ")


@pytest.mark.parametrize("engine", ["fir", "soxr"])
def test_resampler_float32_stream_matches_its_int16_twin(engine: str) -> None:
    x = _speech_like(8000, 1.0)
    a = StreamResampler(8000, 24000, np.int16, engine=engine)
    b = StreamResampler(8000, 24000, np.float32, engine=engine)
    ya = np.concatenate([a.process(x[i:i + 160]) for i in range(0, len(x), 160)])
    yb = np.concatenate([b.process((x[i:i + 160] / 32768).astype(np.float32)) for i in range(0, len(x), 160)])
    assert len(ya) == len(yb)
    assert np.max(np.abs(ya / 32768 - yb)) < 2 / 32768
    tail = a.flush()
    assert len(ya) + len(tail) >= 3 * len(x) - 2


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_fir_resampler_gives_the_same_output_whatever_the_packet_sizes(dtype: type) -> None:
    """The filter state carries across packets: any split of the input gives the same samples (no clicks),
    up to float32 rounding (summation order differs between a whole-period packet and a ragged one)."""
    x = _speech_like(16000, 2.0)
    if dtype is np.float32:
        x = (x / 32768).astype(np.float32)
    whole = StreamResampler(16000, 24000, dtype).process(x)
    rng = np.random.default_rng(11)
    split, parts, i = StreamResampler(16000, 24000, dtype), [], 0
    while i < len(x):
        n = int(rng.integers(0, 700))
        parts.append(split.process(x[i:i + n]))
        i += n
    joined = np.concatenate(parts)
    assert len(joined) == len(whole) == 3 * len(x) // 2
    tolerance = 1 if dtype is np.int16 else 1e-6  # one LSB where rounding lands on the other side
    assert np.max(np.abs(joined.astype(np.float64) - whole)) <= tolerance


@pytest.mark.parametrize("rates", [(16000, 24000), (24000, 16000), (8000, 24000), (24000, 8000), (48000, 24000),
                                   (24000, 48000)])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_compiled_fir_gives_the_numpy_filters_samples(rates: tuple[int, int], dtype: type,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The resampler's compiled inner loop (gateway/audio/_polyphase.c, built by `make install`) is in use and gives
    what the numpy formulation of the same filter gives, packet for packet, to float32 rounding (one LSB in int16):
    callers hear the filter whose figures the other tests measure."""
    from gateway.audio import resample

    assert resample._polyphase is not None, "the compiled resampler is not built: run make install"
    x = _speech_like(rates[0], 1.0)
    if dtype is np.float32:
        x = (x / 32768).astype(np.float32)
    rng = np.random.default_rng(5)
    sizes = [int(n) for n in rng.integers(0, 2 * rates[0] // 50, 200)]
    compiled, reference = StreamResampler(*rates, dtype), StreamResampler(*rates, dtype)
    out_compiled, out_reference, i = [], [], 0
    for n in sizes:
        out_compiled.append(compiled.process(x[i:i + n]))
        monkeypatch.setattr(resample, "_polyphase", None)
        out_reference.append(reference.process(x[i:i + n]))
        monkeypatch.undo()
        i += n
    a, b = np.concatenate(out_compiled), np.concatenate(out_reference)
    assert len(a) == len(b) and [len(p) for p in out_compiled] == [len(p) for p in out_reference]
    assert np.max(np.abs(a.astype(np.float64) - b)) <= (1 if dtype is np.int16 else 1e-6)


def test_fir_resampler_gives_exactly_20ms_per_20ms_packet_on_every_line_rate() -> None:
    for rate in (8000, 16000, 48000):
        for a, b in ((rate, MODEL_RATE), (MODEL_RATE, rate)):
            r = StreamResampler(a, b)
            sizes = [len(r.process(np.zeros(a // 50, dtype=np.int16))) for _ in range(20)]
            assert sizes[1:] == [b // 50] * 19 and b // 50 - 2 <= sizes[0] <= b // 50, (a, b, sizes)
            assert r.delay_seconds < 0.006


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
        assert counts[1:] == [4] * 49 and counts[0] in (3, 4)


def test_soxr_engine_holds_agent_audio_back_in_bursts() -> None:
    """Why soxr is not the default: some 80 ms frames give three packets, others five or more."""
    path = ModelToLine(8000, engine="soxr")
    counts = [len(path.push(np.zeros(MODEL_FRAME_SAMPLES, dtype=np.int16))) for _ in range(50)]
    assert min(counts[5:]) <= 3 and max(counts[5:]) >= 5


def _mouth_to_ear_ms(line_rate: int, engine: str, offset: int) -> float:
    """A click from the caller through LineToModel, a model that answers at once, ModelToLine and the
    pacer drained by a 20 ms clock: how long after it was spoken it is played (packets arrive, and the
    clock ticks, at the end of each 20 ms)."""
    packet = line_rate // 50
    inbound, outbound = LineToModel(line_rate, engine=engine), ModelToLine(line_rate, engine=engine)
    pacer = OutboundPacer(packet)
    x = np.zeros(packet * 100, dtype=np.int16)
    spoken = packet * 50 + offset
    x[spoken] = 20000
    played = []
    for i in range(100):
        for frame in inbound.push(x[i * packet:(i + 1) * packet]):
            for p in outbound.push(frame):
                pacer.put(p)
        played.append(pacer.get())
    heard = int(np.argmax(np.abs(np.concatenate(played))))
    tick, within = divmod(heard, packet)
    return ((tick + 1) * 0.02 + within / line_rate - spoken / line_rate) * 1000


@pytest.mark.parametrize("line_rate", [8000, 16000])
def test_caller_hears_an_instant_agent_within_the_frame_the_packet_and_the_filter_delays(line_rate: int) -> None:
    """The 80 ms frame is the floor (a sound early in a frame waits for the frame to fill, one late in it
    waits for the frame's earlier audio to play); the FIR resamplers add their 5.4 ms (8 kHz) or 2.75 ms
    (16 kHz) each way and nothing else, wherever the sound falls. (soxr: 200 ms at 8 kHz, 160 at 16.)"""
    filters = 2 * StreamResampler(line_rate, MODEL_RATE).delay_seconds * 1000
    for offset in range(0, 4 * line_rate // 50, line_rate // 200):
        assert _mouth_to_ear_ms(line_rate, "fir", offset) == pytest.approx(80 + filters, abs=0.01)


@pytest.mark.parametrize("line_rate", [8000, 16000, 48000])
def test_an_agent_released_to_speak_first_starts_on_the_first_packet_and_keeps_the_cadence(line_rate: int) -> None:
    """The first 20 ms packet after the answer completes a frame at once (silence, then that packet's audio), so
    the agent's greeting starts 60 ms sooner; every later frame still completes on its 4th packet, 80 ms apart."""
    line = LineToModel(line_rate)
    packet = (0.3 * 32767 * np.sin(2 * np.pi * 440 * np.arange(line_rate // 50) / line_rate)).astype(np.int16)
    assert line.complete_with_silence() is None  # nothing held: nothing to complete
    assert line.push(packet) == []
    first = np.frombuffer(line.complete_with_silence() or b"", "<i2")
    assert len(first) == MODEL_FRAME_SAMPLES
    assert not first[:MODEL_FRAME_SAMPLES * 3 // 4 - 200].any()  # silence first ...
    assert np.abs(first[-240:]).max() > 3000  # ... then the caller's packet
    assert line.pending_samples == 0
    completed_at = [i for i in range(1, 13) if line.push(packet)]
    assert completed_at == [4, 8, 12]
