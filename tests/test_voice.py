"""Personas and voice clips: what an admin's clip turns into, and the reasons a clip is refused."""

from __future__ import annotations

import io

import numpy as np
import pyloudnorm
import pytest
import soundfile

from agent_runtime.model import SAMPLE_RATE, load_tiny
from agent_runtime.persona import Persona, PersonaError, decode_audio, load_voice


def _clip(seconds: float, rate: int, channels: int = 1, fmt: str = "WAV", amplitude: float = 0.3) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = amplitude * sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6))
    audio = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    out = io.BytesIO()
    soundfile.write(out, audio.astype(np.float32), rate, format=fmt)
    return out.getvalue()


def test_a_stereo_48k_clip_becomes_mono_24k_at_minus_24_lufs():
    """Any sample rate and channel count works: the clip is downmixed, resampled to the model's
    24 kHz and loudness-normalised to -24 LUFS, as the reference does before priming."""
    audio = decode_audio(_clip(3.0, 48_000, channels=2))
    assert audio.ndim == 1 and abs(len(audio) - 3 * SAMPLE_RATE) <= 2
    assert pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(audio) == pytest.approx(-24.0, abs=0.5)


def test_flac_clips_are_accepted():
    """Admins may upload flac as well as wav."""
    assert len(decode_audio(_clip(2.0, 16_000, fmt="FLAC"))) == pytest.approx(2 * SAMPLE_RATE, abs=2)


@pytest.mark.parametrize("seconds, message", [(0.2, "0.20 s long"), (12.0, "12.00 s long")])
def test_clip_length_is_checked_with_the_measured_length(seconds, message):
    """A clip too short or too long is refused with its measured length and the allowed range."""
    with pytest.raises(PersonaError, match=rf"{message}; expected 0.5 to 10 s"):
        decode_audio(_clip(seconds, 16_000))


def test_a_silent_clip_is_refused():
    """A clip with nothing in it cannot carry a voice."""
    with pytest.raises(PersonaError, match="silent"):
        decode_audio(_clip(2.0, 16_000, amplitude=0.0))


def test_a_file_that_is_not_audio_is_refused():
    """Uploading the wrong file gives a reason, not a crash."""
    with pytest.raises(PersonaError, match="not a readable wav or flac file"):
        decode_audio(b"GIF89a this is a picture")


def test_unknown_preset_lists_the_known_ones():
    """A typo in a voice name says which voices exist."""
    bundle = load_tiny()
    with pytest.raises(PersonaError, match="unknown voice preset 'tiny-mid'; this model has: tiny-high, tiny-low"):
        load_voice(bundle, Persona(prompt="Hi", voice="tiny-mid"), bundle.mimi_sharing_weights())


def test_a_clip_voice_is_encoded_frame_by_frame():
    """A clip becomes one column of Mimi codes per 80 ms (last frame padded), like the reference."""
    bundle = load_tiny()
    voice = load_voice(bundle, Persona(prompt="Hi", voice_audio=_clip(2.05, 22_050)), bundle.mimi_sharing_weights())
    assert voice.codes is not None and tuple(voice.codes.shape) == (8, 26)


def test_persona_needs_exactly_one_voice_and_a_bounded_prompt():
    """A persona names one voice, a preset or a clip, and its prompt has a length limit."""
    with pytest.raises(PersonaError, match="exactly one voice"):
        Persona(prompt="Hi")
    with pytest.raises(PersonaError, match="exactly one voice"):
        Persona(prompt="Hi", voice="tiny-low", voice_audio=b"x")
    with pytest.raises(PersonaError, match="4001 characters long; at most 4000"):
        Persona(prompt="x" * 4001, voice="tiny-low")


def test_persona_hash_follows_what_priming_depends_on():
    """Equal personas share a primed state; any change to prompt or voice gets a new one."""
    base = Persona(prompt="You are a claims agent.", voice="tiny-low")
    assert base.content_hash() == Persona(prompt="You are a claims agent.", voice="tiny-low").content_hash()
    assert base.content_hash() != Persona(prompt="You are a bank agent.", voice="tiny-low").content_hash()
    assert base.content_hash() != Persona(prompt="You are a claims agent.", voice="tiny-high").content_hash()
    assert base.content_hash() != Persona(prompt="You are a claims agent.", voice_audio=b"tiny-low").content_hash()
