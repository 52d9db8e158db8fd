"""Voice clips as a tenant admin uploads them: which are accepted, what they become (24 kHz mono at
-24 LUFS), and the message each refused one gets. No model is loaded here (the gateway uses this too).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys

import numpy as np
import pyloudnorm
import pytest
import soundfile

from personagate_common.voices import (
    PEAK_CEILING,
    SAMPLE_RATE,
    PreparedClip,
    VoiceClipError,
    prepare_clip,
)


def _speech(seconds: float, rate: int, *, seed: int = 0, peak: float = 0.3) -> np.ndarray:
    """A speech-like signal: syllables of a gliding voiced tone (jittered pitch, falling harmonics,
    raised-cosine envelopes of varying height), breath noise, short pauses; scaled to ``peak``."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + 3 * rng.standard_normal(n).cumsum() / np.sqrt(
        max(n, 1))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase + rng.uniform(0, 6)) / k ** 1.2 for k in range(1, 12) if k * 260 < rate / 2)
    envelope = np.zeros(n)
    start = 0.0
    while start < seconds:
        length = rng.uniform(0.12, 0.3)
        i, j = round(start * rate), min(n, round((start + length) * rate))
        if j > i:
            envelope[i:j] = rng.uniform(0.3, 1.0) * np.sin(np.pi * np.arange(j - i) / (j - i)) ** 2
        start += length + rng.uniform(0.02, 0.12)
    signal = voiced * envelope + 0.02 * rng.standard_normal(n) * (0.2 + envelope)
    return peak * signal / np.abs(signal).max()


def _file(audio: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, audio, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def _clip(seconds: float = 3.0, rate: int = 16_000, **kwargs) -> bytes:
    return _file(_speech(seconds, rate, **kwargs).astype(np.float32), rate)


def _lufs(audio: np.ndarray) -> float:
    return pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(audio.astype(np.float64))


def _refusal(data: bytes, **kwargs) -> str:
    with pytest.raises(VoiceClipError) as err:
        prepare_clip(data, **kwargs)
    return str(err.value)


def _assert_ready(clip: PreparedClip, seconds: float) -> None:
    assert clip.audio.dtype == np.float32 and clip.audio.ndim == 1
    assert abs(len(clip.audio) - seconds * SAMPLE_RATE) <= 2
    assert _lufs(clip.audio) == pytest.approx(-24.0, abs=0.5)
    assert np.abs(clip.audio).max() <= 1.0


# --------------------------------------------------------------------------- accepted uploads


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 24_000, 44_100, 48_000, 96_000])
def test_wav_at_any_common_rate_becomes_24k_mono_at_minus_24_lufs(rate):
    """Phone (8 kHz), wideband, CD and studio wavs all come out as the model's 24 kHz, at -24 LUFS,
    and what was measured on the upload is reported."""
    clip = prepare_clip(_clip(3.0, rate))
    _assert_ready(clip, 3.0)
    assert (clip.source_rate, clip.source_channels) == (rate, 1)
    assert clip.seconds == pytest.approx(3.0)
    assert -40 < clip.loudness_lufs < -10


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_flac_uploads_are_accepted(subtype):
    """flac (16 and 24 bit) is accepted like wav."""
    clip = prepare_clip(_file(_speech(2.5, 44_100), 44_100, "FLAC", subtype))
    _assert_ready(clip, 2.5)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"])
def test_every_wav_sample_format_is_accepted(subtype):
    """Integer, float and telephone (mu-law, A-law) wavs are all accepted."""
    _assert_ready(prepare_clip(_file(_speech(2.0, 8_000, peak=0.5), 8_000, subtype=subtype)), 2.0)


@pytest.mark.parametrize("amplitude", [0.02, 0.9])
def test_quiet_and_loud_recordings_end_at_the_same_loudness(amplitude):
    """However loud the take was, the model hears it at -24 LUFS."""
    _assert_ready(prepare_clip(_clip(2.0, 24_000, peak=amplitude)), 2.0)


def test_stereo_is_downmixed_to_mono():
    """A stereo upload becomes one mono clip of the same length, and its channel count is reported."""
    left, right = _speech(3.0, 48_000, seed=1), _speech(3.0, 48_000, seed=2)
    clip = prepare_clip(_file(np.stack([left, right], axis=1), 48_000))
    _assert_ready(clip, 3.0)
    assert clip.source_channels == 2


