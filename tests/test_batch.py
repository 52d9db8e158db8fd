"""The batched model: slots stepped together must behave as if each call had the model to itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent_runtime.batch import SlotBatch, SlotSampling
from agent_runtime.config import Sampling, SessionSampling
from agent_runtime.model import FRAME_SAMPLES, load_tiny
from agent_runtime.priming import Primer, plan_priming
from agent_runtime.voice_prompt import load_voice, prompt_tokens
from personagate_common.persona import Persona

pytestmark = pytest.mark.slow  # the tiny model on CPU: seconds per test and per module set-up

GREEDY = Sampling(greedy=True)
SAMPLED = Sampling()  # the worker default: PersonaPlex's sampling settings
ARGMAX = SessionSampling(top_k=1, text_top_k=1)  # a session that always takes the likeliest token
CLAIMS = Persona(prompt="You are a claims agent at Harbor Mutual Insurance.", voice="tiny-low")
BANK = Persona(prompt="You work for Northwind Bank card services.", voice="tiny-high")


@pytest.fixture
def bundle():
    return load_tiny()


@pytest.fixture
def primed(bundle):
    primer = Primer(bundle, GREEDY.lm_gen_kwargs())

    def prime(persona: Persona):
        voice = load_voice(bundle, persona, primer.mimi)
        return primer.prime(plan_priming(bundle, voice, prompt_tokens(bundle, persona.prompt)), "x")

    return {"claims": prime(CLAIMS), "bank": prime(BANK)}


def _audio(seed: int, frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((frames, FRAME_SAMPLES)) * 0.1).astype(np.float32)


def _run(bundle, installs: dict[int, object], inputs: dict[int, np.ndarray], capacity: int,
         skip: dict[int, set[int]] | None = None, sampling: Sampling = GREEDY,
         per_slot: dict[int, SessionSampling] | None = None, seed: int = 0):
    """Step a fresh batch; return per-slot lists of (text token, pcm frame) for executed steps."""
    skip = skip or {}
    per_slot = per_slot or {}
    torch.manual_seed(seed)  # what moshi samples with
    batch = SlotBatch(bundle, capacity, sampling)
    out: dict[int, list] = {slot: [] for slot in installs}
    try:
        for slot, state in installs.items():
            batch.install(slot, state, per_slot.get(slot))
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


# ---------------------------------------------------------------------------- per-slot sampling


def test_a_top_k_1_call_decodes_greedily_whatever_its_neighbour_samples(bundle, primed):
    """A session asking for top_k=1 (audio and text) says exactly what a greedy worker would say to
    the same caller, word for word and sample for sample, while the call beside it in the same batch
    samples at a high temperature; and how that neighbour samples never changes the first call."""
    caller = _audio(11, 12)
    inputs = {0: caller, 1: _audio(12, 12)}
    installs = {0: primed["claims"], 1: primed["claims"]}
    greedy = _run(bundle, installs, inputs, 2)
    hot = _run(bundle, installs, inputs, 2, sampling=SAMPLED, seed=1,
               per_slot={0: ARGMAX, 1: SessionSampling(temperature=1.5, text_temperature=1.5)})
    other = _run(bundle, installs, inputs, 2, sampling=SAMPLED, seed=2,
                 per_slot={0: ARGMAX, 1: SessionSampling(temperature=0.3, top_k=3, text_top_k=2)})
    assert len(greedy[0]) == 12
    assert _same(hot[0], greedy[0]) and _same(other[0], greedy[0])
    assert not _same(hot[1], greedy[1])  # the neighbour really sampled
    assert not _same(hot[1], other[1])


def test_a_reused_slot_samples_with_its_new_sessions_settings(bundle, primed):
    """A slot keeps a session's sampling only as long as that session: the next call in the slot
    samples with its own settings (here top_k=1, so it matches a greedy call exactly), and a call that
    gives none gets the worker's defaults, not the previous call's."""
    caller = _audio(13, 8)
    fresh = _run(bundle, {0: primed["claims"]}, {0: caller}, 1)
    torch.manual_seed(3)
    batch = SlotBatch(bundle, 1, SAMPLED)
    try:
        batch.install(0, primed["bank"], SessionSampling(temperature=2.0, text_temperature=2.0))
        for frame in _audio(9, 10):
            batch.step(frame[None], np.ones(1, dtype=bool))
        batch.install(0, primed["claims"], ARGMAX)
        assert batch.slot_sampling(0) == ARGMAX
        reused = []
        for frame in caller:
            result = batch.step(frame[None], np.ones(1, dtype=bool))
            reused.append((result.text_tokens[0], result.pcm[0].copy()))
        batch.install(0, primed["claims"])
        assert batch.slot_sampling(0) == SAMPLED.session_defaults()
    finally:
        batch.close()
    assert _same(fresh[0], reused)


def test_temperature_is_per_call(bundle, primed):
    """Each call's temperature shapes its own choices only: a call at a near-zero temperature picks
    the likeliest token every time (it matches a greedy call), while the call beside it at a high
    temperature, with the same caller and persona, says something else."""
    caller = _audio(14, 12)
    installs = {0: primed["bank"], 1: primed["bank"]}
    inputs = {0: caller, 1: caller}
    greedy = _run(bundle, installs, inputs, 2)
    mixed = _run(bundle, installs, inputs, 2, sampling=SAMPLED, seed=4, per_slot={
        0: SessionSampling(temperature=1e-6, text_temperature=1e-6),
        1: SessionSampling(temperature=2.0, text_temperature=2.0),
    })
    assert _same(mixed[0], greedy[0])
    assert not _same(mixed[1], greedy[1])


def test_top_k_and_temperature_shape_each_rows_distribution():
    """A row's top_k leaves exactly its k likeliest tokens to choose from (the rest can never be
    drawn), and its temperature sharpens or flattens what is left, row by row."""
    card = 16
    rows = SlotSampling(3, torch.device("cpu"), card, card, SessionSampling())
    rows.set(0, SessionSampling(top_k=1, text_top_k=3))
    rows.set(1, SessionSampling(top_k=5, temperature=0.5, text_top_k=2048, text_temperature=2.0))
    rows.set(2, SessionSampling(top_k=2048, temperature=2.0, text_top_k=1))
    logits = torch.linspace(0, 3, card).repeat(3, 1).view(3, 1, 1, card)
    audio = rows.adjust_audio(logits.clone())
    assert [int(torch.isfinite(audio[r]).sum()) for r in range(3)] == [1, 5, card]
    assert int(audio[0].argmax()) == card - 1 and bool(torch.isfinite(audio[1, ..., -5:]).all())
    kept = torch.isfinite(audio[1])
    assert torch.allclose(audio[1][kept], logits[1][kept] / 0.5)
    assert torch.allclose(audio[2], logits[2] / 2.0)
    text = logits.clone()
    rows.adjust_text(text)
    assert [int(torch.isfinite(text[r]).sum()) for r in range(3)] == [3, card, 1]
    assert torch.allclose(text[1], logits[1] / 2.0)


def test_a_sampling_batch_leaves_the_model_as_it_found_it(bundle, primed):
    """A sampling batch adjusts only its own model's depth logits, only while it is open: the
    primer's copy of the model is untouched, a second batch cannot step the same model at the same
    time, and once the batch is closed a greedy batch on the model decodes exactly as before."""
    caller = _audio(15, 6)
    before = _run(bundle, {0: primed["claims"]}, {0: caller}, 1)
    primer = Primer(bundle, GREEDY.lm_gen_kwargs())
    batch = SlotBatch(bundle, 2, SAMPLED)
    try:
        assert "forward_depformer" in vars(bundle.lm)
        assert "forward_depformer" not in vars(primer.lm)
        with pytest.raises(AssertionError, match="already streaming"):  # moshi's own refusal
            SlotBatch(bundle, 1, SAMPLED)
        assert "forward_depformer" in vars(bundle.lm)
    finally:
        batch.close()
    assert "forward_depformer" not in vars(bundle.lm)
    after = _run(bundle, {0: primed["claims"]}, {0: caller}, 1)
    assert _same(before[0], after[0])
