"""Failed-attempt throttling: a leaky bucket of failures per key, in bounded memory.

Each key (a client's address, a token's first characters, ...) may fail ``burst`` times at once and then
``per_minute`` times a minute; past that it is *held* until its bucket has room for one more failure.
While held, every attempt by that key is refused without being checked — the right token too: a guesser
must learn nothing during the penalty, and a holder of the right token behind a guessing address waits
out the same ``Retry-After`` as the guesser. Successes neither spend nor refill a bucket.

Memory is bounded (``gateway/ratelimit.py``): at most ``max_keys`` keys are tracked; when a new key would pass
that, keys whose failures are all forgiven (they lose nothing) are dropped, then the least recently failed ones
until a tenth of the room is free. Time comes from ``clock`` (monotonic seconds), so tests can move it.

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
from collections.abc import Callable

from ..ratelimit import KeyedBuckets


class FailureThrottle:
    """Failures per key: ``burst`` at once, then ``per_minute``; past that the key is held (see the module)."""

    def __init__(self, *, burst: int, per_minute: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or per_minute <= 0 or max_keys < 1:
            raise ValueError(f"need burst >= 1, per_minute > 0, max_keys >= 1; got {burst}, {per_minute}, {max_keys}")
        # A bucket's level is the room left for failures; each failure takes one, and forgiving refills it.
        self._room = KeyedBuckets(capacity=burst, per_second=per_minute / 60, max_keys=max_keys)
        self._clock = clock
        self._lock = threading.Lock()  # callers may be threads as well as the event loop's tasks

    def __len__(self) -> int:
        """How many keys are tracked now (at most ``max_keys``)."""
        return len(self._room)

    def held(self, *keys: str) -> float:
        """Seconds until none of ``keys`` is held any more (0: an attempt may be checked now). Changes nothing."""
        now = self._clock()
        with self._lock:
            return max((self._room.wait(self._room.level(key, now)) for key in keys), default=0.0)

    def failed(self, *keys: str) -> float:
        """Count one failure against each of ``keys``; the seconds until none of them is held (0: not held)."""
        now = self._clock()
        with self._lock:
            waits = []
            for key in keys:
                # No floor at 0: failures while held overdraw the room, so a guesser who keeps going is held
                # for every failure it adds, not just until the first one is forgiven.
                room = self._room.level(key, now) - 1
                self._room.store(key, room, now)
                waits.append(self._room.wait(room))
            return max(waits, default=0.0)


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
