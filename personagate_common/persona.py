"""Personas: what a session is primed with (a role prompt and a voice) and the key its primed state is
cached under.

This module imports no torch: the gateway uses ``persona_key`` to compute, from the protocol's persona
object, the same key a worker caches the primed persona under and reports in ``/v1/info`` and its
heartbeats, so routing can prefer a worker that has the persona primed. The worker parses start messages
with the same ``persona_from_message``, so the two cannot drift. Turning a persona into model input is
``voice_prompt.py``'s job.

The voice is a preset of the loaded model (a PersonaPlex ``voices/*.pt`` file, or one of the tiny
model's built-in clips) or an audio clip sent with the session request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_PROMPT_CHARS = 4_000
PERSONA_FIELDS = ("prompt", "voice", "voice_audio_base64", "sampling")  # of the protocol's persona object


class PersonaError(ValueError):
    """A persona the worker cannot prime, with a message meant for the person who wrote it (4422)."""


class PersonaFormatError(ValueError):
    """A persona object that is not well formed: unknown field, wrong JSON type, bad base64 (4400)."""


@dataclass(frozen=True)
class Persona:
    """What a session is primed with. Exactly one of ``voice`` (a preset name) or ``voice_audio``
    (the bytes of a wav/flac clip) is set."""

    prompt: str
    voice: str | None = None
    voice_audio: bytes | None = None

    def __post_init__(self) -> None:
        if (self.voice is None) == (self.voice_audio is None):
            raise PersonaError("a persona needs exactly one voice: a preset name or an audio clip")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise PersonaError(f"prompt is {len(self.prompt)} characters long; at most {MAX_PROMPT_CHARS} allowed")

    def content_hash(self) -> str:
        """Stable identity of what priming depends on: equal hashes prime to the same state. This is the
        persona key of the worker's primed cache (``persona_key`` computes it from a persona object)."""
        digest = hashlib.sha256()
        digest.update(self.prompt.encode())
        digest.update(b"\0voice-preset\0" if self.voice is not None else b"\0voice-audio\0")
        digest.update(self.voice.encode() if self.voice is not None else self.voice_audio or b"")
        return digest.hexdigest()[:32]


def persona_from_message(spec: Any, *, max_voice_bytes: int | None = None) -> Persona:
    """The ``Persona`` of the start message's ``persona`` object (docs/worker-protocol.md §1).

    ``sampling`` is allowed but not read: it plays no part in priming (the worker checks it on its own).
    Raises ``PersonaFormatError`` for an object that is not well formed and ``PersonaError`` for one that
    cannot be primed (no or two voices, prompt too long, a clip over ``max_voice_bytes``).
    """
    if not isinstance(spec, Mapping):
        raise PersonaFormatError("start.persona must be an object")
    unknown = set(spec) - set(PERSONA_FIELDS)
    if unknown:
        raise PersonaFormatError(f"start.persona has unknown fields: {sorted(unknown)}")
    prompt = spec.get("prompt", "")
    voice = spec.get("voice")
    audio_b64 = spec.get("voice_audio_base64")
    if not isinstance(prompt, str):
        raise PersonaFormatError("start.persona.prompt must be a string")
    if voice is not None and not isinstance(voice, str):
        raise PersonaFormatError("start.persona.voice must be a preset name (string)")
    audio = None
    if audio_b64 is not None:
        if not isinstance(audio_b64, str):
            raise PersonaFormatError("start.persona.voice_audio_base64 must be a string")
        if max_voice_bytes is not None and len(audio_b64) > max_voice_bytes * 4 // 3 + 4:
            raise PersonaError(f"voice clip over {max_voice_bytes} bytes")
        try:
            audio = base64.b64decode(audio_b64, validate=True)
        except binascii.Error as exc:
            raise PersonaFormatError("start.persona.voice_audio_base64 is not base64") from exc
    return Persona(prompt=prompt, voice=voice, voice_audio=audio)


def persona_key(persona_message: Mapping[str, Any]) -> str:
    """The key a worker caches this persona's primed state under, from the protocol's persona object
    (prompt, and the voice preset or the clip's bytes; sampling does not count). It is what workers report
    in ``/v1/info`` ``cached_personas`` and in their heartbeats' ``cached_personas``.

    Raises ``PersonaFormatError`` or ``PersonaError`` for a persona object a worker would refuse.
    """
    return persona_from_message(persona_message).content_hash()
