"""A bounded mutational fuzzer against a real `personagate gateway` with a real echo worker: a few thousand mutated
SIP datagrams and TCP messages (tests/helpers/sip_fuzz.py), in batches; TCP also split into many segments, several
messages in one segment, sent one byte at a time, left half-open, reset, and held idle. After every batch the gateway
(the same process) answers OPTIONS over UDP and TCP, a call answered before the fuzzing began still has its audio
both ways, and its log has no traceback, AttributeError or assertion.

The run is seeded: the seed is printed; ``PERSONAGATE_SIP_FUZZ_SEED=<seed>`` runs the same mutations again, and
``PERSONAGATE_SIP_FUZZ_SCALE=<n>`` sends n times as many (for a longer run by hand);
``PERSONAGATE_SIP_FUZZ_DUMP=<file>`` writes every message sent and received there (JSON lines: time, how, message), to
find what preceded a line in the gateway's log. Inputs that crash the gateway through a bug already known
(``sip_fuzz.KNOWN_CRASHERS``, each with its own regression test) are held back; ``PERSONAGATE_SIP_FUZZ_HOLD_BACK=0``
sends them too (to check a fix)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import sip_fuzz
from tests.helpers.live_call import LiveCall
from tests.helpers.logs import assert_alive_and_clean, log_size
from tests.helpers.sip import TcpPeer, UdpPeer, next_message, private_rtp_ports, request, status_of
from tests.helpers.sip_corpus import REFUSED_SOURCE
from tests.helpers.stack import echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")

SEED = int(os.environ.get("PERSONAGATE_SIP_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
SCALE = max(1, int(os.environ.get("PERSONAGATE_SIP_FUZZ_SCALE", "1")))
HOLD_BACK = os.environ.get("PERSONAGATE_SIP_FUZZ_HOLD_BACK", "1") != "0"  # 0: send known crashers too
UDP_BATCHES, UDP_PER_BATCH = 16 * SCALE, 250  # 4000 datagrams
TCP_BATCHES, TCP_PER_BATCH = 8 * SCALE, 100  # 800 messages and more (coalesced), besides idle connections
IDLE_CONNECTIONS = 40  # held open, silent, through each TCP batch
PACE = 0.0015  # seconds between two datagrams: ~650 a second
# What every batch must leave: OPTIONS answered within this (retransmitted every 0.5 s over UDP, as a UA's timer A
# would), and the live call's RTP and echo without a gap longer than this.
ANSWER_WITHIN = 5.0
MAX_GAP_MS = 500.0


@pytest.fixture(scope="module")
def stack(tenants: Path) -> Iterator[dict]:
    """The echo stack with one slot (the live call takes it: every fuzzed INVITE that routes finds no agent free),
    trunks from 127.0.0.1 admitted as they are and any other source by digest (so fuzzed credentials from 127.0.0.2
    reach the gateway's own digest code), and INVITEs beyond 50 a second shed."""
    env = {"PERSONAGATE_GATEWAY_SIP_ALLOW": '["127.0.0.1/32"]',
           "PERSONAGATE_GATEWAY_SIP_AUTH_USERS": json.dumps({"trunk": "fuzz-secret"}),
           "PERSONAGATE_GATEWAY_SIP_MAX_INVITES_PER_SECOND": "50"} | private_rtp_ports()
    with echo_stack(tenants, env, slots=1) as (addresses, _, gateway_proc):
        yield addresses | {"proc": gateway_proc, "gateway": ("127.0.0.1", int(addresses["port"]))}


def _answered(transport: str, gateway: tuple[str, int]) -> float | None:
    """Seconds until an OPTIONS over ``transport`` is answered 200 (UDP: retransmitted every 0.5 s), or None."""
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            p = stack.enter_context(UdpPeer(gateway) if transport == "UDP" else TcpPeer(gateway, timeout=ANSWER_WITHIN))
        except OSError:
            return None
        message, call_id, _ = request(p.sock, f"{gateway[0]}:{gateway[1]}")
        while time.monotonic() - began < ANSWER_WITHIN:
            with contextlib.suppress(OSError):
                p.send(message)
            for answer in p.receive(0.5 if transport == "UDP" else ANSWER_WITHIN, tail=0.0, until=call_id):
                if call_id in answer and status_of(answer) == 200:
                    return time.monotonic() - began
            if p.closed:
                return None
    return None


class Tally:
    """What was sent and what came back."""

    def __init__(self) -> None:
        self.sent = Counter()
        self.statuses = Counter()
        self.not_responses: list[bytes] = []  # anything the gateway sent that is no SIP response
        dump = os.environ.get("PERSONAGATE_SIP_FUZZ_DUMP")
        self.dump = open(dump, "a") if dump else None  # noqa: SIM115 - closed by close()

    def record(self, mode: str, data: bytes) -> None:
        if self.dump is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time() % 1 * 1000:03.0f}Z"
            self.dump.write(json.dumps({"ts": stamp, "mode": mode, "message": data.decode("latin-1")}) + "\n")

    def close(self) -> None:
        if self.dump is not None:
            self.dump.close()

    def answer(self, message: str) -> None:
        """One message the gateway sent: it must be a SIP response."""
        self.record("answer", message.encode("latin-1"))
        status = status_of(message)
        if status is not None:
            self.statuses[status] += 1
        elif message.strip():
            self.not_responses.append(message[:200].encode("latin-1"))

    def stream(self, data: bytes) -> None:
        """What came back on a TCP connection: whole messages, then maybe the start of one cut off by our close."""
        while True:
            message, data = next_message(data)
            if message is None:
                break
            self.answer(message)
        if data.strip() and not data.startswith(b"SIP/2.0 "):
            self.not_responses.append(data[:200])


