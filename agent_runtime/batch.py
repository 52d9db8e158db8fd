"""The batched model: B session slots stepped together, one 80 ms frame per step.

Synchronous and single-threaded on purpose: the pool (pool.py) owns the clock, the threads and the
sessions; this class only turns one frame of caller audio per executing slot into one frame of agent
audio and one text token. Slots start and stop independently through reset masks, and slots without
input this step are left out through the exec mask, so their state does not move.

Each slot samples with its own settings (``SessionSampling``: temperature and top-k for the audio
codebooks and for the text stream), set when a session is installed. moshi's ``LMGen`` takes one
scalar of each for the whole batch, so it is told to sample at temperature 1 without top-k, and the
logits are adjusted per row just before it samples them: the text logits in its
``on_text_logits_hook``, the depth transformer's logits by wrapping ``forward_depformer`` of the model
instance this batch steps. The per-row settings live in persistent tensors updated in place, so that
the CUDA graph moshi captures around the depth steps stays valid when a slot changes hands.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from moshi.models import LMGen, LMModel

from personagate_common.protocol import FRAME_SAMPLES

from .config import Sampling, SessionSampling
from .model import ModelBundle
from .priming import PrimedState, restore
from .slots import StepOutput


class SlotBatch:
    """``capacity`` session slots of ``bundle``'s model. ``sampling`` gives the settings of slots
    installed without their own; with ``sampling.greedy`` every slot decodes greedily."""

    def __init__(self, bundle: ModelBundle, capacity: int, sampling: Sampling) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        _check_memory(bundle, capacity)
        self.bundle = bundle
        self.capacity = capacity
        self.device = bundle.device
        self.greedy = sampling.greedy
        self.default_sampling = sampling.session_defaults()
        self._rows: SlotSampling | None = None
        lm_gen_kwargs: dict = {"use_sampling": False}
        if not self.greedy:
            self._rows = SlotSampling(capacity, bundle.device, bundle.lm.card, bundle.lm.text_card,
                                      self.default_sampling)
            # LMGen samples what the rows' settings leave: temperature 1, no top-k of its own.
            lm_gen_kwargs = {"use_sampling": True, "temp": 1.0, "temp_text": 1.0, "top_k": 0, "top_k_text": 0,
                             "on_text_logits_hook": self._rows.adjust_text}
        # out-of-sync support: slots are at different positions, and a reset of one slot must not
        # make the whole batch warm up again (moshi's offset_cpu is shared by the batch).
        self.lm_gen = LMGen(bundle.lm, support_out_of_sync=True, **lm_gen_kwargs)
        self.mimi = bundle.mimi
        self._streaming = contextlib.ExitStack()
        self._streaming.enter_context(self.lm_gen.streaming(capacity))
        self._streaming.enter_context(self.mimi.streaming(capacity))
        if self._rows is not None:
            # Only while the model is streaming, i.e. while nothing can clone it (ModelBundle refuses)
            # and no other batch can step it (moshi refuses): the wrapper never outlives this batch.
            self._streaming.callback(_wrap_depformer(bundle.lm, self._rows.adjust_audio))
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
    def install(self, slot: int, primed: PrimedState, sampling: SessionSampling | None = None) -> None:
        """Start a session in ``slot`` from a primed persona state, sampling with ``sampling``
        (default: the batch's) until the slot is installed again. A greedy batch ignores it."""
        mask = self._one_slot(slot)
        self.lm_gen.reset_streaming(mask)
        self.mimi.reset_streaming(mask)
        restore(primed, self.lm_gen, slot)
        if self._rows is not None:
            self._rows.set(slot, sampling or self.default_sampling)

    def slot_sampling(self, slot: int) -> SessionSampling | None:
        """The settings ``slot`` samples with; None in a greedy batch."""
        return None if self._rows is None else self._rows.settings[slot]

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


class SlotSampling:
    """Per-slot sampling settings as persistent tensors, and the logit adjustments that apply them.

    A row's temperature divides its logits; a row's top-k sets every logit below its k-th largest to
    -inf. moshi then samples at temperature 1 over what is left, which draws from the same
    distribution as moshi's own top-k sampling at that temperature. A top-k of 1 leaves only the
    argmax: greedy decoding for that row, whatever its neighbours do.
    """

    def __init__(self, capacity: int, device: torch.device, card: int, text_card: int,
                 defaults: SessionSampling) -> None:
        self.card, self.text_card = card, text_card
        self.settings = [defaults] * capacity
        # The depth steps may run inside a CUDA graph: their top-k width must not change after
        # capture, so it covers the largest k a session may ask for.
        self._audio_width = min(card, int(SessionSampling.bounds("top_k")[1]))
        self.temperature = torch.empty(capacity, device=device, dtype=torch.float32)
        self.text_temperature = torch.empty(capacity, device=device, dtype=torch.float32)
        self.top_k_index = torch.empty(capacity, device=device, dtype=torch.long)  # k - 1, within the card
        self.text_top_k_index = torch.empty(capacity, device=device, dtype=torch.long)
        for slot in range(capacity):
            self.set(slot, defaults)

    def set(self, slot: int, sampling: SessionSampling) -> None:
        """In place, between steps."""
        self.settings[slot] = sampling
        self.temperature[slot] = sampling.temperature
        self.text_temperature[slot] = sampling.text_temperature
        self.top_k_index[slot] = min(sampling.top_k, self.card) - 1
        self.text_top_k_index[slot] = min(sampling.text_top_k, self.text_card) - 1
        text_ks = [min(s.text_top_k, self.text_card) for s in self.settings]
        # The text stream is sampled outside any CUDA graph: its top-k width follows the slots.
        self._text_width = max(text_ks)
        self._text_masked = min(text_ks) < self.text_card

    def adjust_audio(self, logits: torch.Tensor) -> torch.Tensor:
        """One depth step's logits [B, 1, 1, card] -> float32 logits to sample at temperature 1.
        Fixed shapes and no host synchronisation: safe inside a CUDA graph."""
        x = logits.float()
        kth = x.topk(self._audio_width, dim=-1, sorted=True).values.gather(-1, self.top_k_index.view(-1, 1, 1, 1))
        x = x.masked_fill(x < kth, float("-inf"))
        return x.div_(self.temperature.view(-1, 1, 1, 1))

    def adjust_text(self, logits: torch.Tensor) -> None:
        """The text logits [B, 1, 1, text_card], in place (LMGen's ``on_text_logits_hook``)."""
        x = logits.float()  # the same tensor when it is float32 already
        if self._text_masked:
            kth = x.topk(self._text_width, dim=-1, sorted=True).values.gather(
                -1, self.text_top_k_index.view(-1, 1, 1, 1))
            x.masked_fill_(x < kth, float("-inf"))
        x.div_(self.text_temperature.view(-1, 1, 1, 1))
        if x is not logits:
            logits.copy_(x)


def _wrap_depformer(lm: LMModel, adjust: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """Route ``lm``'s per-codebook depth logits through ``adjust`` (on this instance only: the
    primer's copies of the model keep moshi's method). Returns the undo."""
    if "forward_depformer" in vars(lm):
        raise RuntimeError("this model's depth logits are already wrapped by another batch")
    original = lm.forward_depformer

    def forward_depformer(depformer_cb_index: int, sequence: torch.Tensor,
                          transformer_out: torch.Tensor) -> torch.Tensor:
        return adjust(original(depformer_cb_index, sequence, transformer_out))

    lm.forward_depformer = forward_depformer  # type: ignore[method-assign]

    def unwrap() -> None:
        if vars(lm).get("forward_depformer") is forward_depformer:
            del lm.forward_depformer

    return unwrap


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