@pytest.mark.parametrize("channels", [2, 4])
def test_a_clip_with_sound_on_one_channel_only_still_works(channels):
    """A recorder that put the microphone on the left channel and left the others empty gives a
    usable clip: the downmix is quieter, and normalisation brings it back to -24 LUFS."""
    audio = np.zeros((round(2.5 * 16_000), channels))
    audio[:, 0] = _speech(2.5, 16_000)
    clip = prepare_clip(_file(audio, 16_000))
    _assert_ready(clip, 2.5)
    assert clip.source_channels == channels


@pytest.mark.parametrize("rate", [8_000, 44_100])
@pytest.mark.parametrize("seconds", [2.0, 10.0])
def test_exactly_2_and_exactly_10_seconds_are_accepted(seconds, rate):
    """The length limits are inclusive."""
    clip = prepare_clip(_clip(seconds, rate))
    assert clip.seconds == seconds
    _assert_ready(clip, seconds)


def test_a_24k_clip_keeps_its_exact_length():
    """A clip already at 24 kHz is not resampled."""
    assert len(prepare_clip(_clip(2.5, SAMPLE_RATE)).audio) == int(2.5 * SAMPLE_RATE)


def test_a_loud_unclipped_clip_is_accepted():
    """A take peak-normalised to exactly full scale (as many editors do) is loud, not clipped."""
    for rate in (8_000, 16_000, 44_100, 192_000):
        for subtype in ("PCM_16", "FLOAT"):
            _assert_ready(prepare_clip(_file(_speech(4.0, rate, seed=rate, peak=1.0), rate, subtype=subtype)), 4.0)


def test_a_clip_with_a_sharp_click_is_limited_not_clipped():
    """Quiet speech with one loud click would need its peak pushed far past full scale to reach
    -24 LUFS: the click is limited to -1 dBFS over a few milliseconds, the rest of the clip keeps its
    shape, and the loudness is still -24 LUFS."""
    speech = _speech(3.0, SAMPLE_RATE, peak=0.01)
    speech[SAMPLE_RATE] = 0.8
    clip = prepare_clip(_file(speech, SAMPLE_RATE, subtype="FLOAT"))
    _assert_ready(clip, 3.0)
    assert np.abs(clip.audio).max() <= PEAK_CEILING + 1e-6
    far = np.r_[0:SAMPLE_RATE - 600, SAMPLE_RATE + 600:3 * SAMPLE_RATE]  # away from the click
    gain = np.abs(clip.audio[far]).max() / np.abs(speech[far]).max()
    assert np.allclose(clip.audio[far], gain * speech[far], atol=1e-5)


def test_a_float_file_scaled_past_full_scale_is_not_called_clipped():
    """A 32-bit float wav may go past 1.0 without losing anything; it is scaled, not clipped."""
    _assert_ready(prepare_clip(_file(_speech(2.0, 16_000, peak=3.0), 16_000, subtype="FLOAT")), 2.0)


# --------------------------------------------------------------------------- refused uploads


@pytest.mark.parametrize(("seconds", "shown"), [(1.42, "1.42 s"), (0.1, "0.10 s"), (1.9994, "1.999 s")])
def test_a_too_short_clip_is_refused_with_its_length(seconds, shown):
    """The admin is told how long the clip is and what is allowed (never a puzzling "2.00 s")."""
    assert _refusal(_clip(seconds, 48_000)) == f"clip is {shown} long; expected 2 to 10 s"


@pytest.mark.parametrize("rate", [8_000, 48_000])
def test_a_too_long_clip_is_refused_with_its_length(rate):
    """A 12.5 s clip is refused with its length and the limits."""
    assert _refusal(_clip(12.5, rate)) == "clip is 12.50 s long; expected 2 to 10 s"


def test_the_length_limits_can_be_changed_by_the_caller():
    """Callers with another rule (a longer reference clip, say) pass their own limits."""
    assert prepare_clip(_clip(12.0, 8_000), max_seconds=15.0).seconds == 12.0
    assert "expected 5 to 15 s" in _refusal(_clip(3.0, 8_000), min_seconds=5.0, max_seconds=15.0)


