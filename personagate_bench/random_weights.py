"""PersonaPlex-7B's architecture with seeded random weights: for speed benchmarks only.

A step costs the same whatever the weights hold, so ``personagate bench worker --random-weights``
measures PersonaPlex's speed without its 16.7 GB checkpoint; what this model says is noise, which is
why it lives here and not among the loaders a worker may serve (``agent_runtime.model.LOADERS``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from agent_runtime.model.bundle import ModelBundle
from agent_runtime.model.personaplex import (
    PERSONAPLEX_LM_KWARGS,
    build_personaplex_lm,
    build_personaplex_mimi,
    check_vocabulary,
    personaplex_bundle,
)
from agent_runtime.model.tiny import randomise_codebooks, tiny_voice_presets, train_tiny_tokenizer

log = logging.getLogger(__name__)


def load_personaplex_random(
    seed: int = 1234,
    device: str | torch.device | None = None,
    *,
    lm_kwargs: dict[str, Any] | None = None,
    mimi_config: dict[str, Any] | None = None,
) -> ModelBundle:
    """PersonaPlex-7B's exact architecture (``build_personaplex_lm``, the real-size Mimi) with seeded
    random weights, for speed benchmarks only (``personagate bench worker --random-weights``): a step
    costs the same whatever the weights hold, but what this model says and sounds like is noise.

    The text tokenizer is a stand-in (the tiny model's, trained in-process; PersonaPlex's 32k
    SentencePiece model is part of the checkpoint) and the voices are the tiny model's clips, primed
    through Mimi like any voice clip. Never served: ``LOADERS`` does not offer it.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.monotonic()
    tokenizer = train_tiny_tokenizer()
    lm_kwargs = dict(lm_kwargs or PERSONAPLEX_LM_KWARGS)
    check_vocabulary(tokenizer, lm_kwargs, "stand-in tokenizer")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        lm = build_personaplex_lm(lm_kwargs, device)
        mimi = build_personaplex_mimi(mimi_config, device)
        randomise_codebooks(mimi, seed)
    bundle = personaplex_bundle(lm, mimi, tokenizer, device, dict(tiny_voice_presets()))
    bundle.random_weights = True
    log.info("PersonaPlex architecture built with random weights (speed benchmarks only)",
             extra={"device": str(device), "seconds": round(time.monotonic() - started, 1)})
    return bundle
