"""``personagate bench sip``: concurrent calls through one gateway process and an echo worker, measured on
the wire (a benchmark, not a test: the figures depend on the machine).

    personagate bench sip [--calls 1,2,4] [--seconds 20] [--gateway-cpu 0] [--json]

It starts an echo worker and a gateway on free loopback ports with the shipped ``tenants/``, then places each
round's calls from a measuring caller made for this: ``SipProbe``, a minimal SIP user agent (INVITE, ACK, BYE
over UDP) with raw PCMU RTP and no jitter buffer of its own, so what it sees is what the gateway sends. The
same caller keeps a call up through tests (``tests/helpers/live_call.py``).

Contract: one row per round: packet interval p50/p99/max and loss, round trip, the gateway's own latency
and its CPU share. What each figure means and how it is timed: docs/benchmarks.md#sip-personagate-bench-sip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from personagate_common.plane import new_secret

PACKET_SAMPLES = 160  # 20 ms at 8 kHz
PACKET_SECONDS = 0.02
ECHO_DELAY_SECONDS = 0.08  # the echo model returns each frame one 80 ms step later
FRAME_GATHERING_SECONDS = 0.06  # what gathering 80 ms frames costs by itself, timed as above
BURST_EVERY_SECONDS = 1.0
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; the constant is not in every Python build
INVITES_PER_SECOND = 20  # calls are placed this fast, the way calls arrive at a gateway, not all at once
BENCH_NUMBER = "+14155550186"  # harbor-mutual's claims line in the shipped tenants (open around the clock)


# ---------------------------------------------------------------------- G.711 mu-law

def _mulaw_decode_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign, exponent, mantissa = codes & 0x80, (codes >> 4) & 0x07, codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


MULAW_DECODE = _mulaw_decode_table()


def mulaw_encode(pcm: np.ndarray) -> bytes:
    """16-bit linear → G.711 mu-law (the standard's segment encoding, with its 0x84 bias)."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


# ---------------------------------------------------------------------- the caller's audio

def caller_audio(seconds: float, seed: int) -> tuple[np.ndarray, list[int]]:
    """Quiet line noise with a 4 ms 1.5 kHz burst every second (at a random offset in its packet); the
    signal and the index of each burst's first sample."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 8000)
    pcm = rng.normal(0, 30, n)  # about −60 dBFS: a line is never digital silence
    t = np.arange(32) / 8000
    burst = 0.6 * 32767 * np.sin(2 * np.pi * 1500 * t) * np.hanning(32)
    starts = []
    for second in np.arange(1.5, seconds - 1.0, BURST_EVERY_SECONDS):
        start = int(second * 8000) + int(rng.integers(0, PACKET_SAMPLES))
        pcm[start:start + 32] += burst
        starts.append(start)
    return np.clip(pcm, -32768, 32767).astype(np.int16), starts


def onsets(pcm: np.ndarray, threshold: float = 0.12 * 32768, quiet_samples: int = 1600) -> list[int]:
    """Sample indexes where the signal first exceeds ``threshold`` after ``quiet_samples`` below it."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > threshold)
    found: list[int] = []
    for index in loud:
        if not found or index - found[-1] > quiet_samples:
            found.append(int(index))
    return found


# ---------------------------------------------------------------------- RTP, on its own thread

@dataclass
class MediaLeg:
    """One call's RTP: what it sends (and when) and what it receives (kernel timestamps)."""

    sock: socket.socket
    payload: bytes  # mu-law, the whole call
    remote: tuple[str, int] | None = None
    ssrc: int = field(default_factory=lambda: random.getrandbits(32))
    sent_ns: list[int] = field(default_factory=list)  # per packet sent, CLOCK_REALTIME
    received: list[tuple[int, int, bytes]] = field(default_factory=list)  # (kernel ns, seq, payload)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def send_next(self) -> None:
        index = len(self.sent_ns)
        chunk = self.payload[index * PACKET_SAMPLES:(index + 1) * PACKET_SAMPLES]
        if self.remote is None or len(chunk) < PACKET_SAMPLES:
            return
        header = struct.pack("!BBHII", 0x80, 0, index & 0xFFFF, (index * PACKET_SAMPLES) & 0xFFFFFFFF, self.ssrc)
        self.sock.sendto(header + chunk, self.remote)
        self.sent_ns.append(time.time_ns())

    def drain(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(2048, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return
            if len(data) < 12 or data[1] & 0x7F != 0:  # PCMU only (DTMF events and the like are not audio)
                continue
            stamp = next((struct.unpack("qq", cdata[:16]) for level, kind, cdata in ancillary
                          if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS), None)
            ns = stamp[0] * 1_000_000_000 + stamp[1] if stamp else time.time_ns()
            self.received.append((ns, struct.unpack("!H", data[2:4])[0], data[12:]))


class RtpClock(threading.Thread):
    """Sends every live leg's next packet each 20 ms (absolute schedule) and drains what comes back."""

    def __init__(self) -> None:
        super().__init__(name="bench-rtp", daemon=True)
        self.selector = selectors.DefaultSelector()
        self.legs: list[MediaLeg] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def add(self, leg: MediaLeg) -> None:
        with self.lock:
            self.legs.append(leg)
            self.selector.register(leg.sock, selectors.EVENT_READ, leg)

    def run(self) -> None:
        tick = time.monotonic()
        while not self.stopping.is_set():
            for key, _ in self.selector.select(max(0.0, tick - time.monotonic())):
                key.data.drain()
            if time.monotonic() >= tick:
                with self.lock:
                    for leg in self.legs:
                        leg.send_next()
                tick += PACKET_SECONDS


# ---------------------------------------------------------------------- SIP, on the event loop

_HEADER = re.compile(r"^([A-Za-z-]+)\s*:\s*(.*)$")
_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
            "c": "content-type"}


@dataclass
class SipMessage:
    first_line: str
    headers: list[tuple[str, str]]
    body: str

    @classmethod
    def parse(cls, data: bytes) -> SipMessage:
        head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
        lines = head.split("\r\n")
        headers = []
        for line in lines[1:]:
            match = _HEADER.match(line)
            if match:
                name = match.group(1).lower()
                headers.append((_COMPACT.get(name, name), match.group(2).strip()))
        return cls(lines[0], headers, body)

    def get(self, name: str) -> str:
        return next((value for key, value in self.headers if key == name), "")

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def status(self) -> int | None:
        return int(self.first_line.split()[1]) if self.first_line.startswith("SIP/2.0") else None


class ProbeCall:
    """One measuring call: its SIP dialog (as the caller) and its media leg."""

    def __init__(self, agent: SipProbe, target: tuple[str, int], number: str, leg: MediaLeg) -> None:
        self.agent = agent
        self.target = target
        self.number = number
        self.leg = leg
        self.call_id = f"{uuid.uuid4().hex}@bench"
        self.tag = uuid.uuid4().hex[:10]
        self.remote_to = ""
        self.remote_target = f"sip:{number}@{target[0]}:{target[1]}"
        self.cseq = 1
        self.answered = asyncio.get_running_loop().create_future()
        self.bye_answered = asyncio.get_running_loop().create_future()
        self.hung_up_by_gateway = False

    def sdp(self) -> str:
        return ("v=0\r\no=bench 1 1 IN IP4 127.0.0.1\r\ns=bench\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                f"m=audio {self.leg.port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendrecv\r\n")

    def request(self, method: str, uri: str, cseq: int, body: str = "", to_tag: bool = True) -> bytes:
        host, port = self.agent.local
        to = self.remote_to if to_tag and self.remote_to else f"<sip:{self.number}@{self.target[0]}>"
        lines = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport",
                 "Max-Forwards: 70", f"From: <sip:bench@{host}>;tag={self.tag}", f"To: {to}",
                 f"Call-ID: {self.call_id}", f"CSeq: {cseq} {method.split()[0]}", f"Contact: <sip:bench@{host}:{port}>"]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

    async def invite(self, timeout: float) -> None:
        message = self.request("INVITE", f"sip:{self.number}@{self.target[0]}:{self.target[1]}", 1, self.sdp(), False)
        deadline = time.monotonic() + timeout
        wait = 0.5
        while not self.answered.done():
            self.agent.send(message, self.target)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.answered), min(wait, max(0.01, deadline - time.monotonic())))
            if time.monotonic() > deadline and not self.answered.done():
                raise TimeoutError(f"no final answer to the INVITE in {timeout} s")
            wait = 4.0  # once anything came back (a provisional), the gateway has the INVITE
        status = self.answered.result()
        if status != 200:
            raise RuntimeError(f"the gateway answered {status}")

    def on_response(self, message: SipMessage) -> None:
        status = message.status
        method = message.get("cseq").split()[-1]
        if method == "INVITE" and status is not None and status >= 200:
            if status < 300:
                self.remote_to = message.get("to")
                contact = re.search(r"<([^>]+)>", message.get("contact"))
                if contact:
                    self.remote_target = contact.group(1)
                media = re.search(r"^m=audio (\d+)", message.body, re.MULTILINE)
                address = re.search(r"^c=IN IP4 (\S+)", message.body, re.MULTILINE)
                if media and address and self.leg.remote is None:
                    self.leg.remote = (address.group(1), int(media.group(1)))
                self.agent.send(self.request("ACK", self.remote_target, 1), self.target)  # for each 200 resent
            if not self.answered.done():
                self.answered.set_result(status)
        elif method == "BYE" and status is not None and status >= 200 and not self.bye_answered.done():
            self.bye_answered.set_result(status)

    def on_request(self, message: SipMessage, source: tuple[str, int]) -> None:
        method = message.first_line.split()[0]
        body = self.sdp() if method == "INVITE" else ""
        if method == "BYE":
            self.hung_up_by_gateway = True
        if method != "ACK":
            self.agent.send(self.agent.response(message, 200, "OK", body), source)

    async def bye(self) -> None:
        if self.hung_up_by_gateway:
            return
        self.cseq += 1
        message = self.request("BYE", self.remote_target, self.cseq)
        for _ in range(4):
            self.agent.send(message, self.target)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.bye_answered), 0.5)
                return


