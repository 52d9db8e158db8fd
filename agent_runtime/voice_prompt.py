"""A persona's voice and prompt as model input: Mimi codes (or a PersonaPlex ``.pt`` voice's embeddings)
and SentencePiece ids. This is the torch side of personas; what a persona is, and the key its primed
state is cached under, are in ``persona.py`` (torch-free, shared with the gateway).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from moshi.models import MimiModel

from personagate_common.persona import Persona, PersonaError
from personagate_common.protocol import FRAME_SAMPLES

from .model import ModelBundle
from .slots import decode_audio


@dataclass
class VoicePrompt:
    """A voice ready for priming.

    ``codes`` [8, F]: agent-stream Mimi codes, one column per 80 ms frame (from audio).
    ``embeddings`` [F-1, dim] and ``ring`` [17, 4]: a PersonaPlex ``.pt`` voice, which stores the
    model's summed input embeddings for all but the last voice step and the token ring after them.
    """

    codes: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    ring: torch.Tensor | None = None

    @property
    def frames(self) -> int:
        if self.codes is not None:
            return int(self.codes.shape[1])
        assert self.embeddings is not None
        return int(self.embeddings.shape[0]) + 1


def prompt_tokens(bundle: ModelBundle, prompt: str) -> list[int]:
    """SentencePiece ids of the prompt wrapped in PersonaPlex's system tags (its server.py L79)."""
    if not prompt.strip():
        return []
    return list(bundle.tokenizer.encode(f"<system> {prompt.strip()} <system>"))


def load_voice(bundle: ModelBundle, persona: Persona, mimi: MimiModel) -> VoicePrompt:
    """The persona's voice as priming input; ``mimi`` must not be streaming (the pool's is)."""
    if persona.voice_audio is not None:
        return voice_from_audio(mimi, decode_audio(persona.voice_audio))
    assert persona.voice is not None
    source = bundle.voices.get(persona.voice)
    if source is None:
        known = ", ".join(sorted(bundle.voices)) or "none"
        raise PersonaError(f"unknown voice preset {persona.voice!r}; this model has: {known}")
    if isinstance(source, torch.Tensor):
        return voice_from_audio(mimi, source.numpy())
    if source.suffix == ".pt":
        return voice_from_pt(bundle, source)
    return voice_from_audio(mimi, decode_audio(source.read_bytes(), origin=str(source)))


@torch.no_grad()
def voice_from_audio(mimi: MimiModel, audio: np.ndarray) -> VoicePrompt:
    """Mimi codes of a 24 kHz mono clip, its last frame zero-padded (as the reference does)."""
    frames = -(-len(audio) // FRAME_SAMPLES)
    padded = np.zeros(frames * FRAME_SAMPLES, dtype=np.float32)
    padded[: len(audio)] = audio
    param = next(mimi.parameters())
    codes = mimi.encode(torch.from_numpy(padded).view(1, 1, -1).to(param))
    return VoicePrompt(codes=codes[0].long())


def voice_from_pt(bundle: ModelBundle, path: Path) -> VoicePrompt:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise PersonaError(f"{path}: not a readable PersonaPlex voice file ({exc})") from exc
    if not isinstance(saved, dict) or "embeddings" not in saved or "cache" not in saved:
        raise PersonaError(f"{path}: expected a dict with 'embeddings' and 'cache' (a PersonaPlex voice)")
    embeddings, ring = saved["embeddings"], saved["cache"]
    dim, codebooks = bundle.lm.dim, bundle.lm.num_codebooks
    if embeddings.dim() != 4 or tuple(embeddings.shape[1:]) != (1, 1, dim) or embeddings.shape[0] < 1:
        raise PersonaError(f"{path}: embeddings have shape {tuple(embeddings.shape)}, expected [N, 1, 1, {dim}]")
    if tuple(ring.shape) != (1, codebooks, 4):
        raise PersonaError(f"{path}: cache has shape {tuple(ring.shape)}, expected [1, {codebooks}, 4]")
    return VoicePrompt(embeddings=embeddings.reshape(-1, dim), ring=ring[0].long())
