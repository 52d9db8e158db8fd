"""Raw SIP on loopback, for tests that send what no well-behaved user agent would: requests built by hand
(``request``), peers over UDP and TCP that send bytes as they are and read back whatever the gateway answers
(``UdpPeer``, ``TcpPeer``), and the small parsers the tests read answers with."""

from __future__ import annotations

import contextlib
import random
import re
import socket
import time
import uuid
from typing import Self

from tests.helpers.processes import udp_free_port

SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n")

OPEN_NUMBER = "+14155550186"  # harbor-mutual's catastrophe line: answered at any hour (tests.helpers.stack)


def private_rtp_ports(size: int = 1024) -> dict[str, str]:
    """Gateway settings (environment) that give its calls' RTP a range of ports of their own, at random below the
    ephemeral ports: pjsua's default walks up from 4000 in every gateway, and gateways of other test runs on the same
    machine (a flood holds hundreds of RTP sockets) would make it skip, then give up (500)."""
    base = random.randrange(20_000, 32_000 - size, 2)
    return {"PERSONAGATE_GATEWAY_SIP_RTP_PORT": str(base), "PERSONAGATE_GATEWAY_SIP_RTP_PORT_RANGE": str(size)}


def _transport(sock: socket.socket) -> str:
    return "TCP" if sock.type == socket.SOCK_STREAM else "UDP"


def request(sock: socket.socket, target: str, method: str = "OPTIONS", *, number: str = OPEN_NUMBER,
            body: str = "", content_type: str | None = None, drop: tuple[str, ...] = (),
            extra: dict[str, str] | None = None, length: int | None = None,
            call_id: str | None = None) -> tuple[bytes, str, str]:
    """A request from ``sock`` (UDP, or a connected TCP socket: its Via says which) to the gateway at ``target``
    ("host:port"), dialing ``number``; returns (message, Call-ID, Via branch)."""
    host, port = sock.getsockname()
    call_id = call_id or uuid.uuid4().hex
    branch = "z9hG4bK" + uuid.uuid4().hex[:16]
    headers = {
        "Via": f"SIP/2.0/{_transport(sock)} {host}:{port};branch={branch};rport",
        "Max-Forwards": "70",
        "From": f"<sip:robust@{host}:{port}>;tag={uuid.uuid4().hex[:8]}",
        "To": f"<sip:{number}@{target}>",
        "Call-ID": call_id,
        "CSeq": f"1 {method}",
        "Contact": f"<sip:robust@{host}:{port}>",
    }
    if content_type or body:
        headers["Content-Type"] = content_type or "application/sdp"
    headers |= extra or {}
    headers["Content-Length"] = str(len(body.encode()) if length is None else length)
    lines = [f"{method} sip:{number}@{target} SIP/2.0"] + [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode(), call_id, branch


def responses(sock: socket.socket, wait: float = 1.0, tail: float = 0.2) -> list[str]:
    """Every datagram ``sock`` receives until a final response (then ``tail`` s longer, for a retransmission or a
    stray second answer) or ``wait`` s of silence."""
    got: list[str] = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65_535)
        except TimeoutError:
            break
        got.append(data.decode("latin-1"))
        if final(got[-1]):
            deadline = min(deadline, time.monotonic() + tail)
    return got


def final(message: str) -> bool:
    """A final response (2xx-6xx)."""
    status = status_of(message)
    return status is not None and status >= 200


def status_of(message: str) -> int | None:
    """A response's status code; None for anything else."""
    parts = message.split("\r\n", 1)[0].split(" ", 2)
    if len(parts) >= 2 and parts[0] == "SIP/2.0" and parts[1].isdigit():
        return int(parts[1])
    return None


def statuses(got: list[str]) -> list[int]:
    return [code for message in got if (code := status_of(message)) is not None]


_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
            "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding", "o": "event"}


def header(message: str, name: str) -> str:
    """The first ``name`` header of ``message`` (compact forms understood, folded lines joined); KeyError if none."""
    head = re.sub(r"\r\n[ \t]+", " ", message.split("\r\n\r\n", 1)[0])
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if _COMPACT.get(key, key) == name.lower():
            return value.strip()
    raise KeyError(name)


def reason_of(message: str) -> str:
    return message.split("\r\n", 1)[0].split(" ", 2)[2] if message.count(" ") >= 2 else ""


# ---------------------------------------------------------------------------------------------- peers

class Peer:
    """One SIP peer on loopback talking to the gateway's SIP port over UDP or TCP: bytes out as they are,
    messages back (``receive``)."""

    transport = ""

    def __init__(self, sock: socket.socket, gateway: tuple[str, int]) -> None:
        self.sock = sock
        self.gateway = gateway

    @property
    def local(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def receive(self, wait: float = 1.0, tail: float = 0.05, until: str | None = None) -> list[str]:
        """Messages received until a final response (and ``tail`` s more), or — with ``until`` — until a final
        response whose Call-ID is ``until``; at most ``wait`` s."""
        got: list[str] = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            message = self._next(left)
            if message is None:
                if self.closed:
                    break
                continue
            got.append(message)
            if final(message) and (until is None or _call_id(message) == until):
                deadline = min(deadline, time.monotonic() + tail)
        return got

    closed = False

    def _next(self, wait: float) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _call_id(message: str) -> str | None:
    try:
        return header(message, "Call-ID")
    except KeyError:
        return None


class UdpPeer(Peer):
    transport = "UDP"

    def __init__(self, gateway: tuple[str, int], host: str = "127.0.0.1") -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        super().__init__(sock, gateway)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.gateway)

    def _next(self, wait: float) -> str | None:
        self.sock.settimeout(max(0.001, wait))
        try:
            return self.sock.recv(65_535).decode("latin-1")
        except TimeoutError:
            return None


