"""Persona priming: the fast path (parallel prefill, snapshot, restore into a batch slot) must give a
caller exactly what the reference's step-by-step priming gives."""

from __future__ import annotations

import pytest
import torch

from agent_runtime.batch import SlotBatch
from agent_runtime.config import Sampling
from agent_runtime.model import load_tiny
from agent_runtime.priming import Primer, plan_priming
from agent_runtime.voice_prompt import load_voice, prompt_tokens
from personagate_common.persona import Persona, PersonaError
from tests.reference import run_reference

pytestmark = pytest.mark.slow  # the tiny model on CPU: seconds per test and per module set-up

GREEDY = {"use_sampling": False}


@pytest.fixture
def bundle():
    return load_tiny()


def _user_frames(n: int, seed: int, card: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, card, (8,), generator=gen) for _ in range(n)]


def _primed(bundle, primer: Primer, persona: Persona):
    voice = load_voice(bundle, persona, primer.mimi)
    return voice, primer.prime(plan_priming(bundle, voice, prompt_tokens(bundle, persona.prompt)),
                               persona.content_hash())


@pytest.mark.parametrize("voice, dtype", [
    ("tiny-low", torch.float32), ("tiny-high", torch.float32), ("tiny-low", torch.bfloat16),
])
def test_fast_priming_matches_step_by_step_reference(bundle, voice, dtype):
    """A caller hears exactly what the reference priming would produce: the runtime's prefill +
    snapshot + restore into a slot of a busy batch, then greedy generation, yields the same token
    stream as a plain unbatched step-by-step run against moshi's public API (in fp32, and in bf16,
    the dtype PersonaPlex runs in)."""
    bundle.lm.to(dtype)
    persona = Persona(prompt="You are a claims agent at Harbor Mutual Insurance. Be brief.", voice=voice)
    primer = Primer(bundle, GREEDY)
    other = Persona(prompt="You work for Northwind Bank card services.", voice="tiny-low")
    voice_prompt, primed = _primed(bundle, primer, persona)
    _, other_primed = _primed(bundle, primer, other)
    card = bundle.lm.card
    user = _user_frames(25, seed=7, card=card)

    expected = run_reference(bundle, voice_prompt.codes, prompt_tokens(bundle, persona.prompt), user)

    batch = SlotBatch(bundle, 3, Sampling(greedy=True))
    try:
        batch.install(0, other_primed)
        batch.install(2, primed)
        noise = _user_frames(len(user), seed=99, card=card)
        got = []
        for frame, other_frame in zip(user, noise, strict=True):
            codes = torch.stack([other_frame, other_frame, frame])
            got.append(batch.step_codes(codes, torch.tensor([True, False, True]))[2].clone())
    finally:
        batch.close()
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]


def test_priming_reaches_the_reference_position(bundle):
    """The primed state sits where the reference's would: one position per prompt frame
    (voice frames + 6 silence + tagged prompt tokens + 6 silence)."""
    persona = Persona(prompt="Thank you for calling.", voice="tiny-low")
    primer = Primer(bundle, GREEDY)
    voice, primed = _primed(bundle, primer, persona)
    tokens = prompt_tokens(bundle, persona.prompt)
    assert primed.position == voice.frames + 6 + len(tokens) + 6
    assert tokens == bundle.tokenizer.encode("<system> Thank you for calling. <system>")
    assert all(kv.shape[2] == primed.position for kv in primed.kv)


def test_empty_prompt_primes_voice_only(bundle):
    """A persona with only a voice still primes (PersonaPlex skips the text part when it is empty)."""
    persona = Persona(prompt="", voice="tiny-high")
    primer = Primer(bundle, GREEDY)
    voice, primed = _primed(bundle, primer, persona)
    assert primed.position == voice.frames + 12


def test_prompt_longer_than_the_context_is_refused(bundle):
    """A prompt that would not fit the model's attention window is refused with its size, instead of
    silently losing its beginning."""
    persona = Persona(prompt="please hold the line " * 190, voice="tiny-low")
    primer = Primer(bundle, GREEDY)
    with pytest.raises(PersonaError, match="frames long"):
        _primed(bundle, primer, persona)