def _drain_udp(peers: list[UdpPeer], tally: Tally) -> None:
    for p in peers:
        p.sock.setblocking(False)
        while True:
            try:
                tally.answer(p.sock.recv(65_535).decode("latin-1"))
            except (BlockingIOError, ConnectionRefusedError):
                break
        p.sock.setblocking(True)


def _udp_batch(fuzzer: sip_fuzz.Fuzzer, peers: list[UdpPeer], target: str, tally: Tally) -> None:
    began = time.monotonic()
    for index in range(UDP_PER_BATCH):
        p = fuzzer.rng.choice(peers)
        data = fuzzer.message(p.local, "UDP", target, valid=0.05)
        if HOLD_BACK and (known := sip_fuzz.known_crasher(data, "UDP")) is not None:
            tally.sent[f"held_back_{known}"] += 1  # a bug already found (sip_fuzz.KNOWN_CRASHERS)
            continue
        tally.record("udp", data)
        try:
            p.send(data)
            tally.sent["udp"] += 1
        except OSError:  # past the largest datagram
            tally.sent["udp_too_large"] += 1
        if index % 25 == 0:
            _drain_udp(peers, tally)
        time.sleep(max(0.0, began + (index + 1) * PACE - time.monotonic()))
    time.sleep(0.3)
    _drain_udp(peers, tally)


CONNECT_PACE = 0.002  # between two new connections: a burst faster than pjsua accepts overflows its backlog of 5
# (test_a_burst_of_tcp_connections_is_accepted_at_once, below), and each connection past it waits a second for the
# SYN to be sent again; that is measured there, not in every batch


