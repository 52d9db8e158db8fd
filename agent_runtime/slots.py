"""What the session pool steps, torch-free: the contract a batch of session slots keeps, and one step's output.

``SlotBatch`` (batch.py, a model's) and ``EchoBatch`` (echo.py) keep it; the pool (pool.py) knows only this
module, so that an echo worker never loads torch or moshi. ``decode_audio`` is the voice clip rule both a model's
priming and the echo model's persona check apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from personagate_common.persona import PersonaError
from personagate_common.voices import VoiceClipError, prepare_clip

from .config import SessionSampling


@dataclass
class StepOutput:
    """One step's results for all slots; rows of slots that did not execute are meaningless."""

    pcm: np.ndarray  # [B, 1920] float32 in [-1, 1]
    text_tokens: list[int]  # [B]
    produced: np.ndarray  # [B] bool: the slot executed and produced a frame
    pcm16: np.ndarray | None = None  # [B, 1920] s16le, when the batch has exact samples (echo.py): sent as is


class Batch(Protocol):
    """``capacity`` session slots stepped together, one 80 ms frame per step (tick thread only)."""

    capacity: int

    def install(self, slot: int, primed: Any, sampling: SessionSampling | None = None) -> None:
        """Start a session in ``slot`` from a primed persona state (the batch's own kind of it)."""

    def slot_sampling(self, slot: int) -> SessionSampling | None: ...

    def step(self, pcm: np.ndarray, executing: np.ndarray) -> StepOutput:
        """``pcm`` [B, 1920] float32 caller audio, ``executing`` [B] bool: one frame for every executing slot."""

    def close(self) -> None: ...


def decode_audio(data: bytes, *, origin: str | None = None) -> np.ndarray:
    """A wav/flac clip as priming audio: ``voices.prepare_clip``'s mono float32 at 24 kHz, -24 LUFS
    (the rule the gateway checks tenant clips with). A refused clip raises ``PersonaError`` with the
    same message, prefixed with ``origin`` (a preset file's path) when given."""
    try:
        return prepare_clip(data).audio
    except VoiceClipError as exc:
        raise PersonaError(f"{origin}: {exc}" if origin else str(exc)) from exc
