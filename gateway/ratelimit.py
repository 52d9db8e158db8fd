"""Per-key leaky buckets in bounded memory: what every per-source limit of the gateway counts with.

Each key (a client's address, a token's first characters, ...) has a bucket of up to ``capacity`` units that
refills at ``per_second``; an unknown key's bucket is full. The callers decide what a unit is and what an
empty bucket means: the browser call API's anonymous offer rate (``gateway/webrtc/api.py``, one unit an
offer, refused without one) and the admin API's failed-login throttle (``gateway/admin/throttle.py``, one
unit a failure, which may overdraw the bucket so that a guesser who keeps going is held longer).

Memory is bounded: at most ``max_keys`` keys are kept. When a new key would pass that, keys whose bucket has
refilled are dropped first (forgetting them loses nothing: an unknown key's bucket is full), then the least
recently stored ones until a tenth of the room is free, so that the scan is rare.

Not thread-safe by itself: a caller used from threads as well as the event loop holds its own lock around
a ``level``/``store`` pair, which is one step anyway (no await between them) on the event loop.

    buckets = KeyedBuckets(capacity=5, per_second=0.25, max_keys=10_000)
    now = time.monotonic()
    level = buckets.level(key, now)
    if level < 1:
        refuse(retry_after=buckets.wait(level))
    buckets.store(key, level - 1, now)
"""

from __future__ import annotations

from collections import OrderedDict


class KeyedBuckets:
    """A bucket per key: ``capacity`` units at most, refilled at ``per_second``; ``max_keys`` kept (see the
    module). Times are the caller's clock's seconds (monotonic), passed as ``now``."""

    def __init__(self, *, capacity: float, per_second: float, max_keys: int) -> None:
        if capacity < 1 or per_second <= 0 or max_keys < 1:
            raise ValueError(f"need capacity >= 1, per_second > 0, max_keys >= 1; got {capacity}, {per_second}, "
                             f"{max_keys}")
        self.capacity = float(capacity)
        self.per_second = per_second
        self.max_keys = max_keys
        # key → (level, when it was stored), least recently stored first
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are kept now."""
        return len(self._levels)

    def level(self, key: str, now: float) -> float:
        """``key``'s level at ``now``, refilled since it was stored (full for a key not kept). Changes nothing."""
        level, when = self._levels.get(key, (self.capacity, now))
        # max(0, ...): a clock that went back refills nothing rather than draining the bucket
        return min(self.capacity, level + max(0.0, now - when) * self.per_second)

    def wait(self, level: float) -> float:
        """Seconds until a bucket at ``level`` holds one unit again (0: it holds one now)."""
        return 0.0 if level >= 1 else (1 - level) / self.per_second

    def store(self, key: str, level: float, now: float) -> None:
        """Keep ``key`` at ``level`` (below 0: overdrawn) as of ``now``, as its most recently stored key; a new
        key past ``max_keys`` first makes room (see the module)."""
        if key not in self._levels and len(self._levels) >= self.max_keys:
            self._forget(now)
        self._levels[key] = (level, now)
        self._levels.move_to_end(key)

    def _forget(self, now: float) -> None:
        """Free a tenth of ``max_keys`` at least: keys whose bucket has refilled first, then the least recently
        stored."""
        for key in [key for key in self._levels if self.level(key, now) >= self.capacity]:
            del self._levels[key]
        while len(self._levels) > self.max_keys - max(1, self.max_keys // 10):
            self._levels.popitem(last=False)
