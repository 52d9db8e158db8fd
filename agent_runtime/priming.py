"""Persona priming: PersonaPlex's hybrid system prompt, computed once per persona and restored per call.

The reference server steps the model once per 80 ms frame through the prompt (voice frames, 6 silence
frames, the tagged text prompt, 6 silence frames): ~135 sequential steps before a call can start.
Here the same token sequence goes through the temporal transformer in one parallel forward pass
(its KV cache fills exactly as sequential steps would fill it), the last prompt frame is one ordinary
``LMGen`` step, and the resulting per-session state is snapshotted. Starting a call is then a copy of
that snapshot into a free slot of the batched pool.

Stream layout per frame (text, agent audio, user audio), as in the reference:
- voice frame: PAD, the clip's Mimi codes, the 440 Hz sine codes
- silence frame: PAD, silence codes, sine codes
- text frame: one SentencePiece id, silence codes, sine codes
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from moshi.models import LMGen, LMModel

from personagate_common.persona import Persona, PersonaError

from .model import ModelBundle
from .voice_prompt import VoicePrompt, load_voice, prompt_tokens

SILENCE_FRAMES = 6  # int(0.5 s * 12.5 Hz), PersonaPlex server.py
PP_RING = 4  # PersonaPlex's LMGen token ring length (max_delay + 3)


@dataclass
class PrimePlan:
    """The prompt as model input.

    ``prefix_embeddings`` [P, dim] are ready-made inputs for the first P positions (a ``.pt`` voice);
    ``columns`` [K, S] are the token inputs of positions P .. P+S-1, in moshi's delayed layout
    (position c holds text and agent/user codebook 0 of frame c, codebooks 1-7 of frame c-1).
    The last column is not run by the prefill: it is the input of the one ordinary step that ends
    priming, with ``final_user`` [8] as that step's user frame and ``final_agent_delayed`` [7] forced
    as the agent's codebooks 1-7 of the last prompt frame.
    """

    prefix_embeddings: torch.Tensor | None
    columns: torch.Tensor
    final_user: torch.Tensor
    final_agent_delayed: torch.Tensor

    @property
    def length(self) -> int:
        prefix = 0 if self.prefix_embeddings is None else int(self.prefix_embeddings.shape[0])
        return prefix + int(self.columns.shape[1])


def prompt_frames(bundle: ModelBundle, agent_codes: torch.Tensor, text_tokens: list[int]) -> torch.Tensor:
    """Real-time frames [17, N] of the prompt after the voice: rows text | agent 8 | user 8."""
    pad, silence, sine = bundle.text_pad_id, bundle.silence_codes.cpu(), bundle.sine_codes.cpu()
    texts = [pad] * SILENCE_FRAMES + list(text_tokens) + [pad] * SILENCE_FRAMES
    n = len(texts)
    frames = torch.empty(17, agent_codes.shape[1] + n, dtype=torch.long)
    voice = agent_codes.shape[1]
    frames[0, :voice] = pad
    frames[1:9, :voice] = agent_codes
    frames[0, voice:] = torch.tensor(texts, dtype=torch.long)
    frames[1:9, voice:] = silence[:, None]
    frames[9:17, :] = sine[:, None]
    return frames


def delay_frames(lm: LMModel, frames: torch.Tensor, first_position: int) -> torch.Tensor:
    """moshi's delayed layout of real-time frames that start at absolute position ``first_position``.

    Column j is position first_position + j; a position not past a stream's delay holds the initial
    token, which is what ``LMGen`` feeds there (so the first voice frame is overwritten, as in the
    reference). Column j needs frame j - delay, so with a delay of 1 and first_position > 1 column 0
    is not defined: the caller drops it.
    """
    initial = lm._get_initial_token()[0, :, 0].cpu()
    out = torch.empty_like(frames)
    n = frames.shape[1]
    for k, delay in enumerate(lm.delays):
        out[k, delay:] = frames[k, : n - delay]
        out[k, :delay] = initial[k]
        init_until = max(0, min(n, delay - first_position + 1))
        out[k, :init_until] = initial[k]
    return out


def plan_priming(bundle: ModelBundle, voice: VoicePrompt, text_tokens: list[int]) -> PrimePlan:
    lm = bundle.lm
    if voice.codes is not None:
        frames = prompt_frames(bundle, voice.codes.cpu(), text_tokens)
        columns = delay_frames(lm, frames, first_position=0)
        prefix = None
    else:
        assert voice.embeddings is not None and voice.ring is not None
        v = voice.frames
        ring = voice.ring.cpu()
        last_voice_col, after_col = ring[:, (v - 1) % PP_RING], ring[:, v % PP_RING]
        # The ring keeps the last voice frame's undelayed streams at position v-1 and the delayed
        # codebooks of frames v-2 and v-1 at positions v-1 and v: rebuild those two frames from it.
        tail = torch.stack([last_voice_col, last_voice_col], dim=1)  # frames v-2 (delayed rows only), v-1
        delayed_rows = [k for k, d in enumerate(lm.delays) if d > 0]
        tail[delayed_rows, 1] = after_col[delayed_rows]
        rest = prompt_frames(bundle, torch.empty(8, 0, dtype=torch.long), text_tokens)
        frames = torch.cat([tail, rest], dim=1)
        columns = delay_frames(lm, frames, first_position=v - 2)[:, 1:]
        prefix = voice.embeddings
    last = frames[:, -1]
    return PrimePlan(prefix, columns, final_user=last[9:17].clone(), final_agent_delayed=last[2:9].clone())


@dataclass
class PrimedState:
    """One session's model state right after priming: what a pool slot is set to for a new call."""

    persona_hash: str
    position: int  # frames consumed; the next step reads this position
    kv: list[torch.Tensor]  # per temporal layer [2, heads, position, head_dim]
    ring: torch.Tensor  # [K, ring] LMGen's token ring
    prime_seconds: float


