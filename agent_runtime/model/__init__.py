"""The model a worker serves, split the way moshi splits ``models/lm.py`` from ``models/loaders.py``.

``bundle.py``: ``ModelBundle``, what the runtime uses (LM, codec, tokenizer, priming codes) and the frame
constants (defined in ``personagate_common.protocol``). ``tiny.py``: the seeded tiny model (tests, CPU). ``personaplex.py``: PersonaPlex-7B's
architecture and checkpoint loading. ``LOADERS`` names what a worker may serve; PersonaPlex with random
weights is a benchmark tool (``personagate_bench.random_weights``) and is never served.
"""

from __future__ import annotations

from collections.abc import Callable

from personagate_common.protocol import FRAME_BYTES, FRAME_RATE, FRAME_SAMPLES, SAMPLE_RATE

from .bundle import AGENT_CODEBOOKS, ModelBundle
from .personaplex import CheckpointError, load_personaplex
from .tiny import load_tiny

LOADERS: dict[str, Callable[..., ModelBundle]] = {"tiny": load_tiny, "personaplex": load_personaplex}

__all__ = [
    "AGENT_CODEBOOKS",
    "FRAME_BYTES",
    "FRAME_RATE",
    "FRAME_SAMPLES",
    "LOADERS",
    "SAMPLE_RATE",
    "CheckpointError",
    "ModelBundle",
    "load_personaplex",
    "load_tiny",
]