def _connect(gateway: tuple[str, int], host: str = "127.0.0.1") -> socket.socket | None:
    time.sleep(CONNECT_PACE)
    try:
        sock = socket.create_connection(gateway, timeout=2.0, source_address=(host, 0))
    except OSError:
        return None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _slowly(sock: socket.socket, data: bytes, seconds: float, stop: threading.Event) -> None:
    """One byte (or a few) at a time over ``seconds``: a slow client, or a slowloris."""
    step = max(1, len(data) // 200)
    with contextlib.suppress(OSError):
        for i in range(0, len(data), step):
            if stop.is_set():
                return
            sock.sendall(data[i:i + step])
            time.sleep(seconds * step / len(data))


def _tcp_batch(fuzzer: sip_fuzz.Fuzzer, gateway: tuple[str, int], target: str, tally: Tally) -> None:
    rng = fuzzer.rng
    idle = [s for s in (_connect(gateway) for _ in range(IDLE_CONNECTIONS)) if s is not None]
    tally.sent["tcp_idle_connections"] += len(idle)
    open_conns: list[socket.socket] = []
    slow: list[threading.Thread] = []
    stop = threading.Event()
    pipelined = _connect(gateway)
    for _ in range(TCP_PER_BATCH):
        host = REFUSED_SOURCE if rng.random() < 0.2 else "127.0.0.1"
        mode = rng.choices(["single", "split", "coalesced", "pipelined", "half_open", "slow"],
                           weights=[35, 15, 15, 15, 12, 8])[0]
        sock = pipelined if mode == "pipelined" else _connect(gateway, host)
        if sock is None:
            tally.sent["tcp_connect_failed"] += 1
            continue
        local = sock.getsockname()[:2]
        data = fuzzer.message(local, "TCP", target, valid=0.1)
        tally.sent[f"tcp_{mode}"] += 1
        tally.record(f"tcp_{mode}", data)
        try:
            if mode in ("single", "pipelined"):
                sock.sendall(data)
            elif mode == "split":  # many segments, a few ms apart
                cuts = sorted(rng.sample(range(1, max(2, len(data))), min(len(data) - 1, rng.randint(1, 12))))
                for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                    sock.sendall(data[a:b])
                    time.sleep(rng.choice((0, 0.001, 0.003)))
            elif mode == "coalesced":  # several messages in one segment, mutated and valid
                more = [fuzzer.message(local, "TCP", target, valid=0.5) for _ in range(rng.randint(1, 4))]
                for message in more:
                    tally.record("tcp_coalesced", message)
                sock.sendall(b"".join([data, *more]))
                tally.sent["tcp_coalesced_messages"] += 1 + len(more)
            elif mode == "half_open":  # part of a message, then FIN, RST or nothing more until the batch ends
                sock.sendall(data[:rng.randrange(1, max(2, len(data)))])
                how = rng.choice(("fin", "rst", "hold"))
                if how == "fin":
                    sock.shutdown(socket.SHUT_WR)
                elif how == "rst":
                    _reset(sock)
                    continue
            elif mode == "slow":
                thread = threading.Thread(target=_slowly, args=(sock, data, rng.uniform(1.0, 3.0), stop), daemon=True)
                thread.start()
                slow.append(thread)
        except OSError:
            tally.sent["tcp_send_failed"] += 1
        if sock is not pipelined:
            open_conns.append(sock)
    time.sleep(0.3)
    stop.set()
    for thread in slow:
        thread.join(5)
    for sock in [*open_conns, *([pipelined] if pipelined else []), *idle]:
        sock.setblocking(False)
        received = b""
        with contextlib.suppress(OSError):
            while data := sock.recv(65_536):
                received += data
        tally.stream(received)
        (_reset if rng.random() < 0.3 else socket.socket.close)(sock)


def test_mutated_sip_never_takes_the_gateway_down_and_the_live_call_keeps_its_audio(stack: dict) -> None:
    """Thousands of mutated SIP messages over UDP and TCP, in batches: after each, the gateway answers OPTIONS over
    both, a call in progress still hears its echo without a gap, and its log has nothing only a bug prints."""
    print(f"\nSIP fuzz seed {SEED} (replay: PERSONAGATE_SIP_FUZZ_SEED={SEED})")
    fuzzer = sip_fuzz.Fuzzer(SEED)
    gateway, target = stack["gateway"], stack["sip"]
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the worker's slot is free")
    tally = Tally()
    began = time.monotonic()
    peers = [UdpPeer(gateway) for _ in range(4)] + [UdpPeer(gateway, REFUSED_SOURCE) for _ in range(2)]
    batches = ["udp"] * UDP_BATCHES + ["tcp"] * TCP_BATCHES
    random.Random(SEED).shuffle(batches)
    try:
        with LiveCall(gateway, seconds=600) as call:
            until(lambda: readyz(stack["http"])["slots_free"] == 0, "the live call holds the only slot")
            time.sleep(1.0)  # the echo comes back
            window = call.window(call.mark() - 700_000_000)
            assert window.flowing(MAX_GAP_MS, MAX_GAP_MS), f"the live call had no audio before fuzzing: {window}"
            for number, kind in enumerate(batches, 1):
                mark, logged = call.mark(), log_size(stack["proc"])
                if kind == "udp":
                    _udp_batch(fuzzer, peers, target, tally)
                else:
                    _tcp_batch(fuzzer, gateway, target, tally)
                what = f"seed {SEED}, batch {number} ({kind})"
                assert_alive_and_clean(stack["proc"], what, since=logged)
                udp_after, tcp_after = _answered("UDP", gateway), _answered("TCP", gateway)
                window = call.window(mark)
                print(f"batch {number:2d} {kind}: {time.monotonic() - began:5.1f} s; OPTIONS answered after "
                      f"{udp_after and udp_after * 1000:.0f} ms (UDP), {tcp_after and tcp_after * 1000:.0f} ms (TCP); "
                      f"live call: {window.packets} packets in {window.seconds:.1f} s, longest interval "
                      f"{window.longest_interval_ms:.0f} ms, longest without echo {window.longest_quiet_ms:.0f} ms")
                assert udp_after is not None, f"{what}: OPTIONS over UDP not answered within {ANSWER_WITHIN} s"
                assert tcp_after is not None, f"{what}: OPTIONS over TCP not answered within {ANSWER_WITHIN} s"
                assert window.flowing(MAX_GAP_MS, MAX_GAP_MS), f"{what}: the live call's audio stopped: {window}"
    finally:
        tally.close()
        for p in peers:
            p.close()
    elapsed = time.monotonic() - began
    print(f"sent {dict(tally.sent)} in {elapsed:.0f} s")
    print(f"mutations applied {dict(sorted(fuzzer.applied.items()))}")
    print(f"answers by status {dict(sorted(tally.statuses.items()))}")
    assert not tally.not_responses, f"seed {SEED}: the gateway sent what is no SIP response: {tally.not_responses[:5]}"
    # a 5xx is the gateway's own failure, except 500 (pjsip: a request it cannot take now), 501, 503 (no agent
    # free, or shed), 505 and 513, which the guard and the flood shedding answer on purpose
    server_errors = {code: n for code, n in tally.statuses.items() if code >= 500 and code not in (500, 501, 503, 505, 513)}
    assert not server_errors, f"seed {SEED}: {server_errors}"
    assert tally.sent["udp"] >= UDP_BATCHES * UDP_PER_BATCH * 0.9
    until(lambda: readyz(stack["http"])["calls"] == 0, "the gateway has no call")
    assert_alive_and_clean(stack["proc"], f"seed {SEED}, after fuzzing")
    metrics = scrape_metrics(stack["http"])
    print("\n".join(f"{name} {value:.0f}" for name, value in sorted(metrics.items())
                    if "sip_responses_total" in name or "requests_dropped" in name or "sip_auth" in name))


def test_a_burst_of_tcp_connections_is_accepted_at_once(stack: dict) -> None:
    """40 TCP connections opened at once (trunks reconnecting after a network blip, an SBC's pool): each connected
    within 500 ms, and each can send OPTIONS and get its 200."""
    gateway = stack["gateway"]
    socks: list[socket.socket] = []
    slowest = 0.0
    try:
        for _ in range(40):
            began = time.monotonic()
            socks.append(socket.create_connection(gateway, timeout=10))
            slowest = max(slowest, time.monotonic() - began)
        for sock in socks[::8]:
            message, call_id, _ = request(sock, f"{gateway[0]}:{gateway[1]}")
            sock.sendall(message)
            sock.settimeout(5)
            assert b"SIP/2.0 200 OK" in sock.recv(65_536), call_id
    finally:
        for sock in socks:
            sock.close()
    print(f"slowest of 40 connections: {slowest * 1000:.0f} ms")
    assert slowest < 0.5, f"a connection took {slowest:.1f} s"