_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d+)", re.IGNORECASE | re.MULTILINE)


def next_message(stream: bytes) -> tuple[str | None, bytes]:
    """The first whole message in ``stream`` (framed by its Content-Length, RFC 3261 §18.3), and what follows it;
    (None, stream) while it is not all there."""
    while stream.startswith(b"\r\n"):  # keep-alive CRLFs between messages
        stream = stream[2:]
    end = stream.find(b"\r\n\r\n")
    if end < 0:
        return None, stream
    match = _CONTENT_LENGTH.search(stream[:end])
    length = int(match.group(1)) if match else 0
    if len(stream) < end + 4 + length:
        return None, stream
    return stream[:end + 4 + length].decode("latin-1"), stream[end + 4 + length:]


class TcpPeer(Peer):
    """A TCP connection to the gateway; messages read back are framed by Content-Length (RFC 3261 §18.3)."""

    transport = "TCP"

    def __init__(self, gateway: tuple[str, int], host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        sock = socket.create_connection(gateway, timeout=timeout, source_address=(host, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, gateway)
        self._buffer = b""
        self.closed = False  # the gateway closed the connection (or reset it)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _frame(self) -> str | None:
        message, self._buffer = next_message(self._buffer)
        return message

    def _next(self, wait: float) -> str | None:
        deadline = time.monotonic() + wait
        while (message := self._frame()) is None:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65_536)
            except TimeoutError:
                return None
            except OSError:  # reset
                data = b""
            if not data:
                self.closed = True
                return None
            self._buffer += data
        return message


def peer(transport: str, gateway: tuple[str, int], host: str = "127.0.0.1") -> Peer:
    return UdpPeer(gateway, host) if transport.upper() == "UDP" else TcpPeer(gateway, host)


# ---------------------------------------------------------------------------------------------- dialogs

def ack(sock: socket.socket, target: str, invite: bytes, response: str, branch: str) -> None:
    """(UDP) ACK a final response to ``invite`` (a 2xx: a new transaction, with an SDP answer; else the INVITE's
    branch); after a 2xx, BYE too, so that the dialog does not hold the gateway's slot."""
    address = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
    del branch  # the INVITE's own Via is copied (ack_messages)
    for message in ack_messages(sock.getsockname()[:2], "UDP", invite, response):
        sock.sendto(message, address)


def ack_messages(local: tuple[str, int], transport: str, invite: bytes, response: str) -> list[bytes]:
    """What a caller sends after ``response``, the final answer to ``invite``: the ACK (for a 2xx, a transaction
    of its own, carrying an SDP answer when the INVITE had no offer; else with the INVITE's branch), and after a
    2xx a BYE (CSeq 2)."""
    host, port = local
    status = status_of(response) or 0
    inv = invite.decode("latin-1")
    common = ["Max-Forwards: 70", f"From: {header(inv, 'From')}", f"To: {header(response, 'To')}",
              f"Call-ID: {header(inv, 'Call-ID')}"]
    uri = inv.split(" ", 2)[1]
    if status < 300:
        with contextlib.suppress(KeyError):
            uri = header(response, "Contact").split("<", 1)[-1].split(">", 1)[0]
        offered = inv.split("\r\n\r\n", 1)[1].strip() if "\r\n\r\n" in inv else ""
        body = "" if offered else SDP.format(port=udp_free_port())
        out = []
        for method, cseq, payload in (("ACK", _cseq(inv), body), ("BYE", _cseq(inv) + 1, "")):
            via = f"Via: SIP/2.0/{transport} {host}:{port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport"
            extra = ["Content-Type: application/sdp"] if payload else []
            lines = [f"{method} {uri} SIP/2.0", via, *common, f"CSeq: {cseq} {method}", *extra,
                     f"Content-Length: {len(payload)}"]
            out.append(("\r\n".join(lines) + "\r\n\r\n" + payload).encode())
        return out
    # the INVITE's own top Via (its branch): the ACK of a non-2xx answer belongs to the INVITE's transaction
    lines = [f"ACK {uri} SIP/2.0", f"Via: {header(inv, 'Via')}", *common, f"CSeq: {_cseq(inv)} ACK",
             "Content-Length: 0"]
    return [("\r\n".join(lines) + "\r\n\r\n").encode()]


def _cseq(message: str) -> int:
    try:
        return int(header(message, "CSeq").split()[0])
    except (KeyError, ValueError, IndexError):
        return 1


def options(transport: str, gateway: tuple[str, int], wait: float = 2.0) -> int | None:
    """An OPTIONS over ``transport`` from a fresh socket: the final status, or None if none came in ``wait`` s."""
    with peer(transport, gateway) as p:
        message, call_id, _ = request(p.sock, f"{gateway[0]}:{gateway[1]}")
        p.send(message)
        got = [m for m in p.receive(wait, tail=0.0, until=call_id) if _call_id(m) == call_id]
    codes = statuses(got)
    return codes[-1] if codes and codes[-1] >= 200 else None
