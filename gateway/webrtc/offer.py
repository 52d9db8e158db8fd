"""What a browser's SDP offer must say before the gateway spends anything on it.

aiortc parses whatever it is given and fails late, or deep inside, on offers a browser would never send; the
checks here give the client a 400 that names the first problem found instead.

Contract: an accepted offer has one audio section sending Opus at 48 kHz (the agent steps only on caller
audio), at most one data channel and nothing else (aiortc answers every section, and unread media would pile
up decoded), DTLS-SRTP credentials, numbers in range, and at most ``max_candidates`` well-formed UDP ICE
candidates (the gateway checks every candidate, so more would make it a UDP reflector). TCP candidates and
those at addresses ``ice.CandidatePolicy`` forbids are taken out rather than refused (browsers offer VPN and
container addresses routinely); an offer left with none is refused. The size cap is the API's.

Details (each check, each status): docs/webrtc.md#signalling and docs/webrtc.md#ice-nat-and-turn.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

_LINE = re.compile(r"^[a-z]=")
_OPUS = re.compile(r"^a=rtpmap:\d+ opus/48000(/2)?$", re.IGNORECASE)
_NUMBER = re.compile(r"^[0-9]{1,10}$")
_PT_ATTRIBUTES = ("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")
_CANDIDATE_TYPES = frozenset({"host", "srflx", "prflx", "relay"})
_MDNS_NAME = re.compile(r"^[A-Za-z0-9-]{1,63}\.local$")  # what browsers put in place of a host address
DEFAULT_MAX_CANDIDATES = 20
_TCP = "TCP: the gateway's ICE agent speaks UDP only"  # a candidate taken out without a word

# Refuses a candidate's address (the reason) or lets it through (None); see ``ice.CandidatePolicy``.
AddressCheck = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], "str | None"]


class OfferError(ValueError):
    """An offer the gateway cannot answer; the message says why (shown to the client with 400), ``reason`` what
    it is counted as (``personagate_gateway_webrtc_refusals_total``)."""

    def __init__(self, message: str, reason: str = "invalid_offer") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Offer:
    """An offer that passed the checks: the SDP to give aiortc, and the candidates taken out of it (why)."""

    sdp: str
    candidates: int = 0  # those kept
    dropped: list[str] = field(default_factory=list)  # "<address>: <reason>" for each candidate taken out


def check_offer(body: bytes, *, max_candidates: int = DEFAULT_MAX_CANDIDATES,
                address_check: AddressCheck | None = None) -> str:
    """The offer as text, or ``OfferError`` (``read_offer``'s SDP)."""
    return read_offer(body, max_candidates=max_candidates, address_check=address_check).sdp


def read_offer(body: bytes, *, max_candidates: int = DEFAULT_MAX_CANDIDATES,
               address_check: AddressCheck | None = None) -> Offer:
    """The offer, checked, with the candidates ``address_check`` refuses taken out; or ``OfferError``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise OfferError("the offer is not UTF-8 text") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0] != "v=0":
        raise OfferError("an SDP offer starts with the line 'v=0'")
    for number, line in enumerate(lines, 1):
        if not _LINE.match(line) or any(ord(ch) < 32 for ch in line):
            raise OfferError(f"line {number} is not an SDP line ('x=value'): {line[:60]!r}")
    session, sections = _sections(lines)
    audio = [s for s in sections if s[0].startswith("m=audio ")]
    data = [s for s in sections if s[0].startswith("m=application ")]
    if not audio:
        raise OfferError("the offer has no audio section (m=audio)")
    if len(audio) > 1 or len(data) > 1 or len(audio) + len(data) < len(sections):
        kinds = ", ".join(s[0].split(" ", 1)[0][2:] for s in sections)
        raise OfferError(f"the offer's media are {kinds}: a call takes one audio section and at most one data "
                         "channel (no video)")
    for section in audio:
        if not any(_OPUS.match(line) for line in section):
            raise OfferError("the offer's audio has no Opus at 48 kHz (a=rtpmap:<pt> opus/48000/2)")
        direction = next((line[2:] for line in section if line in ("a=sendrecv", "a=sendonly", "a=recvonly",
                                                                    "a=inactive")), "sendrecv")
        if direction not in ("sendrecv", "sendonly"):
            raise OfferError(f"the offer's audio is {direction}: it sends no audio (allow the microphone)")
        for attribute, what in (("a=ice-ufrag:", "ICE credentials (a=ice-ufrag)"),
                                ("a=ice-pwd:", "ICE credentials (a=ice-pwd)"),
                                ("a=fingerprint:", "a DTLS fingerprint (a=fingerprint)"),
                                ("a=setup:", "DTLS role (a=setup)")):
            if not any(line.startswith(attribute) for line in (*session, *section)):
                raise OfferError(f"the offer's audio has no {what}")
    for section in sections:
        _check_media_line(section)
    return _check_candidates(session, sections, max_candidates, address_check)


def _check_media_line(section: list[str]) -> None:
    """The m-line's port is a port, and an RTP section's payload types (there and in its attributes) are 0-127."""
    fields = section[0][2:].split(" ")
    if len(fields) < 4:
        raise OfferError(f"the media line {section[0][:60]!r} is not 'm=<media> <port> <protocol> <formats>'")
    kind, port, protocol = fields[0], fields[1], fields[2]
    if not _NUMBER.match(port) or int(port) > 65535:
        raise OfferError(f"the {kind} section's port {port[:20]!r} is not a port number (0-65535)")
    if "RTP/" not in protocol:
        return  # a data channel: its format is a name (webrtc-datachannel), not a payload type
    for pt in fields[3:]:
        _payload_type(pt, f"m={kind}")
    for line in section:
        attribute = next((a for a in _PT_ATTRIBUTES if line.startswith(a)), None)
        if attribute is not None:
            pt = line[len(attribute):].split(" ", 1)[0]
            if not (attribute == "a=rtcp-fb:" and pt == "*"):
                _payload_type(pt, attribute.rstrip(":"))


def _payload_type(pt: str, where: str) -> None:
    if not _NUMBER.match(pt) or int(pt) > 127:
        raise OfferError(f"{where}: payload type {pt[:20]!r} is not a number 0-127")


def _check_candidates(session: list[str], sections: list[list[str]], max_candidates: int,
                      address_check: AddressCheck | None) -> Offer:
    """Each candidate checked; TCP ones and those ``address_check`` refuses taken out; at least one left, at most
    ``max_candidates`` UDP ones offered (and three times that in all)."""
    lines = [line for section in sections for line in section if line.startswith("a=candidate:")]
    offered = len(lines)
    udp = sum(_fields(line)[2].lower() == "udp" for line in lines)
    if udp > max_candidates or offered > 3 * max_candidates:
        raise OfferError(f"the offer has {offered} ICE candidates ({udp} UDP); at most {max_candidates} UDP ones are "
                         "taken (a browser offers a few per network interface)", "too_many_candidates")
    offer = Offer(sdp="")
    out = list(session)
    for section in sections:
        for line in section:
            if line.startswith("a=candidate:"):
                why = _candidate_refused(line, address_check)
                if why == _TCP:
                    continue  # expected from every browser: not worth a log line
                if why is not None:
                    offer.dropped.append(why)
                    continue
                offer.candidates += 1
            out.append(line)
    if offered and not offer.candidates:
        why = "; ".join(offer.dropped[:4]) or "they are all TCP, and the gateway's ICE agent speaks UDP only"
        raise OfferError(f"none of the offer's {offered} ICE candidates is an address this gateway may send to "
                         f"({why})", "no_usable_candidate")
    offer.sdp = "\r\n".join(out) + "\r\n"
    return offer


def _fields(line: str) -> list[str]:
    """An ``a=candidate:`` line's fields (at least 3, so that the transport can always be read)."""
    fields = line[len("a=candidate:"):].split(" ")
    return fields + [""] * (3 - len(fields))


def _candidate_refused(line: str, address_check: AddressCheck | None) -> str | None:
    """None for a candidate the gateway may use; a reason ("<address>: <why>") for one it takes out (``_TCP`` for a
    TCP one, taken out quietly); OfferError for one that is malformed or at an address no host may use."""
    fields = _fields(line)
    shown = repr(line[:80])
    if len(fields) < 8 or fields[6] != "typ":
        raise OfferError(f"ICE candidate {shown} is not '<foundation> <component> <transport> <priority> <address> "
                         "<port> typ <type>'")
    component, transport, priority, host, port, kind = fields[1], fields[2], fields[3], fields[4], fields[5], fields[7]
    if not _NUMBER.match(component) or not 1 <= int(component) <= 256:
        raise OfferError(f"ICE candidate {shown}: component {component[:12]!r} is not 1-256")
    if transport.lower() not in ("udp", "tcp"):
        raise OfferError(f"ICE candidate {shown}: transport {transport[:12]!r} is not udp or tcp")
    if not _NUMBER.match(priority) or int(priority) >= 2**32:
        raise OfferError(f"ICE candidate {shown}: priority {priority[:12]!r} is not a number below 2^32")
    if not _NUMBER.match(port) or int(port) > 65535:
        raise OfferError(f"ICE candidate {shown}: port {port[:12]!r} is not a port number (0-65535)")
    if kind not in _CANDIDATE_TYPES:
        raise OfferError(f"ICE candidate {shown}: type {kind[:12]!r} is not host, srflx, prflx or relay")
    if transport.lower() == "tcp":
        return _TCP
    if int(port) == 0:
        raise OfferError(f"ICE candidate {shown}: UDP port 0 cannot be sent to")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if _MDNS_NAME.match(host):
            return None  # resolved on the local link by the ICE agent (RFC 8828's names), nowhere else
        raise OfferError(f"ICE candidate {shown}: {host[:40]!r} is not an IP address (nor an mDNS .local name)") \
            from None
    if address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        raise OfferError(f"ICE candidate {shown}: {address} is not an address a browser can be reached at")
    why = address_check(address) if address_check is not None else None
    return f"{address}: {why}" if why is not None else None


def _sections(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """The session-level lines and each media section's lines (its m-line first)."""
    session: list[str] = []
    sections: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            session.append(line)
    return session, sections
