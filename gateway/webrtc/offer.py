"""What a browser's SDP offer must say before the gateway spends anything on it.

aiortc parses whatever it is given and fails late, or deep inside, on offers a browser would never send; the
checks here give the client a 400 that names the problem (the first one found) instead:

- UTF-8 text of ``x=value`` lines starting with ``v=0``;
- exactly one audio section, and at most one data channel (``m=application``), nothing else: aiortc answers
  every section it is offered, and media nobody reads (a camera, a second microphone) would pile up decoded in
  its queues;
- the audio carries Opus at 48 kHz (what every browser offers) and sends audio: the agent steps only on caller
  audio, so an offer without a microphone (``a=recvonly`` / ``a=inactive``) could never be answered by the
  agent;
- ICE credentials, a DTLS fingerprint and a DTLS role (``a=setup``): WebRTC media is always DTLS-SRTP.

The size cap is the API's (``webrtc_max_offer_bytes``: 413 before the body is read whole).
"""

from __future__ import annotations

import re

_LINE = re.compile(r"^[a-z]=")
_OPUS = re.compile(r"^a=rtpmap:\d+ opus/48000(/2)?$", re.IGNORECASE)


class OfferError(ValueError):
    """An offer the gateway cannot answer; the message says why (shown to the client with 400)."""


def check_offer(body: bytes) -> str:
    """The offer as text, or ``OfferError``."""
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
    return "\r\n".join(lines) + "\r\n"


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
