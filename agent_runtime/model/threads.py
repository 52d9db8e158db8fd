"""torch's thread pools sized to the worker's CPU share, not the node's cores."""

from __future__ import annotations

import os
from collections.abc import Mapping


def limit_interop_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """torch's inter-op pool set to ``OMP_NUM_THREADS`` (the pod's CPU request, deploy/k8s), as OpenMP's intra-op
    pool already is: torch has no environment variable for the inter-op pool, which otherwise starts a thread per
    core of the node (64 on a big GPU node, contending with the 80 ms tick and other pods). Call it once, before the
    model runs anything; the count set, or None (unset, not a positive integer, or too late: torch refuses once its
    pool has started)."""
    value = environ.get("OMP_NUM_THREADS", "")
    if not value.isdigit() or int(value) < 1:
        return None
    import torch

    try:
        torch.set_num_interop_threads(int(value))
    except RuntimeError:
        return None
    return int(value)
