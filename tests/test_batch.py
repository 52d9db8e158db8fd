"""The batched model: slots stepped together must behave as if each call had the model to itself."""

from __future__ import annotations

import numpy as np
import pytest

from agent_runtime.batch import SlotBatch
from agent_runtime.model import FRAME_SAMPLES, load_tiny
from agent_runtime.persona import Persona, load_voice, prompt_tokens
from agent_runtime.priming import Primer, plan_priming

GREEDY = {"use_sampling": False}
CLAIMS = Persona(prompt="You are a claims agent at Harbor Mutual Insurance.", voice="tiny-low")
BANK = Persona(prompt="You work for Northwind Bank card services.", voice="tiny-high")


@pytest.fixture
def bundle():
    return load_tiny()


@pytest.fixture
def primed(bundle):
    primer = Primer(bundle, GREEDY)

    def prime(persona: Persona):
        voice = load_voice(bundle, persona, primer.mimi)
        return primer.prime(plan_priming(bundle, voice, prompt_tokens(bundle, persona.prompt)), "x")

    return {"claims": prime(CLAIMS), "bank": prime(BANK)}


def _audio(seed: int, frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((frames, FRAME_SAMPLES)) * 0.1).astype(np.float32)


def _run(bundle, installs: dict[int, object], inputs: dict[int, np.ndarray], capacity: int,
         skip: dict[int, set[int]] | None = None):
    """Step a fresh batch; return per-slot lists of (text token, pcm frame) for executed steps."""
    skip = skip or {}
    batch = SlotBatch(bundle, capacity, GREEDY)
    out: dict[int, list] = {slot: [] for slot in installs}
    try:
        for slot, state in installs.items():
            batch.install(slot, state)
        steps = max(len(a) for a in inputs.values())
        for t in range(steps):
            pcm = np.zeros((capacity, FRAME_SAMPLES), dtype=np.float32)
            executing = np.zeros(capacity, dtype=bool)
            for slot, audio in inputs.items():
                if t < len(audio) and t not in skip.get(slot, set()):
                    pcm[slot] = audio[t]
                    executing[slot] = True
            result = batch.step(pcm, executing)
            for slot in installs:
                if result.produced[slot]:
                    out[slot].append((result.text_tokens[slot], result.pcm[slot].copy()))
    finally:
        batch.close()
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(ta == tb and np.array_equal(pa, pb) for (ta, pa), (tb, pb) in zip(a, b))


def test_one_call_never_reaches_another_slot(bundle, primed):
    """Isolation: what one caller says, and which persona another call runs, never changes a word or
    a sample of a different call in the same batch."""
    caller = _audio(1, 12)
    first = _run(bundle, {0: primed["claims"], 1: primed["bank"]}, {0: caller, 1: _audio(2, 12)}, 2)
    second = _run(bundle, {0: primed["claims"], 1: primed["claims"]}, {0: caller, 1: _audio(3, 12) * 4}, 2)
    assert len(first[0]) == 12
    assert _same(first[0], second[0])
    assert not _same(first[1], second[1])  # the neighbour really did hear and say something else


def test_a_slot_without_input_is_frozen(bundle, primed):
    """A caller whose audio is late is not stepped: when the audio arrives the call resumes exactly
    where it was, as if the gap never happened, while its neighbour keeps going."""
    caller = _audio(5, 10)
    neighbour = _audio(6, 14)
    steady = _run(bundle, {0: primed["bank"], 1: primed["claims"]}, {0: caller, 1: neighbour[:10]}, 2)
    # Slot 0's frames arrive late: 4 ticks with nothing from it, then the same 10 frames.
    delayed_input = np.concatenate([np.zeros((4, FRAME_SAMPLES), np.float32), caller])
    gapped = _run(bundle, {0: primed["bank"], 1: primed["claims"]}, {0: delayed_input, 1: neighbour},
                  2, skip={0: {0, 1, 2, 3}})
    assert _same(steady[0], gapped[0])
    assert len(gapped[1]) == 14


def test_a_reused_slot_starts_clean(bundle, primed):
    """A new call in a slot that just served another call starts exactly like a call in a fresh
    worker: nothing of the previous call leaks into it."""
    caller = _audio(8, 8)
    fresh = _run(bundle, {0: primed["claims"]}, {0: caller}, 1)
    batch = SlotBatch(bundle, 1, GREEDY)
    try:
        batch.install(0, primed["bank"])
        for frame in _audio(9, 20):
            batch.step(frame[None], np.ones(1, dtype=bool))
        batch.install(0, primed["claims"])
        reused = []
        for frame in caller:
            result = batch.step(frame[None], np.ones(1, dtype=bool))
            reused.append((result.text_tokens[0], result.pcm[0].copy()))
    finally:
        batch.close()
    assert _same(fresh[0], reused)


def test_agent_audio_is_one_frame_per_step(bundle, primed):
    """Each caller frame gives exactly one 80 ms agent frame, from the very first step after priming."""
    out = _run(bundle, {0: primed["claims"]}, {0: _audio(4, 3)}, 1)
    assert len(out[0]) == 3
    assert all(pcm.shape == (FRAME_SAMPLES,) and np.isfinite(pcm).all() for _, pcm in out[0])
    assert all(0 <= tok < bundle.lm.text_card for tok, _ in out[0])
