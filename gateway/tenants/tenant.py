"""A validated tenant as calls use it. Immutable: a reload builds new objects, so a call in progress
keeps the persona it started with."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from personagate_common.persona import persona_key
from personagate_common.voices import PreparedClip

from ..worker_client import persona_message
from . import schema


@dataclass(frozen=True)
class PersonaConfig:
    """What a call with this persona is primed with, and how it behaves."""

    tenant: str
    name: str
    prompt: str
    voice_preset: str | None
    voice_clip: PreparedClip | None  # the prepared clip (24 kHz mono, -24 LUFS): what the worker primes with
    sampling: schema.Sampling
    speaks_first: bool
    description: str = ""
    public_link: bool = False  # anyone may call it from a browser

    @classmethod
    def from_spec(cls, tenant: str, name: str, spec: schema.Persona, clip: PreparedClip | None) -> PersonaConfig:
        return cls(tenant, name, spec.prompt, spec.voice.preset, clip, spec.sampling, spec.speaks_first,
                   spec.description, spec.public_link)

    @cached_property
    def worker_persona(self) -> dict[str, Any]:
        """The ``persona`` object of the worker's start message (docs/worker-protocol.md)."""
        return persona_message(
            self.prompt,
            voice=self.voice_preset,
            voice_audio=self.voice_clip.flac_bytes() if self.voice_clip is not None else None,
            sampling=self.sampling.model_dump(),
        )

    @cached_property
    def persona_key(self) -> str:
        """The key a worker caches this persona's primed state under (what it reports in ``cached_personas``):
        routing prefers a worker that has it."""
        return persona_key(self.worker_persona)

    @cached_property
    def version(self) -> str:
        """Changes whenever anything the call would be primed or steered with changes."""
        digest = hashlib.sha256(repr((self.prompt, self.voice_preset, self.sampling, self.speaks_first)).encode())
        digest.update(self.voice_clip.sha256.encode() if self.voice_clip else b"")
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Rejection:
    """The answer to a call the tenant does not take now (after hours)."""

    status: int
    reason: str


@dataclass(frozen=True)
class Tenant:
    id: str
    spec: schema.TenantFile
    folder: Path
    personas: Mapping[str, PersonaConfig]
    consent_announcement: PreparedClip | None
    number_marks: Mapping[str, tuple[int, int]] = field(repr=False)  # line, column of each number
    file: str = ""

    def answer(self, number: str, when: dt.datetime) -> PersonaConfig | Rejection:
        """Who answers a call to ``number`` (one of this tenant's) at ``when`` (an aware datetime)."""
        return self.answer_for(self.spec.numbers[number], when)

    def answer_for(self, persona: str, when: dt.datetime) -> PersonaConfig | Rejection:
        """Who answers a call meant for ``persona`` at ``when``: it, in the tenant's hours; else the after-hours
        persona or rejection."""
        hours = self.spec.hours
        if hours is None or hours.is_open(when):
            return self.personas[persona]
        after = hours.after_hours
        if after.persona is not None:
            return self.personas[after.persona]
        assert after.reject is not None
        return Rejection(after.reject.status, after.reject.reason)