class Primer:
    """Primes personas on its own copy of the modules (weights shared with the pool's)."""

    def __init__(self, bundle: ModelBundle, lm_gen_kwargs: dict) -> None:
        self.bundle = bundle
        self.lm = bundle.lm_sharing_weights()
        self.mimi = bundle.mimi_sharing_weights()
        self._forced: torch.Tensor | None = None
        self.lm_gen = LMGen(
            self.lm, on_audio_hook=self._force_audio, support_out_of_sync=True, **lm_gen_kwargs
        )
        self.context = int(self.lm.context or 0)
        # On a GPU, priming runs on its own stream so that it overlaps the pool's ticks instead of
        # queueing in front of them.
        self._stream = torch.cuda.Stream(bundle.device) if bundle.device.type == "cuda" else None

    def _force_audio(self, audio_tokens: torch.Tensor) -> None:
        if self._forced is not None:
            audio_tokens[:, 1:] = self._forced

    def prime_persona(self, persona: Persona, persona_hash: str) -> PrimedState:
        """Prime ``persona``'s voice and prompt (PersonaError if either cannot be used)."""
        voice = load_voice(self.bundle, persona, self.mimi)
        return self.prime(plan_priming(self.bundle, voice, prompt_tokens(self.bundle, persona.prompt)), persona_hash)

    def prime(self, plan: PrimePlan, persona_hash: str) -> PrimedState:
        started = time.perf_counter()
        if self.context and plan.length >= self.context // 2:
            raise PersonaError(
                f"persona prompt is {plan.length} frames long with its voice; at most {self.context // 2 - 1} fit"
            )
        if self._stream is None:
            kv, ring = self._prime(plan)
        else:
            with torch.cuda.stream(self._stream):
                kv, ring = self._prime(plan)
            self._stream.synchronize()
        return PrimedState(persona_hash, plan.length, kv, ring, time.perf_counter() - started)

    @torch.no_grad()
    def _prime(self, plan: PrimePlan) -> tuple[list[torch.Tensor], torch.Tensor]:
        device, dtype = self.bundle.device, self.bundle.dtype
        lm, lm_gen = self.lm, self.lm_gen
        with lm_gen.streaming(1):
            if plan.prefix_embeddings is not None:
                lm.transformer(plan.prefix_embeddings.to(device=device, dtype=dtype)[None])
            if plan.columns.shape[1] > 1:
                lm.forward_text(plan.columns[None, :, :-1].to(device))
            position = plan.length - 1
            state = lm_gen._streaming_state
            assert state is not None
            ring_len = state.cache.shape[2]
            state.cache[0, :, position % ring_len] = plan.columns[:, -1].to(device)
            state.offsets[:] = position
            self._forced = plan.final_agent_delayed.to(device)[None]
            try:
                lm_gen.step(plan.final_user.to(device)[None, :, None])
            finally:
                self._forced = None
            layers = _attention_states(lm)
            kv = [layer.kv_cache.cache[:, 0, :, : plan.length].clone() for layer in layers]
            if not all(int(layer.offset[0]) == plan.length for layer in layers):
                raise RuntimeError("priming left the attention layers at inconsistent positions")
            ring = lm_gen._streaming_state.cache[0].clone()
        return kv, ring


def _attention_states(lm: LMModel) -> list:
    states = []
    for layer in lm.transformer.layers:
        state = layer.self_attn._streaming_state
        if state is None or state.kv_cache is None:
            raise RuntimeError("the temporal transformer is not streaming")
        states.append(state)
    return states


@torch.no_grad()
def restore(primed: PrimedState, lm_gen: LMGen, slot: int) -> None:
    """Put ``primed`` into ``slot`` of a batched, streaming ``lm_gen`` (the slot must be reset first).

    Only in-place copies: CUDA graphs captured on these tensors stay valid.
    """
    lm = lm_gen.lm_model
    n = primed.position
    for state, kv in zip(_attention_states(lm), primed.kv, strict=True):
        state.kv_cache.cache[:, slot, :, :n].copy_(kv)
        state.kv_cache.end_offset[slot] = n
        state.offset[slot] = n
    transformer_state = lm.transformer._streaming_state
    assert transformer_state is not None
    transformer_state.offsets[slot] = n
    gen_state = lm_gen._streaming_state
    assert gen_state is not None
    gen_state.cache[slot].copy_(primed.ring)
    gen_state.offsets[slot] = n
