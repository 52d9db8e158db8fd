"""Call routing: GPU session slots claimed atomically, tenant limits, worker death and drain.

``router.py`` is the interface; ``redis_store.py`` (with ``scripts.py``) and ``embedded.py`` implement it;
``metrics.py`` holds its Prometheus metrics (``personagate_bench/routing.py`` measures claims per second).
"""

from __future__ import annotations

from typing import Any

from .embedded import EmbeddedRouter
from .metrics import RoutingMetrics
from .redis_store import RedisRouter, SentinelSettings, parse_sentinel_url
from .router import (
    Claim,
    HeartbeatResult,
    ReapResult,
    Refusal,
    Router,
    WorkerSnapshot,
    WorkerState,
)

__all__ = [
    "Claim", "EmbeddedRouter", "HeartbeatResult", "ReapResult", "RedisRouter", "Refusal", "Router",
    "RoutingMetrics", "SentinelSettings", "WorkerSnapshot", "WorkerState", "make_router", "parse_sentinel_url",
]


def make_router(redis_url: str | SentinelSettings | None, **options: Any) -> Router:
    """``RedisRouter`` when a Redis URL (or Sentinel settings) is configured, else the in-process store.

    ``options``: ``lease_seconds``, ``worker_ttl``, ``retry_after_seconds``, ``metrics`` for both; ``prefix``,
    ``timeout``, ``connect_timeout``, ``max_connections`` for Redis only.
    """
    if redis_url:
        return RedisRouter(redis_url, **options)
    redis_only = {"prefix", "timeout", "connect_timeout", "max_connections"}
    return EmbeddedRouter(**{k: v for k, v in options.items() if k not in redis_only})
