"""The batched model: B session slots stepped together, one 80 ms frame per step.

Synchronous and single-threaded on purpose: the pool (pool.py) owns the clock, the threads and the
sessions; this class only turns one frame of caller audio per executing slot into one frame of agent
audio and one text token. Slots start and stop independently through reset masks, and slots without
input this step are left out through the exec mask, so their state does not move.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from moshi.models import LMGen

from .model import FRAME_SAMPLES, ModelBundle
from .priming import PrimedState, restore


@dataclass
class StepOutput:
    """One step's results for all slots; rows of slots that did not execute are meaningless."""

    pcm: np.ndarray  # [B, 1920] float32 in [-1, 1]
    text_tokens: list[int]  # [B]
    produced: np.ndarray  # [B] bool: the slot executed and produced a frame


class SlotBatch:
    def __init__(self, bundle: ModelBundle, capacity: int, lm_gen_kwargs: dict) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        _check_memory(bundle, capacity)
        self.bundle = bundle
        self.capacity = capacity
        self.device = bundle.device
        # out-of-sync support: slots are at different positions, and a reset of one slot must not
        # make the whole batch warm up again (moshi's offset_cpu is shared by the batch).
        self.lm_gen = LMGen(bundle.lm, support_out_of_sync=True, **lm_gen_kwargs)
        self.mimi = bundle.mimi
        self._streaming = contextlib.ExitStack()
        self._streaming.enter_context(self.lm_gen.streaming(capacity))
        self._streaming.enter_context(self.mimi.streaming(capacity))
        param = next(self.mimi.parameters())
        self._pcm_in = torch.zeros(capacity, 1, FRAME_SAMPLES, device=self.device, dtype=param.dtype)
        self._slot_mask = torch.zeros(capacity, dtype=torch.bool, device=self.device)

    def close(self) -> None:
        """Leave streaming mode, so that the bundle's modules can serve another batch."""
        self._streaming.close()

    def _one_slot(self, slot: int) -> torch.Tensor:
        self._slot_mask.zero_()
        self._slot_mask[slot] = True
        return self._slot_mask

    @torch.no_grad()
    def install(self, slot: int, primed: PrimedState) -> None:
        """Start a session in ``slot`` from a primed persona state."""
        mask = self._one_slot(slot)
        self.lm_gen.reset_streaming(mask)
        self.mimi.reset_streaming(mask)
        restore(primed, self.lm_gen, slot)

    @torch.no_grad()
    def step_codes(self, user_codes: torch.Tensor, executing: torch.Tensor) -> torch.Tensor:
        """One LM step on user codes [B, 8]; returns [B, 9] (text, agent 8), -2 where not generated."""
        self.lm_gen.set_exec_mask(executing)
        out = self.lm_gen.step(user_codes[:, :, None])
        assert out is not None  # out-of-sync mode never returns None
        return out[:, :, 0]

    @torch.no_grad()
    def step(self, pcm: np.ndarray, executing: np.ndarray) -> StepOutput:
        """One frame for every slot: ``pcm`` [B, 1920] float32 caller audio, ``executing`` [B] bool."""
        exec_mask = torch.from_numpy(executing).to(self.device)
        self._pcm_in[:, 0].copy_(torch.from_numpy(pcm))
        self.mimi.set_exec_mask(exec_mask)
        user_codes = self.mimi.encode(self._pcm_in)[:, :, 0]
        tokens = self.step_codes(user_codes, exec_mask)
        agent = tokens[:, 1:]
        produced = exec_mask & (agent >= 0).all(dim=1)
        # Rows that produced nothing carry -2 markers; the codec must not index with them.
        agent = torch.where(produced[:, None], agent, torch.zeros_like(agent))
        self.mimi.set_exec_mask(produced)
        pcm_out = self.mimi.decode(agent[:, :, None])[:, 0]
        return StepOutput(
            pcm=pcm_out.float().clamp_(-1, 1).cpu().numpy(),
            text_tokens=tokens[:, 0].tolist(),
            produced=produced.cpu().numpy(),
        )


def kv_bytes_per_slot(bundle: ModelBundle) -> int:
    """Memory of one slot's attention cache: every temporal layer keeps keys and values for the
    whole context (3000 frames, 240 s, for PersonaPlex: about 1.46 GiB in bf16)."""
    lm = bundle.lm
    element = torch.finfo(bundle.dtype).bits // 8
    return len(lm.transformer.layers) * 2 * int(lm.context or 0) * lm.dim * element


def _check_memory(bundle: ModelBundle, capacity: int) -> None:
    if bundle.device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(bundle.device)
    needed = capacity * kv_bytes_per_slot(bundle)
    if needed > free * 0.9:
        fits = max(0, int(free * 0.9 // kv_bytes_per_slot(bundle)))
        raise MemoryError(
            f"{capacity} slots need {needed / 2**30:.1f} GiB of attention cache but the GPU has "
            f"{free / 2**30:.1f} GiB free; about {fits} slots fit (--slots)"
        )
