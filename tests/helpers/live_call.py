"""A call kept up through a test that does something else to the gateway meanwhile, and checked as it goes: does its
audio still flow both ways? It is ``personagate bench sip``'s measuring caller (``personagate_bench.sip``: a minimal SIP
UA over UDP with raw PCMU RTP, no jitter buffer, kernel receive timestamps) on a thread of its own, playing a steady
tone that the echo worker sends back.

    with LiveCall(("127.0.0.1", sip_port)) as call:
        mark = call.mark()
        ...                                  # fuzz, flood
        window = call.window(mark)           # RTP and echo since the mark
        assert window.flowing(), window
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from typing import Self

import numpy as np

from personagate_bench.sip import (
    MULAW_DECODE,
    PACKET_SECONDS,
    SO_TIMESTAMPNS,
    MediaLeg,
    ProbeCall,
    RtpClock,
    SipProbe,
    mulaw_encode,
)
from tests.helpers.sip import OPEN_NUMBER
from tests.helpers.wait import scaled

LOUD = 0.02 * 32768  # a 20 ms packet whose RMS is above this carries the echo of the tone


@dataclass
class Window:
    """What the caller received between two moments."""

    seconds: float
    packets: int
    longest_interval_ms: float  # between two RTP packets, as the kernel received them
    longest_quiet_ms: float  # the longest run of packets without the tone's echo
    lost: int  # sequence numbers missing
    hung_up: bool  # the gateway sent BYE

    def flowing(self, max_interval_ms: float = 500.0, max_quiet_ms: float = 500.0) -> bool:
        expected = self.seconds / PACKET_SECONDS
        return (not self.hung_up and self.packets >= 0.8 * expected and self.longest_interval_ms <= max_interval_ms
                and self.longest_quiet_ms <= max_quiet_ms)


class LiveCall:
    """A call to ``number`` at the gateway ``sip`` (host, port) that lasts at most ``seconds``."""

    def __init__(self, sip: tuple[str, int], number: str = OPEN_NUMBER, seconds: float = 300.0) -> None:
        self.sip = sip
        self.number = number
        rate = 8000
        t = np.arange(int(seconds * rate)) / rate
        self._payload = mulaw_encode((0.3 * 32767 * np.sin(2 * np.pi * 600 * t)).astype(np.int16))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-call", daemon=True)
        self._clock = RtpClock()
        self.call: ProbeCall | None = None
        self.leg: MediaLeg | None = None
        self.answered_at = 0.0
        self._transport: asyncio.BaseTransport | None = None

    def __enter__(self) -> Self:
        self._thread.start()
        self._clock.start()
        try:
            self._run(self._dial(), 20)
        except BaseException:
            self.__exit__()
            raise
        self.answered_at = time.monotonic()
        return self

    def _run(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, probe = await loop.create_datagram_endpoint(SipProbe, local_addr=("127.0.0.1", 0))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setblocking(False)
        self.leg = MediaLeg(sock, self._payload)
        self.call = ProbeCall(probe, self.sip, self.number, self.leg)
        probe.calls[self.call.call_id] = self.call
        await self.call.invite(timeout=scaled(15.0))
        self._clock.add(self.leg)

    def mark(self) -> int:
        """Now, for ``window``: a kernel-clock (CLOCK_REALTIME) time in ns."""
        return time.time_ns()

    def window(self, since_ns: int, until_ns: int | None = None) -> Window:
        assert self.leg is not None and self.call is not None
        until_ns = until_ns or time.time_ns()
        received = [r for r in list(self.leg.received) if since_ns <= r[0] <= until_ns]
        stamps = np.array([ns for ns, _, _ in received], dtype=np.int64)
        edges = np.concatenate([[since_ns], stamps, [until_ns]])
        longest_interval = float(np.diff(edges).max()) / 1e6
        quiet = longest = 0
        for _, _, payload in sorted(received, key=lambda r: r[0]):
            pcm = MULAW_DECODE[np.frombuffer(payload, dtype=np.uint8)].astype(np.float64)
            quiet = 0 if np.sqrt((pcm ** 2).mean()) > LOUD else quiet + 1
            longest = max(longest, quiet)
        seqs = np.unique([seq for _, seq, _ in received])
        lost = int(seqs.max() - seqs.min() + 1 - len(seqs)) if len(seqs) and seqs.max() - seqs.min() < 30000 else 0
        return Window(seconds=(until_ns - since_ns) / 1e9, packets=len(received), longest_interval_ms=longest_interval,
                      longest_quiet_ms=longest * PACKET_SECONDS * 1000, lost=lost,
                      hung_up=self.call.hung_up_by_gateway)

    def __exit__(self, *_: object) -> None:
        try:
            if self.call is not None and self.call.answered.done() and self._loop.is_running():
                with contextlib.suppress(Exception):  # a hang-up that fails at the end is of no interest
                    self._run(asyncio.wait_for(self.call.bye(), 5), 6)
        finally:
            if self._transport is not None:
                self._loop.call_soon_threadsafe(self._transport.close)
            self._clock.stopping.set()
            self._clock.join(2)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(2)
            if self.leg is not None:
                self.leg.sock.close()

