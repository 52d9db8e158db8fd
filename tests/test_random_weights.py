"""PersonaPlex's architecture with random weights: benchmarks only (``bench worker --random-weights``).

The 7B model itself is built only on ``meta`` here (no memory, no time); the construction path runs
for real at the tiny model's shapes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agent_runtime.batch import SlotBatch
from agent_runtime.config import WorkerSettings
from agent_runtime.model import LOADERS, load_tiny
from agent_runtime.model.personaplex import PERSONAPLEX_LM_KWARGS, build_personaplex_lm
from agent_runtime.model.tiny import TINY_MIMI_CONFIG, tiny_lm_kwargs
from agent_runtime.priming import Primer, plan_priming
from agent_runtime.voice_prompt import load_voice, prompt_tokens
from personagate.cli import main
from personagate_bench import worker as bench
from personagate_bench.random_weights import load_personaplex_random
from personagate_common.persona import Persona

GREEDY = {"use_sampling": False}


def _small_random(seed: int = 1234, device: str | None = "cpu"):
    return load_personaplex_random(
        seed, device, lm_kwargs=tiny_lm_kwargs(load_tiny().tokenizer.vocab_size()), mimi_config=TINY_MIMI_CONFIG
    )


def test_the_7b_architecture_is_built_in_one_place_with_personaplex_shapes():
    lm = build_personaplex_lm(None, "meta")
    params = sum(p.numel() for p in lm.parameters())
    assert 7.0e9 < params < 8.5e9  # moshi's 7B temporal transformer plus 16 depth steps' weights
    assert lm.dim == 4096 and len(lm.transformer.layers) == 32 and lm.context == 3000
    assert len(lm.linears) == 16 and lm.dtype == torch.bfloat16
    assert PERSONAPLEX_LM_KWARGS["dep_q"] == 16


@pytest.mark.slow  # seconds of the tiny model on CPU
def test_random_weights_go_through_the_personaplex_construction_and_are_marked():
    bundle = _small_random()
    assert bundle.name == "personaplex" and bundle.random_weights
    assert bundle.dtype == torch.bfloat16  # as the checkpoint loader casts it
    assert bundle.lm.dep_q == 8 and len(bundle.lm.linears) == 16  # 8 generated of 16 in the weights
    assert bundle.voices  # the stand-in clips, primed through Mimi
    assert load_tiny().random_weights  # the tiny model's weights are random too
    assert "random" not in LOADERS and load_personaplex_random not in LOADERS.values()  # never served


@pytest.mark.slow  # seconds of the tiny model on CPU
def test_random_weights_are_seeded():
    a, b, c = _small_random(1), _small_random(1), _small_random(2)
    wa, wb, wc = (x.lm.transformer.layers[0].gating.linear_in.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert torch.equal(a.silence_codes, b.silence_codes)


@pytest.mark.slow  # seconds of the tiny model on CPU
def test_a_random_weights_bundle_primes_and_steps_like_any_other():
    bundle = _small_random()
    persona = Persona(prompt="Thank you for calling, how can I help you today?", voice=min(bundle.voices))
    primer = Primer(bundle, GREEDY)
    plan = plan_priming(bundle, load_voice(bundle, persona, primer.mimi), prompt_tokens(bundle, persona.prompt))
    primed = primer.prime(plan, persona.content_hash())
    batch = SlotBatch(bundle, 2, WorkerSettings(sampling={"greedy": True}).sampling)
    try:
        batch.install(0, primed)
        batch.install(1, primed)
        out = batch.step(np.zeros((2, 1920), dtype=np.float32), np.ones(2, dtype=bool))
    finally:
        batch.close()
    assert out.pcm.shape == (2, 1920) and np.isfinite(out.pcm).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_tiny_model_and_random_weights_build_on_cuda():
    assert load_tiny(device="cuda").mimi.quantizer.rvq_first.vq.layers[0]._codebook.embedding_sum.is_cuda
    assert _small_random(device="cuda").lm.dtype == torch.bfloat16


def test_random_weights_are_refused_outside_the_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["worker", "--model", "personaplex", "--random-weights"])
    assert main(["bench", "worker", "--random-weights"]) == 2  # needs --model personaplex
    assert main(["bench", "worker", "--model", "personaplex", "--weights", "/x", "--random-weights"]) == 2
    assert "--random-weights needs --model personaplex" in capsys.readouterr().err


@pytest.mark.slow  # seconds of the tiny model on CPU
def test_the_bench_report_says_the_weights_are_random(monkeypatch, capsys):
    monkeypatch.setenv("NO_TORCH_COMPILE", "1")
    monkeypatch.setattr(bench, "load_personaplex_random", lambda seed, device: _small_random(seed, device))
    code = main(["bench", "worker", "--model", "personaplex", "--random-weights", "--json", "--device", "cpu",
                 "--batch-sizes", "1,2", "--ticks", "3", "--warmup", "1", "--max-slots", "2"])
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["weights"] == "random" and "speed figures only" in report["note"]
    assert "speed figures only" in captured.err
    assert report["model"]["name"] == "personaplex" and report["model"]["dtype"] == "bfloat16"
    assert report["model"]["depth_steps"] == {"generated": 8, "in_weights": 16}
    assert [r["batch"] for r in report["ticks"]] == [1, 2]
    assert report["session_start"]["pool_start_cached_p95_ms"] > 0