def test_a_silent_clip_is_refused():
    """An all-zero recording (a muted microphone) is refused as silent."""
    assert _refusal(_file(np.zeros(3 * 16_000), 16_000)) == (
        "clip is silent (all samples are zero); expected speech louder than -60 LUFS")


def test_a_near_silent_clip_is_refused_with_its_loudness():
    """A take that only caught a far-away whisper or line hiss is refused, with its loudness."""
    message = _refusal(_file(_speech(3.0, 16_000, peak=3e-3), 16_000, subtype="FLOAT"))
    assert message.startswith("clip is silent (loudness -") and message.endswith(
        " LUFS); expected speech louder than -60 LUFS")
    assert -70 < float(message.split("loudness ")[1].split(" LUFS")[0]) < -60
    fainter = _refusal(_file(_speech(3.0, 16_000, peak=3e-4), 16_000, subtype="FLOAT"))
    assert fainter == "clip is silent (loudness below -70 LUFS); expected speech louder than -60 LUFS"


def test_a_clip_with_sound_only_above_12_khz_is_refused():
    """Sound a 24 kHz voice cannot carry (here a 15 kHz whistle) leaves nothing to prime with."""
    t = np.arange(3 * 48_000) / 48_000
    fades = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.05)  # no click at either end
    message = _refusal(_file(0.3 * fades * np.sin(2 * np.pi * 15_000 * t), 48_000))
    assert message.startswith("clip has no sound below 12 kHz")


@pytest.mark.parametrize(("rate", "subtype"), [(16_000, "PCM_16"), (44_100, "PCM_24"), (8_000, "ULAW"),
                                               (48_000, "FLOAT"), (8_000, "PCM_U8")])
def test_a_clip_amplified_10x_and_clipped_is_refused(rate, subtype):
    """A take recorded far too hot (flat-topped at full scale) is refused, saying how much is clipped."""
    hot = np.clip(10 * _speech(3.0, rate), -1.0, 1.0)
    message = _refusal(_file(hot, rate, subtype=subtype))
    assert message.startswith("clip is clipped: ") and message.endswith(
        "% of samples at full scale; re-record it at a lower level")
    assert float(message.split(": ")[1].split("%")[0]) > 1


def test_a_float_file_clipped_at_its_own_level_is_refused():
    """Clipping in a float file shows as a mass of samples at its peak, even when that is not 1.0."""
    hot = 2.0 * np.clip(10 * _speech(3.0, 16_000), -1.0, 1.0)
    assert _refusal(_file(hot, 16_000, subtype="FLOAT")).startswith("clip is clipped: ")


def test_a_clip_clipped_on_one_channel_is_refused():
    """A stereo take with one overloaded channel is clipped even if the other is fine."""
    audio = np.stack([np.clip(10 * _speech(3.0, 16_000), -1, 1), _speech(3.0, 16_000, seed=3)], axis=1)
    assert _refusal(_file(audio, 16_000)).startswith("clip is clipped: ")


def test_nan_or_infinite_samples_are_refused():
    """A damaged float file is refused instead of turning the voice into NaNs."""
    for bad in (np.nan, np.inf):
        audio = _speech(3.0, 16_000)
        audio[1000] = bad
        assert "NaN or infinite samples" in _refusal(_file(audio, 16_000, subtype="FLOAT"))


@pytest.mark.parametrize("rate", [4_000, 384_000])
def test_sample_rates_outside_8_to_192_khz_are_refused(rate):
    """Rates no microphone chain for speech uses are refused with the rate found."""
    assert _refusal(_clip(3.0, rate)) == f"sample rate is {rate} Hz; expected 8 to 192 kHz"


def test_an_empty_upload_is_refused():
    """Zero bytes: the admin is told the upload is empty."""
    assert _refusal(b"") == "not a wav or flac file (the upload is empty: 0 bytes)"


def test_a_wav_with_no_samples_is_refused():
    """A valid wav header with no audio after it."""
    assert _refusal(_file(np.zeros(0), 16_000)) == "clip has 0 samples; expected 2 to 10 s of speech"


