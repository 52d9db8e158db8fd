"""The echo model (``personagate worker --model echo``): the classic telephony echo test.

Every session hears its caller's audio back one frame (80 ms) later, byte for byte, and the first agent
frame is silence. No model runs (no torch work per step), but everything around it is the real worker's:
the server, the protocol, the session pool with its 80 ms clock, slots, backlogs and drain, registration,
metrics. So a call through a gateway to an echo worker measures the gateway and the transport alone.

Personas are checked as a real model checks them (a voice preset of the tiny model's names, which include
PersonaPlex's, or a usable clip; the prompt's length) and "primed" at once: nothing to prime, so every
session starts from the cache (``persona_cached: true``) and the persona keys show in ``/v1/info``.

The seam: ``SessionPool`` runs an ``EchoBatch`` (the ``Batch`` contract of slots.py, which ``SlotBatch`` keeps)
and primes through ``EchoBundle.prime`` when it is given an ``EchoBundle`` instead of a ``ModelBundle``. Nothing
here imports torch or moshi: an echo worker never loads them (tests/test_echo_worker.py checks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from personagate_common.persona import Persona, PersonaError
from personagate_common.protocol import FRAME_SAMPLES
from personagate_common.voices import PRESET_VOICES

from .config import SessionSampling
from .slots import StepOutput, decode_audio

ECHO_VOICES = ("tiny-low", "tiny-high", *PRESET_VOICES)  # the tiny model's preset names


@dataclass
class EchoPrimed:
    """What an echo session starts from: nothing but the persona it was asked for."""

    persona_hash: str
    position: int = 0
    prime_seconds: float = 0.0


@dataclass
class EchoBundle:
    """Stands where a ``ModelBundle`` does, for the server and the pool: a name, a device, voices."""

    name: str = "echo"
    device: str = "cpu"  # shown as ModelBundle's torch.device is, through str()
    voices: dict[str, None] = field(default_factory=lambda: dict.fromkeys(ECHO_VOICES))
    random_weights: bool = False

    def text_piece(self, token: int) -> str | None:
        return None  # an echo says nothing

    def prime(self, persona: Persona, key: str) -> EchoPrimed:
        """Check the persona's voice as a model would (PersonaError if unusable); nothing to compute."""
        started = time.perf_counter()
        if persona.voice_audio is not None:
            decode_audio(persona.voice_audio)  # the same clip rules as a real model's priming
        elif persona.voice not in self.voices:
            raise PersonaError(f"unknown voice preset {persona.voice!r}; this model has: {', '.join(sorted(self.voices))}")
        return EchoPrimed(key, prime_seconds=time.perf_counter() - started)


def load_echo() -> EchoBundle:
    return EchoBundle()


class EchoBatch:
    """``capacity`` slots, each returning the frame its caller sent at its previous step."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._previous = np.zeros((capacity, FRAME_SAMPLES), dtype="<i2")
        self._out = np.zeros((capacity, FRAME_SAMPLES), dtype="<i2")
        self._scaled = np.zeros((capacity, FRAME_SAMPLES), dtype=np.float32)
        self._tokens = [-1] * capacity

    def install(self, slot: int, primed: EchoPrimed, sampling: SessionSampling | None = None) -> None:
        self._previous[slot] = 0  # a new call's first frame back is silence

    def slot_sampling(self, slot: int) -> SessionSampling | None:
        return None

    def step(self, pcm: np.ndarray, executing: np.ndarray) -> StepOutput:
        """``pcm`` [B, 1920] float32 caller audio (int16 / 32768, as the pool makes it), ``executing`` [B]:
        executing slots get their previous frame back, exactly (as int16 in ``pcm16``)."""
        out, previous, rows = self._out, self._previous, executing[:, None]
        np.copyto(out, previous, where=rows)
        # int16 / 32768 is exact in float32, so this gives the caller's samples back bit for bit
        np.multiply(pcm, 32768, out=self._scaled)
        np.copyto(previous, self._scaled, casting="unsafe", where=rows)
        return StepOutput(pcm=out, text_tokens=self._tokens, produced=executing.copy(), pcm16=out)

    def close(self) -> None:
        pass
