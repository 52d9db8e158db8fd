"""Personas and their voice clips: what a clip becomes before priming, and every reason one is refused."""

from __future__ import annotations

import io

import numpy as np
import pyloudnorm
import pytest
import soundfile
import torch

from agent_runtime.model import SAMPLE_RATE, ModelBundle, load_tiny
from agent_runtime.persona import (
    MAX_PROMPT_CHARS,
    Persona,
    PersonaError,
    decode_audio,
    load_voice,
    prompt_tokens,
)
from agent_runtime.priming import Primer, plan_priming


@pytest.fixture(scope="module")
def tiny() -> ModelBundle:
    return load_tiny()


def _clip(seconds: float, rate: int = 16_000, channels: int = 1, fmt: str = "WAV", amplitude: float = 0.25,
          subtype: str | None = None) -> bytes:
    """A voiced-sounding clip (harmonics of 140 Hz, slow tremolo) as the bytes of an audio file."""
    t = np.arange(round(seconds * rate)) / rate
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 7)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    mono = amplitude * tone / 2
    audio = np.stack([mono * (1 - 0.3 * c) for c in range(channels)], axis=1) if channels > 1 else mono
    out = io.BytesIO()
    soundfile.write(out, audio.astype(np.float32), rate, format=fmt, subtype=subtype)
    return out.getvalue()


def _lufs(audio: np.ndarray) -> float:
    return pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(audio.astype(np.float64))


# --------------------------------------------------------------------------- decoding


def test_a_stereo_48k_wav_becomes_mono_24k_at_minus_24_lufs():
    """An admin's 3 s stereo 48 kHz recording is downmixed to mono, resampled to the model's 24 kHz
    (so 3 s = 72 000 samples) and loudness-normalised to -24 LUFS, as PersonaPlex does before priming."""
    audio = decode_audio(_clip(3.0, 48_000, channels=2))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 3 * SAMPLE_RATE) <= 2
    assert _lufs(audio) == pytest.approx(-24.0, abs=0.5)
    assert np.abs(audio).max() <= 1.0


@pytest.mark.parametrize("amplitude", [0.02, 0.9])
def test_quiet_and_loud_clips_end_at_the_same_loudness(amplitude):
    """Whatever level a clip was recorded at, priming hears it at -24 LUFS."""
    assert _lufs(decode_audio(_clip(2.0, 24_000, amplitude=amplitude))) == pytest.approx(-24.0, abs=0.5)


def test_flac_and_integer_wav_clips_are_accepted():
    """flac uploads work, and so do 16-bit PCM wavs at other rates."""
    flac = decode_audio(_clip(2.0, 44_100, fmt="FLAC"))
    assert abs(len(flac) - 2 * SAMPLE_RATE) <= 2
    assert _lufs(flac) == pytest.approx(-24.0, abs=0.5)
    pcm16 = decode_audio(_clip(1.5, 8_000, subtype="PCM_16"))
    assert abs(len(pcm16) - int(1.5 * SAMPLE_RATE)) <= 2


def test_a_clip_at_24k_is_not_resampled():
    """A clip already at 24 kHz keeps its exact length."""
    assert len(decode_audio(_clip(2.5, SAMPLE_RATE))) == int(2.5 * SAMPLE_RATE)


def test_a_too_short_clip_is_refused_with_its_length():
    """A 0.2 s clip is refused, saying how long it is and what is allowed."""
    with pytest.raises(PersonaError) as err:
        decode_audio(_clip(0.2))
    assert "0.20 s" in str(err.value)
    assert "0.5 to 10 s" in str(err.value)


def test_a_too_long_clip_is_refused_with_its_length():
    """A 12 s clip is refused, saying how long it is and what is allowed."""
    with pytest.raises(PersonaError) as err:
        decode_audio(_clip(12.0, 8_000))
    assert "12.00 s" in str(err.value)
    assert "0.5 to 10 s" in str(err.value)


@pytest.mark.parametrize("seconds", [0.5, 10.0])
def test_the_length_limits_are_inclusive(seconds):
    """Clips of exactly 0.5 s and 10 s are accepted."""
    assert abs(len(decode_audio(_clip(seconds, 8_000))) - seconds * SAMPLE_RATE) <= 2


def test_a_silent_clip_is_refused():
    """An all-zero clip carries no voice and is refused as silent."""
    with pytest.raises(PersonaError, match="silent"):
        decode_audio(_clip(2.0, amplitude=0.0))