class SipProbe(asyncio.DatagramProtocol):
    """The measuring caller's SIP socket: requests out, responses routed to calls by Call-ID."""

    def __init__(self) -> None:
        self.calls: dict[str, ProbeCall] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.local: tuple[str, int] = ("127.0.0.1", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's transport
        self.local = transport.get_extra_info("sockname")[:2]

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, address)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.strip():
            return  # a keep-alive
        message = SipMessage.parse(data)
        call = self.calls.get(message.get("call-id"))
        if call is None:
            return
        if message.status is not None:
            call.on_response(message)
        else:
            call.on_request(message, addr)

    @staticmethod
    def response(request: SipMessage, status: int, reason: str, body: str = "") -> bytes:
        lines = [f"SIP/2.0 {status} {reason}", *(f"Via: {via}" for via in request.all("via")),
                 f"From: {request.get('from')}", f"To: {request.get('to')}", f"Call-ID: {request.get('call-id')}",
                 f"CSeq: {request.get('cseq')}"]
        if body:
            lines += ["Contact: <sip:bench@127.0.0.1>", "Content-Type: application/sdp"]
        lines.append(f"Content-Length: {len(body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


# ---------------------------------------------------------------------- one round of N calls

@dataclass
class CallFigures:
    answered: bool
    intervals_ms: np.ndarray
    lost: int
    expected: int
    round_trips_ms: list[float]
    sip_call_id: str
    error: str | None = None


def measure_leg(leg: MediaLeg, burst_starts: list[int], settle_seconds: float = 1.0) -> tuple[np.ndarray, int,
                                                                                                 int, list[float]]:
    """Packet intervals (after the first ``settle_seconds``), packets lost, packets expected, round trips."""
    if len(leg.received) < 2 or not leg.sent_ns:
        return np.zeros(0), 0, 0, []
    stamps = np.array([ns for ns, _, _ in leg.received], dtype=np.int64)
    seqs = np.array([seq for _, seq, _ in leg.received], dtype=np.int64)
    unwrapped = seqs + 65536 * np.cumsum(np.concatenate([[0], np.diff(seqs) < -30000]))
    settled = stamps >= stamps[0] + int(settle_seconds * 1e9)
    intervals = np.diff(stamps)[settled[1:]] / 1e6
    kept = unwrapped[settled]
    expected = int(kept.max() - kept.min() + 1) if len(kept) else 0
    lost = expected - len(np.unique(kept))

    # The received audio in sequence order, each sample timed by its packet's kernel timestamp.
    order = np.argsort(unwrapped, kind="stable")
    audio = np.concatenate([MULAW_DECODE[np.frombuffer(leg.received[i][2], dtype=np.uint8)] for i in order])
    sizes = np.array([len(leg.received[i][2]) for i in order])
    packet_of_sample = np.repeat(np.arange(len(order)), sizes)
    first_sample = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sent = np.array(leg.sent_ns, dtype=np.int64)

    sent_onsets = []
    payload = MULAW_DECODE[np.frombuffer(leg.payload[:len(sent) * PACKET_SAMPLES], dtype=np.uint8)]
    for start in burst_starts:
        found = onsets(payload[max(0, start - 8):start + 40], quiet_samples=0)
        if found and start // PACKET_SAMPLES < len(sent):
            index = max(0, start - 8) + found[0]
            sent_onsets.append(sent[index // PACKET_SAMPLES] + (index % PACKET_SAMPLES) * 125_000)
    round_trips = []
    for index in onsets(audio):
        packet = packet_of_sample[index]
        at = stamps[order[packet]] + (index - first_sample[packet]) * 125_000
        before = [s for s in sent_onsets if 0 < at - s < 0.8e9]
        if before:
            round_trips.append((at - before[-1]) / 1e6)
    return intervals, lost, expected, round_trips


async def run_round(target: tuple[str, int], calls: int, seconds: float, number: str) -> list[CallFigures]:
    loop = asyncio.get_running_loop()
    transport, probe = await loop.create_datagram_endpoint(SipProbe, local_addr=("127.0.0.1", 0))
    clock = RtpClock()
    clock.start()
    probes: list[tuple[ProbeCall, list[int]]] = []
    try:
        for i in range(calls):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            # a second of the gateway's packets: a moment the measuring caller's Python is busy elsewhere (setting up
            # the next calls) is not counted against the gateway as loss
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            sock.setblocking(False)
            pcm, bursts = caller_audio(seconds + 2.0, seed=i)
            leg = MediaLeg(sock, mulaw_encode(pcm))
            call = ProbeCall(probe, target, number, leg)
            probe.calls[call.call_id] = call
            probes.append((call, bursts))
        async def placed(index: int, call: ProbeCall) -> None:
            await asyncio.sleep(index / INVITES_PER_SECOND)
            await call.invite(timeout=30.0)

        results = await asyncio.gather(*(placed(i, c) for i, (c, _) in enumerate(probes)), return_exceptions=True)
        for (call, _), result in zip(probes, results, strict=True):
            if not isinstance(result, BaseException):
                clock.add(call.leg)
        await asyncio.sleep(seconds)
        await asyncio.gather(*(c.bye() for c, _ in probes if c.answered.done() and c.answered.result() == 200))
    finally:
        clock.stopping.set()
        clock.join(2.0)
        transport.close()
    figures = []
    for (call, bursts), result in zip(probes, results, strict=True):
        intervals, lost, expected, trips = measure_leg(call.leg, bursts)
        figures.append(CallFigures(not isinstance(result, BaseException), intervals, lost, expected, trips,
                                   call.call_id, None if not isinstance(result, BaseException) else str(result)))
        call.leg.sock.close()
    return figures


# ---------------------------------------------------------------------- the stack, and the report

def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_tenants(folder: Path) -> Path:
    """The shipped harbor-mutual tenant with its concurrent-call limit lifted (the bench measures the gateway,
    not the tenant's limit)."""
    shipped = Path(__file__).resolve().parents[1] / "tenants" / "harbor-mutual"
    shutil.copytree(shipped, folder / "harbor-mutual")
    tenant = folder / "harbor-mutual" / "tenant.yaml"
    text, replaced = re.subn(r"max_concurrent_calls: *\d+", "max_concurrent_calls: 10000", tenant.read_text())
    if not replaced:
        raise RuntimeError(f"{tenant}: no limits.max_concurrent_calls to lift")
    tenant.write_text(text)
    return folder


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def echo_stack(slots: int, max_calls: int, log_path: Path, gateway_cpu: int | None = None):
    """An echo worker and a gateway (real processes, loopback); yields the gateway's SIP address. With
    ``gateway_cpu``, the gateway runs on that CPU alone and the worker and this process on the others: what one
    core carries."""
    secret = new_secret()  # the pair's own shared secret (personagate_common/plane.py), through their environment only
    env = os.environ | {"NO_TORCH_COMPILE": "1", "PERSONAGATE_GATEWAY_SIP_MAX_CALLS": str(max_calls),
                        "PERSONAGATE_GATEWAY_SIP_MAX_INVITES_PER_SECOND": str(10 * INVITES_PER_SECOND),
                        "PERSONAGATE_WORKER_SESSION_SECRET": secret, "PERSONAGATE_GATEWAY_WORKER_SECRET": secret}
    for name in ("PERSONAGATE_WORKER_SESSION_SECRET_FILE", "PERSONAGATE_GATEWAY_WORKER_SECRET_FILE"):
        env.pop(name, None)
    worker_port, http_port, sip_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_STREAM), \
        _free_port(socket.SOCK_DGRAM)
    tenants = bench_tenants(log_path.parent / "tenants")
    cli = [sys.executable, "-m", "personagate"]
    log = log_path.open("w")
    others = None
    if gateway_cpu is not None:
        others = os.sched_getaffinity(0) - {gateway_cpu}
        if gateway_cpu not in os.sched_getaffinity(0) or not others:
            raise ValueError(f"--gateway-cpu {gateway_cpu}: needs that CPU and at least one other for the rest")
        os.sched_setaffinity(0, others)  # the measuring caller (and, inherited, the worker) stay off its CPU
    worker = subprocess.Popen([*cli, "worker", "--model", "echo", "--port", str(worker_port), "--slots", str(slots)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pin = [] if gateway_cpu is None else ["taskset", "-c", str(gateway_cpu)]  # util-linux: every thread it starts
    gateway = subprocess.Popen([*pin, *cli, "gateway", "--port", str(http_port), "--tenants", str(tenants), "--worker",
                                f"http://127.0.0.1:{worker_port}", "--sip-port", str(sip_port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                ready = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=2).json()
                if ready.get("slots_free", 0) >= slots:
                    break
            if time.monotonic() > deadline or worker.poll() is not None or gateway.poll() is not None:
                raise RuntimeError(f"the echo stack did not start; the gateway's log: {log_path}")
            time.sleep(0.2)
        yield ("127.0.0.1", sip_port), gateway.pid
    finally:
        for process in (gateway, worker):
            process.terminate()
        for process in (gateway, worker):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


@dataclass
class GatewayRecord:
    """What the gateway's call records say of one call."""

    step_p50_ms: float | None = None  # the worker's step round trip (calls.py's "call ended")
    underruns: int = 0  # outbound packets the pacer had to fill in (inbound.py's "SIP call ended")
    shed: int = 0
    jitter_buffer_ms: float | None = None  # pjmedia's mean delay in the caller's stream's jitter buffer


def gateway_records(log_path: Path) -> dict[str, GatewayRecord]:
    """Each call's figures from the gateway's JSON log, by SIP Call-ID."""
    records: dict[str, GatewayRecord] = {}
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("msg") == "call ended" and entry.get("agent_step_round_trip"):
                records.setdefault(entry["call"], GatewayRecord()).step_p50_ms = \
                    entry["agent_step_round_trip"]["p50_ms"]
            elif entry.get("msg") == "SIP call ended":
                record = records.setdefault(entry["sip_call_id"], GatewayRecord())
                record.underruns = int(entry.get("outbound_underruns") or 0)
                record.shed = int(entry.get("outbound_shed") or 0)
                record.jitter_buffer_ms = (entry.get("jitter_buffer_ms") or {}).get("mean")
    return records


def _percentiles(values: np.ndarray | list[float], *qs: float) -> list[float | None]:
    if len(values) == 0:
        return [None for _ in qs]
    return [round(float(v), 2) for v in np.percentile(np.asarray(values, dtype=float), qs)]


def summarise(calls: int, figures: list[CallFigures], records: dict[str, GatewayRecord]) -> dict[str, object]:
    answered = [f for f in figures if f.answered]
    steps = {call: r.step_p50_ms for call, r in records.items() if r.step_p50_ms is not None}
    intervals = np.concatenate([f.intervals_ms for f in answered]) if answered else np.zeros(0)
    trips = [t for f in answered for t in f.round_trips_ms]
    added = [t - steps[f.sip_call_id] - ECHO_DELAY_SECONDS * 1000 for f in answered if f.sip_call_id in steps
             for t in f.round_trips_ms]
    p50, p99 = _percentiles(intervals, 50, 99)
    trip50, trip95 = _percentiles(trips, 50, 95)
    add50, add95 = _percentiles(added, 50, 95)
    worker50 = _percentiles([steps[f.sip_call_id] for f in answered if f.sip_call_id in steps], 50)[0]
    lost = sum(f.lost for f in answered)
    return {
        "calls": calls, "answered": len(answered),
        "refused": sorted({f.error for f in figures if f.error})[:3],
        "interval_ms": {"p50": p50, "p99": p99, "max": round(float(intervals.max()), 2) if len(intervals) else None},
        "packets": {"expected": sum(f.expected for f in answered), "lost": lost},
        "within_20_plus_minus_5": bool(p99 is not None and 15 <= (_percentiles(intervals, 1)[0] or 0)
                                       and p99 <= 25 and lost == 0 and len(answered) == calls),
        "outbound_underruns": sum(records[f.sip_call_id].underruns for f in answered if f.sip_call_id in records),
        "outbound_shed": sum(records[f.sip_call_id].shed for f in answered if f.sip_call_id in records),
        "round_trip_ms": {"p50": trip50, "p95": trip95, "bursts": len(trips)},
        "worker_step_ms_p50": worker50,
        "jitter_buffer_ms_p50": _percentiles([r.jitter_buffer_ms for f in answered
                                              if (r := records.get(f.sip_call_id)) and r.jitter_buffer_ms is not None],
                                             50)[0],
        "gateway_latency_ms": {"p50": add50, "p95": add95,
                               "beyond_frame_p95": round(add95 - FRAME_GATHERING_SECONDS * 1000, 2)
                               if add95 is not None else None},
    }


async def bench(counts: list[int], seconds: float, gateway_cpu: int | None = None) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="personagate-bench-sip-") as tmp:
        log_path = Path(tmp) / "gateway.log"
        with echo_stack(max(counts), max(counts) + 4, log_path, gateway_cpu) as (target, gateway_pid):
            for calls in counts:
                cpu_before, began = cpu_seconds(gateway_pid), time.monotonic()
                figures = await run_round(target, calls, seconds, BENCH_NUMBER)
                gateway_cpu = (cpu_seconds(gateway_pid) - cpu_before) / (time.monotonic() - began)
                await asyncio.sleep(1.5)  # the call records are written as the calls end
                rows.append(summarise(calls, figures, gateway_records(log_path))
                            | {"gateway_cpu_percent": round(100 * gateway_cpu, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr)
                await asyncio.sleep(1.0)
    return rows


def run(counts: list[int], seconds: float, *, as_json: bool = False, gateway_cpu: int | None = None) -> int:
    rows = asyncio.run(bench(counts, seconds, gateway_cpu))
    if as_json:
        print(json.dumps({"machine": f"{os.cpu_count()} cores", "seconds": seconds, "gateway_cpu": gateway_cpu,
                          "rounds": rows}, indent=2))
        return 0
    print(f"{'calls':>5} {'answered':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'lost':>5} {'underrun':>8} "
          f"{'rtt p50':>8} {'rtt p95':>8} {'worker':>7} {'gw p50':>7} {'gw p95':>7} {'gw cpu%':>7}")
    for row in rows:
        i, g, r = row["interval_ms"], row["gateway_latency_ms"], row["round_trip_ms"]
        print(f"{row['calls']:>5} {row['answered']:>8} {i['p50']!s:>7} {i['p99']!s:>7} {i['max']!s:>7} "
              f"{row['packets']['lost']:>5} {row['outbound_underruns']!s:>8} {r['p50']!s:>8} {r['p95']!s:>8} {row['worker_step_ms_p50']!s:>7} "
              f"{g['p50']!s:>7} {g['p95']!s:>7} {row['gateway_cpu_percent']!s:>7}")
    return 0




__all__ = ["bench", "caller_audio", "measure_leg", "mulaw_encode", "onsets", "run", "run_round"]
