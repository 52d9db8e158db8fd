"""Personas and their voice clips: what a clip becomes before priming, and every reason one is refused."""

from __future__ import annotations

import io

import numpy as np
import pyloudnorm
import pytest
import soundfile
import torch

from agent_runtime.model import SAMPLE_RATE, ModelBundle, load_tiny
from agent_runtime.priming import Primer, plan_priming
from agent_runtime.voice_prompt import decode_audio, load_voice, prompt_tokens
from personagate_common import voices
from personagate_common.persona import MAX_PROMPT_CHARS, Persona, PersonaError
from personagate_common.voices import VoiceClipError, prepare_clip


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


# --------------------------------------------------------------------------- clips (the rules: test_voices.py)


def test_the_worker_primes_with_the_prepared_clip():
    """An inline clip (here 3 s stereo at 48 kHz) is exactly what ``voices.prepare_clip`` makes of
    it, the clip the gateway validated: mono, 24 kHz (the model's rate), -24 LUFS."""
    data = _clip(3.0, 48_000, channels=2)
    audio = decode_audio(data)
    assert np.array_equal(audio, prepare_clip(data).audio)
    assert voices.SAMPLE_RATE == SAMPLE_RATE
    assert abs(len(audio) - 3 * SAMPLE_RATE) <= 2
    assert _lufs(audio) == pytest.approx(-24.0, abs=0.5)


@pytest.mark.parametrize("data", [
    _clip(1.5, 8_000),  # shorter than the 2 s every clip needs, the worker's inline ones too
    _clip(12.0, 8_000),
    _clip(2.0, amplitude=0.0),
    _clip(2.0, amplitude=10.0),  # clipped
    b"GIF89a\x01\x00 not audio at all" * 20,
    b"",
])
def test_a_refused_clip_is_a_persona_error_with_the_same_message(data):
    """The worker refuses an inline clip for the same reason, in the same words, as the gateway."""
    with pytest.raises(VoiceClipError) as expected:
        prepare_clip(data)
    with pytest.raises(PersonaError) as err:
        decode_audio(data)
    assert str(err.value) == str(expected.value)


@pytest.mark.parametrize("seconds", [2.0, 10.0])
def test_inline_clips_of_2_and_10_seconds_are_accepted(seconds):
    """The length limits are inclusive."""
    assert abs(len(decode_audio(_clip(seconds, 8_000))) - seconds * SAMPLE_RATE) <= 2


def test_a_wav_or_flac_preset_file_is_prepared_like_an_upload(tiny, tmp_path, monkeypatch):
    """A checkpoint's ``voices/NAME.flac`` goes through the same preparation; one that breaks the
    rules is refused with its path."""
    good, short = tmp_path / "CLIPF0.flac", tmp_path / "SHORTF0.wav"
    good.write_bytes(_clip(2.0, 44_100, fmt="FLAC"))
    short.write_bytes(_clip(1.0, 16_000))
    monkeypatch.setitem(tiny.voices, "CLIPF0", good)
    monkeypatch.setitem(tiny.voices, "SHORTF0", short)
    voice = load_voice(tiny, Persona(prompt="Hi", voice="CLIPF0"), tiny.mimi_sharing_weights())
    assert voice.codes is not None and tuple(voice.codes.shape) == (8, 25)
    with pytest.raises(PersonaError) as err:
        load_voice(tiny, Persona(prompt="Hi", voice="SHORTF0"), tiny.mimi_sharing_weights())
    assert str(err.value) == f"{short}: clip is 1.00 s long; expected 2 to 10 s"


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
