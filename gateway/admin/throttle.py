"""Failed-attempt throttling: a leaky bucket of failures per key, in bounded memory.

Each key (a client's address, a token's first characters, ...) may fail ``burst`` times at once and then
``per_minute`` times a minute; past that it is *held* until its bucket has room for one more failure.
While held, every attempt by that key is refused without being checked — the right token too: a guesser
must learn nothing during the penalty, and a holder of the right token behind a guessing address waits
out the same ``Retry-After`` as the guesser. Successes neither spend nor refill a bucket.

Memory is bounded: at most ``max_keys`` keys are tracked; when a new key would pass that, keys whose
bucket has refilled (they lose nothing) are dropped, then the least recently failed ones until a tenth
of the room is free. Time comes from ``clock`` (monotonic seconds), so tests can move it.

    throttle = FailureThrottle(burst=10, per_minute=6, max_keys=10_000)
    credentials = await load_what_the_check_needs()    # any awaiting comes first
    wait = throttle.held(source_key(address))          # > 0: refuse (429, Retry-After: retry_after(wait))
    if not check(token, credentials):                  # no await from held() to failed(): concurrent wrong
        throttle.failed(source_key(address))           # attempts cannot all pass an unheld key

A right credential costs nothing, so a legitimate client may send as many requests at once as it likes.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class FailureThrottle:
    """Failures per key: ``burst`` at once, then ``per_minute``; past that the key is held (see the module)."""

    def __init__(self, *, burst: int, per_minute: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or per_minute <= 0 or max_keys < 1:
            raise ValueError(f"need burst >= 1, per_minute > 0, max_keys >= 1; got {burst}, {per_minute}, {max_keys}")
        self.burst = float(burst)
        self.rate = per_minute / 60  # failures forgiven per second
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()  # callers may be threads as well as the event loop's tasks
        self._room: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (room left, when), LRU order

    def __len__(self) -> int:
        return len(self._room)

    def held(self, *keys: str) -> float:
        """Seconds until none of ``keys`` is held any more (0: an attempt may be checked now). Changes nothing."""
        now = self._clock()
        with self._lock:
            return max((self._wait(self._refilled(key, now)) for key in keys), default=0.0)

    def failed(self, *keys: str) -> float:
        """Count one failure against each of ``keys``; the seconds until none of them is held (0: not held)."""
        now = self._clock()
        with self._lock:
            waits = []
            for key in keys:
                room = self._refilled(key, now) - 1
                if key not in self._room and len(self._room) >= self.max_keys:
                    self._forget(now)
                self._room[key] = (room, now)
                self._room.move_to_end(key)
                waits.append(self._wait(room))
            return max(waits, default=0.0)

    def _refilled(self, key: str, now: float) -> float:
        room, when = self._room.get(key, (self.burst, now))
        return min(self.burst, room + max(0.0, now - when) * self.rate)

    def _wait(self, room: float) -> float:
        return 0.0 if room >= 1 else (1 - room) / self.rate

    def _forget(self, now: float) -> None:
        """Make room for a tenth of ``max_keys`` at least (so that this scan is rare): keys whose failures are all
        forgiven first, then the least recently failed."""
        for key in [key for key in self._room if self._refilled(key, now) >= self.burst]:
            del self._room[key]
        while len(self._room) > self.max_keys - max(1, self.max_keys // 10):
            self._room.popitem(last=False)


def retry_after(wait: float) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1) for a wait in seconds."""
    return str(max(1, math.ceil(wait)))


def source_key(address: str) -> str:
    """What a per-source limit counts per: an IPv4 address, or an IPv6 address's /64 (one subscriber's network:
    a client can take any address in it). Anything else (a Unix socket, a test client) as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
