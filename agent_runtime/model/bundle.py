"""The model bundle: what a worker runs sessions on, whichever loader built it.

Contract: a ``ModelBundle`` holds a moshi ``LMModel`` generating the agent's 8 codebooks, a Mimi codec,
a SentencePiece tokenizer and the codes priming needs; one model step is one 80 ms frame
(``FRAME_SAMPLES`` samples at ``SAMPLE_RATE``). Loaders build one through ``finish_bundle``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from moshi.models import LMModel, MimiModel

from personagate_common.protocol import FRAME_SAMPLES, SAMPLE_RATE

AGENT_CODEBOOKS = 8  # generated per step; the checkpoint holds 16 depth steps (agent + user)


@dataclass
class ModelBundle:
    """Everything a worker needs to run sessions: LM, codec, tokenizer and priming constants."""

    name: str
    lm: LMModel
    mimi: MimiModel
    tokenizer: sentencepiece.SentencePieceProcessor
    device: torch.device
    silence_codes: torch.Tensor  # [8] agent codes of an 80 ms silent frame
    sine_codes: torch.Tensor  # [8] user codes of an 80 ms 440 Hz sine frame (priming's user stream)
    # preset name -> a PersonaPlex .pt / audio file, or (tiny model) a 24 kHz clip in memory
    voices: dict[str, Path | torch.Tensor] = field(default_factory=dict)
    text_pad_id: int = 3
    text_epad_id: int = 0
    # Seeded random weights (the tiny model; PersonaPlex's architecture for speed benchmarks only).
    random_weights: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def lm_sharing_weights(self) -> LMModel:
        """A second LM whose modules (and so streaming state) are its own but whose weights are shared.

        moshi keeps streaming state on the modules themselves, so priming next to a running pool
        needs separate module objects; sharing the tensors keeps the memory cost at zero.
        """
        return _clone_sharing_tensors(self.lm)

    def mimi_sharing_weights(self) -> MimiModel:
        return _clone_sharing_tensors(self.mimi)

    def text_piece(self, token: int) -> str | None:
        """The printable text of one generated text token, or None for padding."""
        tok = self.tokenizer
        if token in (self.text_pad_id, self.text_epad_id) or not 0 <= token < tok.vocab_size():
            return None
        if tok.is_control(token) or tok.is_unknown(token) or tok.is_byte(token):
            return None
        return tok.id_to_piece(token).replace("\u2581", " ")


def _clone_sharing_tensors(module: torch.nn.Module) -> Any:
    if any(getattr(m, "_streaming_state", None) is not None for m in module.modules()):
        raise RuntimeError("cannot clone a module while it is streaming")
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def finish_bundle(
    name: str,
    lm: LMModel,
    mimi: MimiModel,
    tokenizer: sentencepiece.SentencePieceProcessor,
    device: torch.device,
    silence: torch.Tensor | None,
    sine: torch.Tensor | None,
    voices: dict[str, Path | torch.Tensor],
) -> ModelBundle:
    """The bundle of a loaded LM and codec, set to generate the agent's codebooks only.

    ``silence`` / ``sine``: the model's own priming codes where it has fixed ones; None encodes a
    silent and a 440 Hz frame through ``mimi`` instead.
    """
    # The file holds 16 depth steps (agent then user codebooks); generating only the agent's 8 gives
    # the same agent tokens as PersonaPlex's loop, one frame earlier and with half the depformer work.
    lm.dep_q = AGENT_CODEBOOKS
    lm.eval()
    mimi.eval()
    if silence is None or sine is None:
        silence = encode_frame_codes(mimi, torch.zeros(FRAME_SAMPLES))
        sine = encode_frame_codes(mimi, sine_frame())
    return ModelBundle(
        name=name,
        lm=lm,
        mimi=mimi,
        tokenizer=tokenizer,
        device=device,
        silence_codes=silence.to(device=device, dtype=torch.long),
        sine_codes=sine.to(device=device, dtype=torch.long),
        voices=voices,
        text_pad_id=lm.existing_text_padding_id,
        text_epad_id=lm.existing_text_end_padding_id,
    )


def sine_frame(frequency: float = 440.0) -> torch.Tensor:
    t = torch.arange(FRAME_SAMPLES, dtype=torch.float64) / SAMPLE_RATE
    return (0.5 * torch.sin(2 * torch.pi * frequency * t)).float()


@torch.no_grad()
def encode_frame_codes(mimi: MimiModel, frame: torch.Tensor) -> torch.Tensor:
    """Mimi codes [8] of one 80 ms frame, encoded on its own (outside any stream)."""
    param = next(mimi.parameters())
    codes = mimi.encode(frame.view(1, 1, -1).to(param))
    return codes[0, :, 0]