@pytest.mark.parametrize("data", [b"GIF89a\x01\x00 not audio at all" * 20, b"", b"RIFF\x00\x00\x00\x00WAVEfmt "])
def test_bytes_that_are_not_audio_are_refused(data):
    """A picture, an empty upload or a broken wav header gives a reason, not a crash."""
    with pytest.raises(PersonaError, match="not a readable"):
        decode_audio(data)


# --------------------------------------------------------------------------- presets and personas


def test_an_unknown_preset_lists_the_known_ones(tiny):
    """A typo in a voice name is refused with the names this model has."""
    with pytest.raises(PersonaError) as err:
        load_voice(tiny, Persona(prompt="Hi", voice="tiny-mid"), tiny.mimi_sharing_weights())
    message = str(err.value)
    assert "'tiny-mid'" in message
    assert "tiny-high" in message and "tiny-low" in message


def test_a_clip_voice_becomes_one_code_column_per_80_ms(tiny):
    """A persona's uploaded clip becomes Mimi codes, one column per 80 ms frame, the last one padded."""
    voice = load_voice(tiny, Persona(prompt="Hi", voice_audio=_clip(2.0, 24_000)), tiny.mimi_sharing_weights())
    assert voice.codes is not None and tuple(voice.codes.shape) == (8, 25)
    assert ((voice.codes >= 0) & (voice.codes < tiny.mimi.cardinality)).all()


def test_a_persona_needs_exactly_one_voice():
    """A persona with both a preset and a clip, or with neither, is refused."""
    with pytest.raises(PersonaError, match="exactly one voice"):
        Persona(prompt="Hi")
    with pytest.raises(PersonaError, match="exactly one voice"):
        Persona(prompt="Hi", voice="tiny-low", voice_audio=_clip(1.0))


def test_a_prompt_over_4000_characters_is_refused():
    """Role prompts are limited to 4000 characters; the message gives the length and the limit."""
    Persona(prompt="x" * MAX_PROMPT_CHARS, voice="tiny-low")
    with pytest.raises(PersonaError) as err:
        Persona(prompt="x" * (MAX_PROMPT_CHARS + 1), voice="tiny-low")
    assert "4001" in str(err.value) and "4000" in str(err.value)


def test_content_hash_changes_exactly_when_priming_input_changes():
    """Equal personas share one primed state (equal hashes); a changed prompt, preset or clip gets
    its own."""
    clip = _clip(1.0)
    base = Persona(prompt="You are a claims agent.", voice="tiny-low")
    assert base.content_hash() == Persona(prompt="You are a claims agent.", voice="tiny-low").content_hash()
    with_clip = Persona(prompt="You are a claims agent.", voice_audio=clip)
    assert with_clip.content_hash() == Persona(prompt="You are a claims agent.", voice_audio=bytes(clip)).content_hash()
    others = [
        Persona(prompt="You are a bank agent.", voice="tiny-low"),
        Persona(prompt="You are a claims agent.", voice="tiny-high"),
        with_clip,
        Persona(prompt="You are a claims agent.", voice_audio=_clip(1.0, amplitude=0.3)),
    ]
    hashes = {p.content_hash() for p in [base, *others]}
    assert len(hashes) == 5


def test_a_prompt_too_long_for_the_context_is_refused_with_frame_counts(tiny):
    """A role prompt that would take more than half of the model's 3000-frame context (so a call
    would have almost no room) is refused at priming with its length in frames and the limit."""
    words = ["please", "hold", "on", "while", "I", "check", "your", "account"]
    text = " ".join(words[i % len(words)] for i in range(2000))
    tokens = prompt_tokens(tiny, text)
    primer = Primer(tiny, {"use_sampling": False})
    voice = load_voice(tiny, Persona(prompt="", voice="tiny-low"), primer.mimi)
    plan = plan_priming(tiny, voice, tokens)
    assert plan.length > 1500 and tiny.lm.context == 3000
    with pytest.raises(PersonaError) as err:
        primer.prime(plan, "too-long")
    assert f"{plan.length} frames" in str(err.value)
    assert "1499" in str(err.value)


def test_a_prompt_that_fits_the_context_primes(tiny):
    """Right under the limit, priming goes through and the state covers the whole prompt."""
    primer = Primer(tiny, {"use_sampling": False})
    voice = load_voice(tiny, Persona(prompt="", voice="tiny-low"), primer.mimi)
    tokens = prompt_tokens(tiny, "Thank you for calling, how can I help you today?")
    primed = primer.prime(plan_priming(tiny, voice, tokens), "ok")
    assert primed.position == voice.frames + 12 + len(tokens)
    assert all(kv.shape[2] == primed.position for kv in primed.kv)
    assert torch.isfinite(primed.kv[0]).all()
