"""A seeded mutational SIP fuzzer: valid and corpus messages (``seeds``) changed by the mutations that matter to SIP
parsers (``MUTATIONS``), reproducible from one seed.

    fuzzer = Fuzzer(seed)
    data, applied = fuzzer.mutate(fuzzer.seed_message(local, "UDP", target))

Each mutation is a function (rng, message bytes) → bytes; ``mutate`` applies one to three in a row and returns their
names, which the tests count."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from tests.helpers import sip_corpus
from tests.helpers.sip import OPEN_NUMBER
from tests.helpers.sip_corpus import CLOSED_NUMBER, UNKNOWN_NUMBER, Case

Mutation = Callable[[random.Random, bytes], bytes]

_HEADER_LINE = re.compile(rb"\r\n([A-Za-z][A-Za-z0-9!%*_+`'~.-]*[ \t]*:[^\r\n]*)")
_NUMBER = re.compile(rb"\d+")
_CONTENT_LENGTH = re.compile(rb"\r\n(Content-Length|l)[ \t]*:[ \t]*[^\r\n]*", re.IGNORECASE)
HUGE = [b"0", b"-1", b"4294967295", b"4294967296", b"2147483648", b"18446744073709551616", b"9" * 40, b"0" * 30 + b"1",
        b"1e9", b"0x10", b"65536", b"99999"]
SPECIAL = [b"\x00", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\xff", b"\x80", b"\xc0\x80", b"\xef\xbb\xbf", b"\t", b" " * 8,
           b"%00", b"%", b'"', b"<", b">", b"\\", b";", b",", b":", b"\x1b[31m"]
SEPARATORS = b";,:<>\"/ =@?&"
ODD_URIS = [b"sip:", b"sip:@", b"sip:%", b"sip:%zz@h", b"sip:a@[::1", b"sip:a@256.256.256.256:99999", b"tel:",
            b"sips:a@b;transport=tls", b"sip:" + b"a" * 3000 + b"@h", b"*", b"sip:a@b?x=y&z", b"sip:;;;@;;;",
            b"sip:+1(415)555.0186@h", b"tel:+14155550186;phone-context=%00", b"sip:\xff\xfe@h", b"http://x/",
            b"sip:a@b:0", b"sip:a@b:-1", b"sip:a@" + b"b." * 200 + b"c", b"urn:service:sos"]
METHODS = [b"INVITE", b"ACK", b"BYE", b"CANCEL", b"OPTIONS", b"REGISTER", b"PRACK", b"SUBSCRIBE", b"NOTIFY",
           b"PUBLISH", b"INFO", b"REFER", b"MESSAGE", b"UPDATE", b"FROB", b"invite", b"INVITE\x00", b"",
           b"SIP/2.0", b"GET", b"I" * 300]
SDP_GARBAGE = [b"m=audio 99999999 RTP/AVP 0\r\n", b"m=audio 0 RTP/AVP 0\r\n", b"m=audio 1 RTP/AVP\r\n",
               b"c=IN IP6 ::::::\r\n", b"c=IN IP4 255.255.255.255\r\n", b"c=IN IP4 224.0.0.1/127\r\n",
               b"a=rtpmap:0 PCMU/0\r\n", b"a=rtpmap:96 telephone-event/0\r\n", b"a=rtpmap:-1 X/8000\r\n",
               b"a=fmtp:96 " + b"0-15," * 500 + b"\r\n", b"a=ptime:0\r\n", b"a=ptime:-20\r\n", b"a=maxptime:99999\r\n",
               b"b=AS:-1\r\n", b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + b"A" * 200 + b"\r\n",
               b"m=audio 4000 RTP/AVP " + b"0 " * 300 + b"\r\n", b"a=sendrecv\r\na=sendonly\r\na=inactive\r\n",
               b"m=video 4002 RTP/AVP 31\r\n" * 40, b"o=\r\n", b"v=1\r\n", b"t=-1 -1\r\n", b"a=rtcp:0\r\n",
               b"a=candidate:1 1 UDP 1 255.255.255.255 0 typ host\r\n", b"\x00=\x00\r\n"]


def _lines(m: bytes) -> list[re.Match[bytes]]:
    head = m.split(b"\r\n\r\n", 1)[0]
    return list(_HEADER_LINE.finditer(head))


def flip_bytes(rng: random.Random, m: bytes) -> bytes:
    data = bytearray(m)
    for _ in range(rng.randint(1, 8)):
        if data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(256)
    return bytes(data)


def truncate(rng: random.Random, m: bytes) -> bytes:
    return m[:rng.randrange(len(m))] if m else m


def insert_special(rng: random.Random, m: bytes) -> bytes:
    for _ in range(rng.randint(1, 5)):
        i = rng.randrange(len(m) + 1)
        m = m[:i] + rng.choice(SPECIAL) * rng.choice((1, 1, 2, 50)) + m[i:]
    return m


def duplicate_header(rng: random.Random, m: bytes) -> bytes:
    lines = _lines(m)
    if not lines:
        return m
    line = rng.choice(lines)
    copies = rng.choice((1, 2, 5, 60, 400))
    return m[:line.end()] + (b"\r\n" + line.group(1)) * copies + m[line.end():]


def delete_header(rng: random.Random, m: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        lines = _lines(m)
        if not lines:
            break
        line = rng.choice(lines)
        m = m[:line.start()] + m[line.end():]
    return m


def huge_number(rng: random.Random, m: bytes) -> bytes:
    numbers = list(_NUMBER.finditer(m))
    if not numbers:
        return m
    for _ in range(rng.randint(1, 3)):
        n = rng.choice(numbers)
        m = m[:n.start()] + rng.choice(HUGE) + m[n.end():]
        numbers = list(_NUMBER.finditer(m))
    return m


def repeat_separator(rng: random.Random, m: bytes) -> bytes:
    places = [i for i, c in enumerate(m) if c in SEPARATORS]
    if not places:
        return m
    i = rng.choice(places)
    return m[:i] + m[i:i + 1] * rng.choice((2, 3, 10, 200, 2000)) + m[i + 1:]


def content_length_lie(rng: random.Random, m: bytes) -> bytes:
    body = len(m.split(b"\r\n\r\n", 1)[1]) if b"\r\n\r\n" in m else 0
    value = rng.choice([b"0", str(max(0, body - 1)).encode(), str(body + 1).encode(), str(body * 10 + 7).encode(),
                        b"65536", b"4294967295", b"-5", b"abc", b"", b"1 2", b"00000000000000000000", b"0x10"])
    match = _CONTENT_LENGTH.search(m)
    if match is None or rng.random() < 0.2:  # another one, or a first one
        head, sep, rest = m.partition(b"\r\n\r\n")
        return head + b"\r\nContent-Length: " + value + sep + rest
    return m[:match.start()] + b"\r\nContent-Length: " + value + m[match.end():]


def body_garbage(rng: random.Random, m: bytes) -> bytes:
    head, _, body = m.partition(b"\r\n\r\n")
    kind = rng.random()
    if kind < 0.35:
        body = rng.randbytes(rng.choice((1, 10, 300, 3000)))
    elif kind < 0.8:
        lines = body.split(b"\r\n") if body else []
        for _ in range(rng.randint(1, 4)):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(SDP_GARBAGE).rstrip(b"\r\n"))
        body = b"\r\n".join(lines)
    else:
        body = body * rng.choice((2, 20))
    if rng.random() < 0.6:  # mostly with a Content-Length that tells the truth, and an SDP type
        head = _CONTENT_LENGTH.sub(b"", head) + b"\r\nContent-Length: " + str(len(body)).encode()
        if b"content-type" not in head.lower():
            head += b"\r\nContent-Type: application/sdp"
    return head + b"\r\n\r\n" + body


def line_endings(rng: random.Random, m: bytes) -> bytes:
    choice = rng.random()
    if choice < 0.3:
        return m.replace(b"\r\n", b"\n")
    if choice < 0.5:
        return m.replace(b"\r\n", b"\r")
    if choice < 0.7:
        return m.replace(b"\r\n", b"\n\r")
    parts = m.split(b"\r\n")
    return b"".join(part + rng.choice((b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\r\n ")) for part in parts)


def long_value(rng: random.Random, m: bytes) -> bytes:
    lines = _lines(m)
    if not lines:
        return m
    line = rng.choice(lines)
    name = line.group(1).split(b":", 1)[0]
    filler = rng.choice((b"a", b"%41", b"\"", b";x", b",", b" ", b"<sip:a@b>,")) * rng.choice((100, 1000, 5000))
    return m[:line.start()] + b"\r\n" + name + b": " + filler[:15000] + m[line.end():]


def header_names(rng: random.Random, m: bytes) -> bytes:
    """Header names in random case, compact forms, folding put in."""
    compact = {b"via": b"v", b"from": b"f", b"to": b"t", b"call-id": b"i", b"contact": b"m",
               b"content-length": b"l", b"content-type": b"c", b"supported": b"k", b"subject": b"s"}

    def rename(match: re.Match[bytes]) -> bytes:
        name, sep, value = match.group(1).partition(b":")
        r = rng.random()
        if r < 0.3:
            name = compact.get(name.strip().lower(), name)
        elif r < 0.6:
            name = bytes(c ^ 0x20 if 65 <= (c & ~0x20) <= 90 and rng.random() < 0.5 else c for c in name)
        elif r < 0.8:
            value = value.replace(b" ", b"\r\n ", 1)
        else:
            name = name + b" " * rng.randint(1, 4)
        return b"\r\n" + name + sep + value

    head, sep, body = m.partition(b"\r\n\r\n")
    return _HEADER_LINE.sub(rename, head) + sep + body


def odd_request_uri(rng: random.Random, m: bytes) -> bytes:
    first, sep, rest = m.partition(b"\r\n")
    parts = first.split(b" ")
    if len(parts) >= 3 and not first.startswith(b"SIP/"):
        parts[1] = rng.choice(ODD_URIS)
    return b" ".join(parts) + sep + rest


def swap_method(rng: random.Random, m: bytes) -> bytes:
    method = rng.choice(METHODS)
    first, sep, rest = m.partition(b"\r\n")
    parts = first.split(b" ", 1)
    first = method + b" " + parts[1] if len(parts) == 2 and not first.startswith(b"SIP/") else first
    if rng.random() < 0.5:  # the CSeq too, mostly
        rest = re.sub(rb"(CSeq[ \t]*:[ \t]*\d+[ \t]+)\S+", lambda x: x.group(1) + method, rest, count=1,
                      flags=re.IGNORECASE)
    return first + sep + rest


def splice(rng: random.Random, m: bytes) -> bytes:
    other = rng.choice(_SPLICE_PARTS)
    return m[:rng.randrange(len(m) + 1)] + other[rng.randrange(len(other) + 1):]


def quote_injection(rng: random.Random, m: bytes) -> bytes:
    lines = [line for line in _lines(m) if line.group(1).lower().split(b":")[0].strip() in
             (b"from", b"to", b"contact", b"f", b"t", b"m", b"via", b"v", b"authorization", b"proxy-authorization")]
    if not lines:
        return m
    line = rng.choice(lines)
    text = line.group(1)
    i = rng.randrange(text.index(b":") + 1, len(text) + 1)
    text = text[:i] + rng.choice((b'"', b"<", b">", b"\\", b'\\"', b",", b"<<<<", b'"' * 3)) + text[i:]
    return m[:line.start()] + b"\r\n" + text + m[line.end():]


def to_tag(rng: random.Random, m: bytes) -> bytes:
    """A To tag: the request claims a dialog (that does not exist)."""
    return re.sub(rb"(\r\n(?:To|t)[ \t]*:[^\r\n]*)", lambda x: x.group(1) + b";tag=" + rng.randbytes(4).hex().encode(),
                  m, count=1, flags=re.IGNORECASE)


def digest_garbage(rng: random.Random, m: bytes) -> bytes:
    """An Authorization header of Digest credentials with odd parameters (the gateway's own digest code reads them)."""
    params = [b'username="trunk"', b'realm="personagate"', b'nonce="' + rng.randbytes(rng.choice((0, 8, 40))).hex()
              .encode() + b'"', b'uri="sip:x"', b'response="' + b"0" * rng.choice((0, 32, 64, 500)) + b'"',
              b"algorithm=" + rng.choice((b"MD5", b"SHA-256", b"SHA-512-256", b"md5-sess", b"", b"\x00")),
              b"qop=" + rng.choice((b"auth", b"auth-int", b'"auth,auth-int"', b"")), b"nc=" + rng.choice(HUGE),
              b'cnonce="' + rng.choice(SPECIAL) + b'"', b'opaque="' + b"x" * rng.choice((0, 1000)) + b'"',
              b'username*="' + rng.randbytes(5).hex().encode(), b'"unterminated']
    rng.shuffle(params)
    value = b"Digest " + rng.choice((b",", b", ", b" ,", b",,")).join(params[:rng.randint(0, len(params))])
    head, sep, body = m.partition(b"\r\n\r\n")
    return head + b"\r\n" + rng.choice((b"Authorization", b"Proxy-Authorization", b"authorization")) + b": " + value + \
        sep + body


MUTATIONS: dict[str, Mutation] = {f.__name__: f for f in (
    flip_bytes, truncate, insert_special, duplicate_header, delete_header, huge_number, repeat_separator,
    content_length_lie, body_garbage, line_endings, long_value, header_names, odd_request_uri, swap_method, splice,
    quote_injection, to_tag, digest_garbage)}

_SDP = sip_corpus.SDP.replace("\n", "\r\n")
_SPLICE_PARTS = [b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060\r\nCSeq: 1 INVITE\r\n\r\n",
                 b"\r\nContent-Type: multipart/mixed;boundary=x\r\nContent-Length: 40\r\n\r\n--x\r\n\r\n--x--\r\n",
                 _SDP.encode(), b"\r\n\r\n\r\n", b"INVITE sip:a@b SIP/2.0\r\n"]

# Seeds: the valid messages a gateway sees most (INVITEs to each kind of number, with and without SDP, OPTIONS, the
# other methods out of dialog, a response), and corpus messages (RFC 4475's, scanners').
_SEED_METHODS = ["OPTIONS", "BYE", "CANCEL", "INFO", "UPDATE", "PRACK", "NOTIFY", "SUBSCRIBE", "REFER", "MESSAGE",
                 "REGISTER", "PUBLISH", "ACK"]
_PLAIN = """{{method}} sip:{{number}}@{{target}} SIP/2.0
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}};rport
Max-Forwards: 70
From: "Fuzz" <sip:+15551230000@{{host}}>;tag={{id}}
To: <sip:{{number}}@{{target}}>
Call-ID: fuzz.{{id}}
CSeq: 1 {{method}}
Contact: <sip:+15551230000@{{local}}>
Supported: timer, 100rel
Session-Expires: 1800
User-Agent: fuzz
{{headers}}Content-Length: {{length}}

{{body}}"""


def _seed(method: str, number: str, body: str = "", headers: str = "") -> Case:
    if body:
        headers += "Content-Type: application/sdp\n"
    return Case(f"seed-{method}", _PLAIN.replace("{{method}}", method).replace("{{number}}", number)
                .replace("{{headers}}", headers).replace("{{body}}", body), 0, "a fuzz seed")


SEEDS: list[Case] = (
    [_seed("INVITE", number, sip_corpus.SDP) for number in (OPEN_NUMBER, CLOSED_NUMBER, UNKNOWN_NUMBER)] * 3
    + [_seed("INVITE", number) for number in (OPEN_NUMBER, CLOSED_NUMBER, UNKNOWN_NUMBER)] * 2
    + [_seed("INVITE", OPEN_NUMBER, sip_corpus.SDP, 'Authorization: Digest username="trunk", realm="personagate", '
                                                    'nonce="abc", uri="sip:x", response="0123", algorithm=MD5\n')] * 2
    + [_seed(method, OPEN_NUMBER) for method in _SEED_METHODS]
    + [case for case in sip_corpus.RFC4475 if "TCP" in case.transports]
    + sip_corpus.SWEEPS["svwar-invite"][:3] + sip_corpus.SWEEPS["svmap-options"][:3]
)


# Known crashers: inputs that take the gateway down through a bug already found, each with a regression test of its own
# (marked xfail, strictly). The fuzzer holds them back, so that it goes on finding what is not known yet; remove an
# entry when its bug is fixed (its regression test then passes, and the strict xfail fails until the mark goes too).
KNOWN_CRASHERS: dict[str, Callable[[bytes, str], bool]] = {}


def known_crasher(message: bytes, transport: str) -> str | None:
    return next((name for name, test in KNOWN_CRASHERS.items() if test(message, transport)), None)


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.applied: dict[str, int] = dict.fromkeys(MUTATIONS, 0)

    def seed_message(self, local: tuple[str, int], transport: str, target: str) -> bytes:
        case = self.rng.choice(SEEDS)
        data, _ = case.render(local=local, transport=transport, target=target, rtp=self.rng.randrange(20_000, 60_000, 2),
                              rng=self.rng)
        return data

    def mutate(self, message: bytes) -> bytes:
        for name in self.rng.sample(sorted(MUTATIONS), self.rng.choice((1, 1, 2, 3))):
            self.applied[name] += 1
            message = MUTATIONS[name](self.rng, message)
        return message

    def message(self, local: tuple[str, int], transport: str, target: str, valid: float = 0.0) -> bytes:
        """A mutated seed (or, with probability ``valid``, the seed as it is)."""
        data = self.seed_message(local, transport, target)
        return data if self.rng.random() < valid else self.mutate(data)