@pytest.mark.parametrize(("data", "named"), [
    (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" * 400, "an mp3 file"),
    (b"\xff\xfb\x90\x64" + bytes(range(256)) * 8, "an mp3 or aac file"),
    (b"\x00\x00\x00\x20ftypM4A " + bytes(2000), "an mp4/m4a file"),
    (b"GIF89a\x01\x00 not audio at all" * 20, "a gif image"),
    (b"<!DOCTYPE html><html>not found</html>", "text (html, xml or json)"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "a damaged or unsupported RIFF/wav file"),
])
def test_files_that_are_not_audio_are_refused_naming_what_they_look_like(data, named):
    """A picture, an error page saved as .wav, or an mp3/m4a renamed to .wav gets a reason."""
    assert _refusal(data) == f"not a wav or flac file (the content looks like {named})"


@pytest.mark.parametrize(("fmt", "found"), [("MP3", "MP3: MPEG-1/2 Audio"), ("OGG", "OGG (OGG Container format)"),
                                            ("AIFF", "AIFF (Apple/SGI)")])
def test_audio_in_other_formats_is_refused_naming_the_format(fmt, found):
    """Real mp3, ogg and aiff files decode, but only wav and flac are accepted; the message names
    the format found (detected from the content, whatever the file was called)."""
    if fmt not in soundfile.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    message = _refusal(_file(_speech(3.0, 16_000), 16_000, fmt))
    assert message.startswith(f"not a wav or flac file (found {found}")
    assert message.endswith("); export it as wav or flac")


def test_a_truncated_flac_is_refused_or_shorter():
    """A flac cut off mid-upload never crashes: it is refused (damaged or too short) or, if what
    remains decodes, prepared from what is there."""
    data = _file(_speech(3.0, 16_000), 16_000, "FLAC")
    for cut in (60, len(data) // 3, len(data) - 100):
        try:
            prepare_clip(data[:cut])
        except VoiceClipError as exc:
            assert str(exc)


# --------------------------------------------------------------------------- what the worker receives


def test_flac_bytes_round_trip_within_16_bit_quantisation():
    """The FLAC the gateway sends the worker decodes to the prepared clip, 24 kHz mono 16-bit,
    each sample within half a 16-bit step."""
    clip = prepare_clip(_clip(3.0, 44_100))
    data = clip.flac_bytes()
    info = soundfile.info(io.BytesIO(data))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", SAMPLE_RATE, 1)
    decoded, _ = soundfile.read(io.BytesIO(data), dtype="float64")
    assert len(decoded) == len(clip.audio)
    assert np.abs(decoded - clip.audio).max() <= 0.5 / 32768 + 1e-9


def test_flac_bytes_and_sha256_are_deterministic():
    """The same upload gives the same FLAC bytes and cache key, every time; another upload another key."""
    upload = _clip(3.0, 48_000)
    a, b = prepare_clip(upload), prepare_clip(bytes(upload))
    assert a.flac_bytes() == b.flac_bytes() == a.flac_bytes()
    assert a.sha256 == b.sha256 == hashlib.sha256(a.flac_bytes()).hexdigest()
    assert prepare_clip(_clip(3.0, 48_000, seed=7)).sha256 != a.sha256


def test_the_worker_accepts_what_the_gateway_prepared_unchanged():
    """The worker prepares the gateway's FLAC again: it passes every check and stays the same voice."""
    sent = prepare_clip(_clip(4.0, 8_000))
    again = prepare_clip(sent.flac_bytes())
    assert (again.source_rate, again.source_channels) == (SAMPLE_RATE, 1)
    assert again.loudness_lufs == pytest.approx(-24.0, abs=0.05)
    assert np.abs(again.audio - sent.audio).max() < 1e-3


def test_a_prepared_clip_cannot_be_changed_after_the_fact():
    """The audio is read-only, so a cached FLAC and its key always describe it."""
    clip = prepare_clip(_clip())
    with pytest.raises(ValueError):
        clip.audio[0] = 1.0


@pytest.mark.e2e  # starts a process
def test_the_gateway_can_validate_clips_without_torch():
    """Importing this module loads neither torch nor moshi (the gateway has no model)."""
    code = "import sys, personagate_common.voices; print(sorted({'torch', 'moshi'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
