"""A corpus of malformed and hostile SIP, each message with what the gateway must do with it.

- ``RFC4475``: the torture tests of RFC 4475 ("SIP Torture Test Messages"), written here from the RFC's
  descriptions (section numbers and short names as the RFC gives them), plus variants that send the same oddity to
  the open number, where an odd but valid request must be answered as a valid one is (200, a call);
- ``REFUSALS``: delayed-offer (no SDP) and oversized (4-100 KB) INVITEs to an unknown number (404), to a closed
  tenant (its after-hours answer), from a refused source (403) and to the open number (200);
- ``SWEEPS``: what scanners send (sipvicious' svmap and svwar, friendly-scanner, sipcli and the like): OPTIONS,
  REGISTER and INVITE sweeps over extension ranges and toll-fraud numbers.

Messages are templates: lines end in ``\\n`` here and go out with CRLF; ``{{name}}`` placeholders are filled for each
send (``Case.render``): ``local`` (the sender's host:port), ``host`` (its address), ``transport`` (UDP or TCP, for
the top Via), ``target`` (the gateway's host:port), ``gateway`` (its host), ``branch`` (a fresh RFC 3261 branch),
``id`` (a fresh token, the same everywhere in one message: Call-IDs, tags), ``rtp`` (a free port for an SDP offer),
``open``/``closed``/``unknown`` (numbers) and ``length`` (the body's length in bytes, counted after the rest is filled).

What must happen (``Case.expect``): a final status (or one of a few, where the RFC allows either), ``ANSWERED`` (any
final response) or ``NO_ANSWER`` (nothing: a response is never answered, nor a request whose answer could not be
routed) — and always, after every message, the gateway alive and answering OPTIONS."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

from tests.helpers.sip import OPEN_NUMBER

CLOSED_NUMBER = "+442079460318"  # northwind-bank: always closed in the tests' copy (tests.helpers.stack.sip_tenants)
UNKNOWN_NUMBER = "+15550000000"  # no tenant has it
ANSWERED = "answered"
NO_ANSWER = "no answer"
REFUSED_SOURCE = "127.0.0.2"  # outside the corpus stack's sip_allow (127.0.0.1/32)

Expect = int | frozenset[int] | str


@dataclass(frozen=True)
class Case:
    name: str
    message: str
    expect: Expect
    why: str
    transports: tuple[str, ...] = ("UDP", "TCP")
    tcp_expect: Expect | None = None  # where TCP's framing makes the answer differ
    reason: str = ""  # text the final response's reason phrase must contain
    source: str = "127.0.0.1"
    encoding: str = "utf-8"
    crlf: bool = True  # "\n" → CRLF
    call: bool = False  # a 2xx starts a call: the test ACKs (with an SDP answer for a delayed offer) and BYEs
    extra_calls: tuple[str, ...] = field(default=())  # Call-IDs besides the message's own that must get no answer
    bug: str = ""  # a known bug makes the gateway answer otherwise: the test is marked xfail (strict) with this
    answer_has: str = ""  # text the final answer must contain (in its SDP, say)

    def expected(self, transport: str) -> Expect:
        return self.tcp_expect if transport == "TCP" and self.tcp_expect is not None else self.expect

    def render(self, *, local: tuple[str, int], transport: str, target: str, rtp: int,
               rng: random.Random | None = None) -> tuple[bytes, str]:
        """The message as sent, and its token (``{{id}}``: found in its Call-ID where it has one). Tokens and branches
        come from ``rng`` where one is given (the fuzzer's: then a seed gives the same messages again)."""
        def fresh(n: int) -> str:
            return f"{rng.getrandbits(4 * n):0{n}x}" if rng is not None else uuid.uuid4().hex[:n]

        token = fresh(12)
        values = {"local": f"{local[0]}:{local[1]}", "host": local[0], "transport": transport, "target": target,
                  "gateway": target.rsplit(":", 1)[0], "id": token, "rtp": str(rtp), "open": OPEN_NUMBER,
                  "closed": CLOSED_NUMBER, "unknown": UNKNOWN_NUMBER}
        text = self.message
        while "{{branch}}" in text:
            text = text.replace("{{branch}}", "z9hG4bK" + fresh(16), 1)
        for name, value in values.items():
            text = text.replace("{{" + name + "}}", value)
        if self.crlf:
            text = text.replace("\r\n", "\n").replace("\n", "\r\n")
        data = text.encode(self.encoding)
        if b"{{length}}" in data:
            body = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
            data = data.replace(b"{{length}}", str(len(body)).encode())
        return data, token


def _sdp(video: bool = False) -> str:
    sdp = ("v=0\no=jdrosen 2890844526 2890842807 IN IP4 {{host}}\ns=-\nc=IN IP4 {{host}}\nt=0 0\n"
           "m=audio {{rtp}} RTP/AVP 0 12\na=rtpmap:0 PCMU/8000\n")
    return sdp + ("m=video 3227 RTP/AVP 31\na=rtpmap:31 LPC\n" if video else "")


SDP = _sdp()

# ---------------------------------------------------------------------------------------------- RFC 4475

# 3.1.1.1 wsinv, "A Short Tortuous INVITE": line folding all over, escaped characters within quotes, an empty
# subject, LWS between colons, header names and values, separators, an unknown header with an unusual value, unknown
# parameters, a Via list in one header, Max-Forwards and CSeq with leading zeros, mixed case. Its To has a tag: a
# request inside a dialog the gateway does not have (481, RFC 3261 §12.2.2) — which it can only say if it parsed it.
_WSINV = """INVITE sip:{{number}};unknownparam SIP/2.0
TO :
 sip:{{number}} ;   tag    = 1918181833n
from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>
  ;
  tag = 98asjd8
MaX-fOrWaRdS: 0068
Call-ID: wsinv.{{id}}@192.0.2.1
Content-Length   : {{length}}
cseq: 0009
  INVITE
Via  : SIP  /   2.0
 /{{transport}}
    {{local}};branch={{branch}}
s :
NewFangledHeader:   newfangled value
 continued newfangled value
UnknownHeaderWithUnusualValue: ;;,,;;,;
Content-Type: application/sdp
Route:
 <sip:services.example.com;lr;unknownwith=value;unknown-no-value>
v:  SIP  / 2.0  / TCP     spindle.example.com   ;
  branch  =   z9hG4bK9ikj8  ,
 SIP  /    2.0   / UDP  192.168.255.111   ; branch=
 z9hG4bK30239
m:"Quoted string \\"\\"" <sip:jdrosen@{{local}}> ; newparam =
      newvalue ;
  secondparam ; q = 0.33

""" + _sdp(video=True)

# 3.1.1.2 intmeth, "Wide Range of Valid Characters": an unknown method made of every token character, in the
# Request-URI every character a user part may hold, quoted-pairs of control characters in a display name, a header
# name of token characters, a Call-ID of word characters. Valid, and an unknown method: 501 (RFC 3261 §8.2.1).
_INTMETH = """!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}-.!%66*_+`'~
To: "BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" <sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>
From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%="\u0440\u0430\u0431\u043e\u0442\u0430\u044e\u0449\u0438\u0439";tag=_token~1'+`*%!-.{{id}}
Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/"][?}{{{id}}
CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~
Max-Forwards: 255
extensionHeader-!.%*+_`'~:\ufeff\u5927\u505c\u96fb
Content-Length: 0

"""

# 3.1.1.3 esc01, "Valid Use of the % Escaping Mechanism": escapes in the Request-URI's user part (here the open
# number, %-escaped: the gateway must unescape it to route the call), in To, From and Contact, and in a Contact
# parameter.
_ESC01 = """INVITE sip:{{user}}@{{target}} SIP/2.0
To: sip:%61lice@example.com
From: <sip:I%20have%20spaces@example.net>;tag={{id}}
Max-Forwards: 87
i: esc01.{{id}}
Content-Length: {{length}}
CSeq: 14398234 INVITE
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Contact: <sip:cal%6Cer@{{local}};%6C%72;n%61me=v%61lue%25%34%31>
Content-Type: application/sdp

""" + SDP

# 3.1.1.4 escnull, "Escaped Nulls in URIs": %00 in a user part and in Contacts. Valid.
_ESCNULL = """{{method}} sip:{{ruser}}@{{target}} SIP/2.0
To: sip:null-%00-null@example.com
From: sip:null-%00-null@example.com;tag={{id}}
Call-ID: escnull.{{id}}
Max-Forwards: 70
CSeq: 14398234 {{method}}
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Contact: <sip:%00@host5.example.com>
Contact: <sip:%00%00@host5.example.com>
L:0

"""

# 3.1.1.5 esc02, "Use of % When It Is Not an Escape": % in a method name (a token: RE%47IST%45R is not REGISTER),
# in a display name, in a tag. An unknown method: 501.
_ESC02 = """RE%47IST%45R sip:registrar.example.com SIP/2.0
To: "%Z%45" <sip:resource@example.com>
From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23{{id}}
Call-ID: esc02.{{id}}
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Max-Forwards: 70
Contact: <sip:alias1@host1.example.com>
Contact: <sip:alias%231@host1.example.com>
Contact: <sip:alias2@host2.example.com>
CSeq: 29344 RE%47IST%45R
l: 0

"""

# 3.1.1.6 lwsdisp, "Message with No LWS between Display Name and <".
_LWSDISP = """{{method}} sip:{{number}}@{{target}} SIP/2.0
To: sip:user@example.com
From: caller<sip:caller@example.com>;tag=323{{id}}
Max-Forwards: 70
Call-ID: lwsdisp.{{id}}
CSeq: 2 {{method}}
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Contact: <sip:caller@{{local}}>
Content-Type: application/sdp
l: {{length}}

{{body}}"""

_LONG = "amazinglylongcallername"
# 3.1.1.7 longreq, "Long Values in Header Fields": long display names, user parts, tags, parameter names and values,
# Call-ID, an unknown header, and many Via header fields. Valid; a user that is no number: 404.
_LONGREQ = (
    "INVITE sip:" + "longreq.one" + "really" * 40 + "@{{target}} SIP/2.0\n"
    "To: \"I have a user name of " + "extreme" * 20 + " proportion\" <sip:longreq.one" + "really" * 40
    + "@example.com:6000;unknownparam1=very" + "long" * 20 + "value;longparam" + "name" * 25 + "=shortvalue;"
    "very" + "long" * 25 + "ParameterNameWithNoValue>\n"
    "F: sip:" + _LONG * 15 + "@example.net;tag=12" + "982424" * 40 + "{{id}}\n"
    "Call-ID: longreq." + "onereallyreallyreallylongcallid" * 20 + "{{id}}\n"
    "CSeq: 3882340 INVITE\n"
    "Unknown-" + "Long" * 20 + "-Name: unknown-" + "long" * 20 + "-value; unknown-" + "long" * 20
    + "-parameter-name = unknown-" + "long" * 20 + "-parameter-value\n"
    "Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}\n"
    + "".join(f"Via: SIP/2.0/TCP sip{n}.example.com;branch=z9hG4bK{n}{'x' * 30}\n" for n in range(1, 30))
    + "Max-Forwards: 70\n"
    "Contact: <sip:" + _LONG * 15 + "@{{local}}>\n"
    "Content-Type: application/sdp\n"
    "l: {{length}}\n\n" + SDP)

# 3.1.1.8 dblreq, "Extra Trailing Octets in a UDP Datagram": a request with Content-Length 0 and, after it in the same
# datagram, an INVITE: the trailing octets are discarded (RFC 3261 §18.3), so the first request alone is answered.
_DBLREQ = """{{method}} sip:{{number}}@{{target}} SIP/2.0
To: sip:j.user@example.com
From: sip:j.user@example.com;tag=43251j3j324
Max-Forwards: 8
I: dblreq.{{id}}
Contact: sip:j.user@{{local}}
CSeq: 8 {{method}}
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Content-Length: 0

INVITE sip:joe@example.com SIP/2.0
t: sip:joe@example.com
From: sip:caller@example.net;tag=141334
Max-Forwards: 8
Call-ID: dblreq.trailing.{{id}}
CSeq: 193942 INVITE
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Content-Type: application/sdp
Content-Length: 150

""" + SDP

# 3.1.1.9 semiuri, "Semicolon-Separated Parameters in URI User Part".
_SEMIURI = """OPTIONS sip:user;par=u%40example.net@{{target}} SIP/2.0
To: sip:j_user@example.com
From: sip:caller@example.org;tag=33242{{id}}
Max-Forwards: 3
Call-ID: semiuri.{{id}}
CSeq: 8 OPTIONS
Accept: application/sdp, application/pkcs7-mime,
        multipart/mixed, multipart/signed,
        message/sip, message/sipfrag
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
l: 0

"""

# 3.1.1.10 transports, "Varied and Unknown Transport Types": Via values over SCTP, TLS, an unknown transport and
# TCP below the top one. Valid.
_TRANSPORTS = """OPTIONS sip:user@{{target}} SIP/2.0
To: sip:user@example.com
From: <sip:caller@example.com>;tag=323{{id}}
Max-Forwards: 70
Call-ID: transports.{{id}}
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf
Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj
Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en
Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee
CSeq: 3882340 OPTIONS
l: 0

"""

# 3.1.1.11 mpart01, "Multipart MIME Message": an INVITE whose body is multipart/mixed, an SDP part and a signature
# part of binary octets. Valid: the gateway must find the SDP in it.
_SIGNATURE = "".join(chr(b) for b in bytes(range(256))[::-1]) + "\x30\x82\x01\x2e\x06\x09\x2a\x86\x48\x86\xf7\x0d"
_MPART01 = """INVITE sip:{{number}}@{{target}} SIP/2.0
To: sip:j.user@example.com
From: sip:caller@example.net;tag=2234923{{id}}
Max-Forwards: 70
Call-ID: mpart01.{{id}}
CSeq: 154 INVITE
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Contact: <sip:caller@{{local}}>
Content-Type: multipart/mixed;boundary=7a9cbec02ceef655
MIME-Version: 1.0
Content-Length: {{length}}

--7a9cbec02ceef655
Content-Type: application/sdp
Content-Transfer-Encoding: binary

""" + SDP + """
--7a9cbec02ceef655
Content-Type: application/octet-stream
Content-Transfer-Encoding: binary

""" + _SIGNATURE + """
--7a9cbec02ceef655--
"""

# 3.1.1.12 unreason, "Unusual Reason Phrase" (UTF-8), and 3.1.1.13 noreason, "Empty Reason Phrase": responses to
# nothing the gateway sent. A response is never answered.
_UNREASON = """SIP/2.0 200 = 2**3 * 5**2 \u043d\u043e \u0441\u0442\u043e \u0434\u0435\u0432\u044f\u043d\u043e\u0441\u0442\u043e \u0434\u0435\u0432\u044f\u0442\u044c - \u043f\u0440\u043e\u0441\u0442\u043e\u0435
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Call-ID: unreason.{{id}}
CSeq: 1 INVITE
From: <sip:user@example.com>;tag=39ansfi3
To: <sip:user@example.edu>;tag=902jndnke3
Content-Length: 0
Contact: <sip:user@host198.example.edu;transport=udp>

"""
_NOREASON = "SIP/2.0 100 \n" + _UNREASON.split("\n", 1)[1].replace("unreason.", "noreason.")

# 3.1.2.1 badinv01, "Extraneous Header Field Separators": empty Via and Contact parameters. Invalid: 400.
_BADINV01 = """INVITE sip:user@{{target}} SIP/2.0
To: sip:j.user@example.com
From: sip:caller@example.net;tag=134161461246
Max-Forwards: 7
Call-ID: badinv01.{{id}}
CSeq: 8 INVITE
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}};;,;,,
Contact: "Joe" <sip:joe@example.org>;;;;
Content-Length: {{length}}
Content-Type: application/sdp

""" + SDP

# 3.1.2.2 clerr, "Content Length Larger Than Message": over UDP a 400 (RFC 3261 §18.3); over TCP the gateway waits for
# the rest of the body, which never comes.
_CLERR = """INVITE sip:user@{{target}} SIP/2.0
Max-Forwards: 80
To: sip:j.user@example.com
From: sip:caller@example.net;tag=93942939o2
Contact: <sip:caller@{{local}}>
Call-ID: clerr.{{id}}
CSeq: 8 INVITE
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Content-Type: application/sdp
Content-Length: 9999

""" + SDP

# 3.1.2.3 ncl, "Negative Content-Length": 400.
_NCL = _CLERR.replace("clerr.", "ncl.").replace("Content-Length: 9999", "Content-Length: -999")

# 3.1.2.4 scalar02, "Request Scalar Fields with Overlarge Values": a CSeq of 2**65, an expires of 2**48. 400.
_SCALAR02 = """{{method}} sip:{{number}}@{{target}} SIP/2.0
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Max-Forwards: 255
From: <sip:user@example.com>;tag=239232jh3
To: <sip:user@example.com>
Call-ID: scalar02.{{id}}
CSeq: 36893488147419103232 {{method}}
Contact: <sip:user@{{local}}>
  ;expires=280297596632815
l: 0

"""

# 3.1.2.5 scalarlg, "Response Scalar Fields with Overlarge Values": a response: not answered.
_SCALARLG = """SIP/2.0 503 Service Unavailable
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}};received=192.0.2.129
To: <sip:user@example.com>
From: <sip:other@example.net>;tag=2easdjfejw
CSeq: 9292394834772304023312 OPTIONS
Call-ID: scalarlg.{{id}}
Retry-After: 949302838503028349304023988
Warning: 1812 overture "In Progress"
Content-Length: 0

"""

_PLAIN = """{{method}} {{ruri}} SIP/2.0
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Max-Forwards: 70
To: {{to}}
From: {{from}};tag={{id}}
Call-ID: {{name}}.{{id}}
CSeq: {{cseq}}
Contact: <sip:caller@{{local}}>
{{headers}}Content-Length: {{length}}

{{body}}"""


def _plain(name: str, method: str = "OPTIONS", ruri: str = "sip:{{number}}@{{target}}", *, number: str = "{{unknown}}",
           to: str = "<sip:user@example.com>", from_: str = "<sip:caller@example.net>", cseq: str | None = None,
           headers: str = "", body: str = "", first_line: str | None = None) -> str:
    """A plain request with one oddity put in by the caller (a header, the request line, a value)."""
    text = _PLAIN
    if first_line is not None:
        text = first_line + "\n" + text.split("\n", 1)[1]
    if body and "Content-Type" not in headers:
        headers += "Content-Type: application/sdp\n"
    for key, value in (("{{method}}", method), ("{{ruri}}", ruri), ("{{to}}", to), ("{{from}}", from_),
                       ("{{cseq}}", cseq or f"1 {method}"), ("{{headers}}", headers), ("{{body}}", body),
                       ("{{name}}", name)):
        text = text.replace(key, value)
    return text.replace("{{number}}", number)


def _with_user(template: str, **values: str) -> str:
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", value)
    return template


RFC4475: list[Case] = [
    # 3.1.1 valid messages
    Case("wsinv", _with_user(_WSINV, number="vivekg@chair-dnrc.example.com"), 481,
         "3.1.1.1: valid; its To tag names a dialog the gateway does not have: 481 (RFC 3261 §12.2.2)"),
    Case("wsinv-new-call",
         _with_user(_WSINV.replace(" ;   tag    = 1918181833n", ""), number="{{open}}@{{target}}"), 200,
         "3.1.1.1 without the To tag, to the open number: answered as any INVITE is", call=True),
    Case("intmeth", _INTMETH, 501, "3.1.1.2: valid, an unknown method: 501 Not Implemented (RFC 3261 §8.2.1)",
         reason="Not Implemented"),
    Case("esc01", _with_user(_ESC01, user="sips%3Auser%40example.com"), 404,
         "3.1.1.3: valid; the user part unescaped (sips:user@example.com) is no number: 404"),
    Case("esc01-open-number", _with_user(_ESC01, user="%2B1415555%30186"), 200,
         "3.1.1.3 to the open number, %-escaped: unescaped, it is the open number's call", call=True),
    Case("escnull", _with_user(_ESCNULL, method="REGISTER", ruser="example.com"), 405,
         "3.1.1.4: valid; REGISTER is not a method the gateway takes: 405 with Allow"),
    Case("escnull-options", _with_user(_ESCNULL, method="OPTIONS", ruser="null-%00-null"), 200,
         "3.1.1.4 as OPTIONS: %00 in the Request-URI and Contacts is valid"),
    Case("escnull-invite", _with_user(_ESCNULL, method="INVITE", ruser="null-%00-null"), 404,
         "3.1.1.4 as INVITE: the user part unescaped holds a NUL and is no number: 404"),
    Case("esc02", _ESC02, 501, "3.1.1.5: RE%47IST%45R is a method of its own, not REGISTER: 501"),
    Case("lwsdisp", _with_user(_LWSDISP, method="OPTIONS", number="{{unknown}}", body=""), 200,
         "3.1.1.6: valid (no LWS between display name and <)"),
    Case("lwsdisp-open-number", _with_user(_LWSDISP, method="INVITE", number="{{open}}", body=SDP), 200,
         "3.1.1.6 as an INVITE to the open number", call=True),
    Case("longreq", _LONGREQ, 404, "3.1.1.7: valid (long values, 30 Via header fields); no such number: 404"),
    Case("dblreq", _with_user(_DBLREQ, method="REGISTER", number="{{unknown}}"), 405,
         "3.1.1.8: the trailing INVITE in the datagram is discarded; the REGISTER alone is answered",
         transports=("UDP",), extra_calls=("dblreq.trailing.",)),
    Case("dblreq-options", _with_user(_DBLREQ, method="OPTIONS", number="{{unknown}}"), 200,
         "3.1.1.8 with an OPTIONS first: answered 200, the trailing INVITE discarded",
         transports=("UDP",), extra_calls=("dblreq.trailing.",)),
    Case("semiuri", _SEMIURI, 200, "3.1.1.9: valid (semicolons in the user part)"),
    Case("transports", _TRANSPORTS, 200, "3.1.1.10: valid (SCTP, TLS, unknown transports in Via)"),
    Case("mpart01", _with_user(_MPART01, number="{{unknown}}"), 404,
         "3.1.1.11: valid multipart body; no such number: 404", encoding="latin-1"),
    Case("mpart01-open-number", _with_user(_MPART01, number="{{open}}"), 200,
         "3.1.1.11 to the open number: the SDP part of the multipart body is the offer", encoding="latin-1",
         call=True),
    Case("unreason", _UNREASON, NO_ANSWER, "3.1.1.12: a response (UTF-8 reason phrase) is never answered"),
    Case("noreason", _NOREASON, NO_ANSWER, "3.1.1.13: a response (empty reason phrase) is never answered"),
    # 3.1.2 invalid messages
    Case("badinv01", _BADINV01, 400, "3.1.2.1: empty Via and Contact parameters: 400"),
    Case("clerr", _CLERR, 400, "3.1.2.2: Content-Length past the datagram: 400 (RFC 3261 §18.3)",
         tcp_expect=NO_ANSWER),
    Case("ncl", _NCL, 400, "3.1.2.3: a negative Content-Length: 400", reason="Content-Length"),
    Case("scalar02", _with_user(_SCALAR02, method="REGISTER", number="{{unknown}}"), 400,
         "3.1.2.4: CSeq 2**65 overflows CSeq's 32 bits: 400", reason="CSeq"),
    Case("scalar02-options", _with_user(_SCALAR02, method="OPTIONS", number="{{unknown}}"), 400,
         "3.1.2.4 as OPTIONS: 400", reason="CSeq"),
    Case("scalar02-invite", _with_user(_SCALAR02, method="INVITE", number="{{open}}"), 400,
         "3.1.2.4 as an INVITE to the open number: 400, no call", reason="CSeq"),
    Case("scalarlg", _SCALARLG, NO_ANSWER, "3.1.2.5: a response with overlarge values is never answered"),
    Case("quotbal", _plain("quotbal", "INVITE", to='"Mr. J. User <sip:j.user@example.com>', body=SDP), 400,
         "3.1.2.6: an unterminated quoted string in To: 400"),
    Case("ltgtruri", _plain("ltgtruri", "INVITE", ruri="<sip:{{number}}@{{target}}>", body=SDP), 400,
         "3.1.2.7: <> around the Request-URI: 400 (a syntax error, not a scheme the gateway does not know)"),
    Case("lwsruri", _plain("lwsruri", "INVITE", ruri="sip:{{number}}@{{target}}; lr", body=SDP), 400,
         "3.1.2.8: LWS inside the Request-URI: 400"),
    Case("lwsstart", _plain("lwsstart", "INVITE", body=SDP,
                            first_line="INVITE  sip:{{number}}@{{target}}  SIP/2.0"), frozenset({400, 404}),
         "3.1.2.9: several SPs between the request line's elements: 400, or (liberal) ignored: no such number, 404"),
    Case("trws", _plain("trws", first_line="OPTIONS sip:{{number}}@{{target}} SIP/2.0  "), frozenset({200, 400}),
         "3.1.2.10: SPs after the request line's version: 400, or (liberal) ignored: 200"),
    Case("escruri", _plain("escruri", "INVITE", ruri="sip:{{number}}@{{target}}?Route=%3Csip:example.com%3E",
                           body=SDP), frozenset({400, 404}),
         "3.1.2.11: headers in a Request-URI (RFC 3261 §19.1.5): 400, or (liberal) ignored: no such number, 404"),
    Case("baddate", _plain("baddate", headers="Date: Fri, 01 Jan 2010 16:00:00 EST\n"), frozenset({200, 400}),
         "3.1.2.12: a Date not in GMT: a UA that does not use Date may answer as usual, or 400"),
    Case("regbadct", _plain("regbadct", "REGISTER", ruri="sip:{{gateway}}",
                            headers="Contact: sip:user@example.com?Route=%3Csip:sip.example.com%3E\n"),
         frozenset({400, 405}), "3.1.2.13: a Contact URI with headers not in <>: 400 (or 405: no REGISTER here)"),
    Case("badaspec", _plain("badaspec", from_='"Bell, Alexander" <sip:a.g.bell@ bell-tel.com>'), 400,
         "3.1.2.14: a space inside an addr-spec: 400"),
    Case("baddn", _plain("baddn", from_="Bell, Alexander <sip:a.g.bell@bell-tel.com>"), frozenset({200, 400}),
         "3.1.2.15: non-token characters in an unquoted display name: 'reasonable' to reject (400); pjsip reads "
         "the display name liberally"),
    Case("badvers", _plain("badvers", first_line="OPTIONS sip:{{number}}@{{target}} SIP/7.0"), 505,
         "3.1.2.16: SIP/7.0: 505 Version Not Supported"),
    Case("badvers-invite", _plain("badvers", "INVITE", body=SDP,
                                  first_line="INVITE sip:{{open}}@{{target}} SIP/1.0"), 505,
         "3.1.2.16 as an INVITE to the open number in SIP/1.0: 505, no call"),
    Case("mismatch01", _plain("mismatch01", cseq="1 INVITE"), 400,
         "3.1.2.17: request line OPTIONS, CSeq INVITE: 400", reason="CSeq"),
    Case("mismatch02", _plain("mismatch02", "NEWMETHOD", cseq="1 INVITE", body=SDP), 400,
         "3.1.2.18: an unknown method with a CSeq of INVITE: 400, not 501", reason="CSeq"),
    Case("bigcode", _SCALARLG.replace("503 Service Unavailable", "4294967301 better not break the receiver")
         .replace("scalarlg.", "bigcode."), NO_ANSWER, "3.1.2.19: a response with a status of 2**32+5: never answered"),
    # 3.2 transaction layer
    Case("badbranch", _plain("badbranch").replace(";branch={{branch}}", ";branch=z9hG4bK"), 200,
         "3.2.1: a branch that is the magic cookie alone is still a branch: answered", transports=("UDP",)),
    # 3.3 application layer
    Case("insuf", _plain("insuf", "INVITE", body=SDP).replace("To: <sip:user@example.com>\n", "")
         .replace("From: <sip:caller@example.net>;tag={{id}}\n", "").replace("Call-ID: insuf.{{id}}\n", ""), 400,
         "3.3.1: no Call-ID, From or To: 400", reason="Missing"),
    Case("unkscm", _plain("unkscm", ruri="nobodyKnowsThisScheme:totallyopaque-content"), 416,
         "3.3.2: an unknown scheme in the Request-URI: 416"),
    Case("unkscm-invite", _plain("unkscm", "INVITE", ruri="nobodyKnowsThisScheme:{{open}}", body=SDP), 416,
         "3.3.2 as an INVITE: 416, no call"),
    Case("novelsc", _plain("novelsc", ruri="soap.beep://192.0.2.103:3002"), 416,
         "3.3.3: a known but atypical scheme (soap.beep) in the Request-URI: 416"),
    Case("unksm2", _plain("unksm2", "REGISTER", ruri="sip:{{gateway}}", to="isbn:2983792873",
                          from_="<http://www.example.com>", headers="Contact: <name:John_Smith>\n"), 405,
         "3.3.4: unknown schemes in To, From and Contact are valid; REGISTER is not taken: 405"),
    Case("unksm2-options", _plain("unksm2", to="isbn:2983792873", from_="<http://www.example.com>",
                                  headers="Contact: <name:John_Smith>\n").replace(
        "Contact: <sip:caller@{{local}}>\n", ""), 200, "3.3.4 as OPTIONS: valid, answered"),
    Case("bext01", _plain("bext01", headers="Require: nothingSupportedHere, noExtensionsSupportedHere\n"
                                            "Proxy-Require: noProxiesSupportThis, noProxiesSupportThisEither\n"), 420,
         "3.3.5: a Require the UAS does not support: it MUST answer 420 Bad Extension (RFC 3261 §8.2.2.3)"),
    Case("bext01-open-number", _plain("bext01", "INVITE", number="{{open}}", body=SDP,
                                      headers="Require: nothingSupportedHere\n"), 420,
         "3.3.5 as an INVITE to the open number: 420, no call"),
    Case("invut", _plain("invut", "INVITE", number="{{open}}", body="<audio> <pcmu port=\"443\"/> </audio>\n",
                         headers="Content-Type: application/unknownformat\nContent-Disposition: session\n"), 415,
         "3.3.6: an INVITE whose session body is of an unknown type: 415"),
    Case("regaut01", _plain("regaut01", "REGISTER", ruri="sip:{{gateway}}",
                            headers="Authorization: NoOneKnowsThisScheme opaque-data=here\n"), 405,
         "3.3.7: well-formed (an unknown authorization scheme); REGISTER is not taken: 405"),
    Case("regaut01-invite", _plain("regaut01", "INVITE", number="{{open}}", body=SDP,
                                   headers="Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0cnVuayJ9.c2ln\n"),
         200, "3.3.7 as an INVITE to the open number from an allowed source, with an RFC 8898 Bearer credential: "
              "well-formed, and sip_allow admits it whatever its Authorization: a call", call=True),
    Case("multi01", _plain("multi01", "INVITE", body=SDP, headers=(
        "Call-ID: multi01.second.{{id}}@192.0.2.2\nCSeq: 59 INVITE\nTo: sip:user@example.com\n"
        "From: sip:caller@example.net;tag=second{{id}}\nMax-Forwards: 68\n")), 400,
         "3.3.8: two Call-ID, CSeq, To, From and Max-Forwards header fields: 400"),
    Case("mcl01", _plain("mcl01", headers="Content-Type: text/plain\nContent-Length: 2\nl: 3\n", body="foo"), 400,
         "3.3.9: three Content-Length values: 400 (over TCP they make the message's end ambiguous)"),
    Case("bcast", """SIP/2.0 200 OK
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}}
Via: SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23
Call-ID: bcast.{{id}}
CSeq: 2 INVITE
From: <sip:user@example.com>;tag=2366{{id}}
To: <sip:user@example.com>;tag=3433ask
Content-Length: 0

""", NO_ANSWER, "3.3.10: a 200 with a broadcast Via is a response: never answered"),
    Case("zeromf", _plain("zeromf").replace("Max-Forwards: 70", "Max-Forwards: 0"), 200,
         "3.3.11: Max-Forwards 0 at its destination (a UAS): answered"),
    Case("zeromf-invite", _plain("zeromf", "INVITE", body=SDP).replace("Max-Forwards: 70", "Max-Forwards: 0"), 404,
         "3.3.11 as an INVITE: processed (no such number: 404), not 483"),
    Case("cparam01", _plain("cparam01", "REGISTER", ruri="sip:{{gateway}}",
                            headers="Contact: sip:+19725552222@gw1.example.net;unknownparam\n"), 405,
         "3.3.12: a Contact header parameter (no <>); REGISTER is not taken: 405"),
    Case("cparam01-invite", _plain("cparam01", "INVITE", number="{{open}}", body=SDP).replace(
        "Contact: <sip:caller@{{local}}>", "Contact: sip:caller@{{local}};unknownparam"), 200,
         "3.3.12 as an INVITE to the open number: a Contact without <> with a header parameter", call=True),
    Case("cparam02", _plain("cparam02", "REGISTER", ruri="sip:{{gateway}}",
                            headers="Contact: <sip:+19725552222@gw1.example.net;unknownparam>\n"), 405,
         "3.3.13: a Contact URI parameter; REGISTER is not taken: 405"),
    Case("regescrt", _plain("regescrt", "REGISTER", ruri="sip:{{gateway}}",
                            headers="Contact: <sip:user@example.com?Route=%3Csip:sip.example.com%3E>\n"), 405,
         "3.3.14: an escaped header in a Contact URI (valid inside <>); REGISTER is not taken: 405"),
    Case("sdp01", _plain("sdp01", "INVITE", body=SDP, headers="Accept: text/nobodyKnowsThis\n"),
         frozenset({404, 406}), "3.3.15: an Accept without SDP; no such number: 404 (or 406)"),
    # 3.4 backward compatibility
    Case("inv2543", """INVITE sip:{{open}}@{{target}} SIP/2.0
Via: SIP/2.0/UDP {{local}}
From: <sip:+13035551111@ift.client.example.net;user=phone>
Contact: <sip:+13035551111@{{local}};user=phone>
Record-Route: <sip:UserB@example.com;maddr=ss1.example.com>
To: sip:+16505552222@ss1.example.net;user=phone
Call-ID: inv2543.{{id}}
CSeq: 1 INVITE
Content-Type: application/sdp

""" + SDP, 200, "3.4.1: RFC 2543 syntax (no branch, no From tag, no Max-Forwards, no Content-Length over UDP): a "
        "call to the open number", transports=("UDP",), call=True),
    # more of the same kinds, which RFC 4475 names but does not spell out
    Case("invite-without-contact", _plain("nocontact", "INVITE", number="{{open}}", body=SDP).replace(
        "Contact: <sip:caller@{{local}}>\n", ""), 400, "an INVITE MUST carry a Contact (RFC 3261 §8.1.1.8): 400"),
    Case("double-request-uri", _plain("double", first_line="OPTIONS sip:a@{{target}} sip:b@{{target}} SIP/2.0"), 400,
         "two Request-URIs in the request line: 400"),
    Case("version-2.1", _plain("version", first_line="OPTIONS sip:{{unknown}}@{{target}} SIP/2.1"), 505,
         "SIP/2.1: 505"),
    Case("version-lowercase", _plain("version", first_line="OPTIONS sip:{{unknown}}@{{target}} sip/2.0"),
         frozenset({200, 400, 505}), "the version in lower case (the RFC's grammar is case-insensitive): answered"),
    Case("compact-forms-open-number", """INVITE sip:{{open}}@{{target}} SIP/2.0
v: SIP/2.0/{{transport}} {{local}};branch={{branch}}
f: <sip:compact@{{local}}>;tag={{id}}
t: <sip:{{open}}@{{target}}>
i: compact.{{id}}
CSeq: 1 INVITE
m: <sip:compact@{{local}}>
k: timer
s: compact forms only
c: application/sdp
l: {{length}}

""" + SDP, 200, "every header that has a compact form in it: a call like any other", call=True),
    Case("sdp-connection-not-an-address", _plain("sdpnoaddress", "INVITE", number="{{open}}", body=SDP.replace(
        "c=IN IP4 {{host}}", "c=IN IP4 no-such-host.invalid")), 488,
         "an offer whose connection address is no address (nor a name that resolves): no media session can be made "
         "for it, 488 Not Acceptable Here (RFC 3261 §21.4.26), with nothing in the gateway's log but the refusal"),
    Case("sdp-connection-overflowing-address", _plain("sdpbigaddress", "INVITE", number="{{open}}", body=SDP.replace(
        "c=IN IP4 {{host}}", "c=IN IP4 127.18446744073709551616.0.1")), 488,
         "an offer whose IPv4 connection address has an octet of 2**64: 488"),
    Case("invite-on-hold-inactive", _plain("inactive", "INVITE", number="{{open}}", body=SDP + "a=inactive\n"), 200,
         "a call offered on hold with a=inactive (RFC 3264 §5.1; PBXs park calls so): answered, a=inactive (§6.1)",
         call=True, answer_has="a=inactive"),
    Case("sdp-conflicting-directions", _plain("directions", "INVITE", number="{{open}}",
                                              body=SDP + "a=sendrecv\na=sendonly\na=inactive\n"), 200,
         "an offer with three direction attributes: pjmedia takes one (a=inactive); answered", call=True),
    Case("call-id-control-character", _plain("ctl", "INVITE", number="{{open}}", body=SDP).replace(
        "Call-ID: ctl.{{id}}", "Call-ID: ctl.\x12{{id}}"), frozenset({200, 400}),
         "a control character in the Call-ID, outside RFC 3261's grammar: 400 would be right, and pjsip takes it; "
         "taken, the call must work as any other (it was refused 500 after a traceback: the routing store refuses "
         "ids with control characters)", call=True),
    Case("many-headers", _plain("manyheaders", headers="".join(f"X-Header-{n}: value {n}\n" for n in range(300))),
         200, "300 unknown header fields (under sip_max_message_bytes): answered"),
    Case("folded-everything", _plain("folded").replace(": ", ":\n   ").replace(";tag", "\n ;tag"), 200,
         "every header value folded onto a continuation line: valid"),
    Case("tabs-for-spaces", _plain("tabs").replace(": ", ":\t\t"), 200, "tabs as the whitespace after colons: valid"),
    Case("unknown-schemes-in-headers-invite", _plain(
        "unknownschemes", "INVITE", number="{{unknown}}", to="<tel:+15550000000>", from_="<im:caller@example.com>",
        body=SDP), 404, "unknown schemes in To and From of an INVITE: valid; no such number: 404"),
]

# ---------------------------------------------------------------------------------------------- refusals

_INVITE = """INVITE sip:{{number}}@{{target}} SIP/2.0
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}};rport
Max-Forwards: 70
From: <sip:+15551230000@{{host}}>;tag={{id}}
To: <sip:{{number}}@{{target}}>
Call-ID: {{name}}.{{id}}
CSeq: 1 INVITE
Contact: <sip:+15551230000@{{local}}>
User-Agent: corpus
{{headers}}Content-Length: {{length}}

{{body}}"""


def _invite(name: str, number: str, *, body: str = "", headers: str = "") -> str:
    if body:
        headers += "Content-Type: application/sdp\n"
    return (_INVITE.replace("{{name}}", name).replace("{{number}}", number).replace("{{headers}}", headers)
            .replace("{{body}}", body))


def _big_sdp(size: int) -> str:
    """An SDP offer of about ``size`` bytes: many ICE candidates and unknown attributes, as WebRTC gateways send."""
    lines = [SDP.rstrip("\n")]
    n = 0
    while sum(len(line) + 1 for line in lines) < size - 80:
        n += 1
        lines.append(f"a=candidate:{n} 1 UDP {2130706431 - n} 192.0.2.{n % 250 + 1} {10000 + n} typ host "
                     f"generation 0 network-id {n}")
    lines.append("a=x-padding:" + "p" * max(0, size - sum(len(line) + 1 for line in lines) - 14))
    return "\n".join(lines) + "\n"


def _big_header(size: int) -> str:
    """A User-to-User-like header of ``size`` bytes (carriers put customer data there)."""
    return "X-Customer-Data: " + ("0123456789abcdef" * (size // 16 + 1))[:size] + "\n"


# Proxies below the sender's own Via (the template's first): the answer copies them all, back to the top one.
_VIAS = "".join(f"Via: SIP/2.0/UDP proxy{n}.example.net:5060;branch=z9hG4bK-proxy{n}-{{{{id}}}}\n"
                for n in range(1, 40))

_TARGETS = {  # number placeholder, source, the answer
    "unknown": ("{{unknown}}", "127.0.0.1", 404, ""),
    "closed": ("{{closed}}", "127.0.0.1", 480, "Closed"),
    "refused-source": ("{{open}}", REFUSED_SOURCE, 403, ""),
    "open": ("{{open}}", "127.0.0.1", 200, ""),
}


def _refusals() -> list[Case]:
    cases: list[Case] = []
    for target, (number, source, status, reason) in _TARGETS.items():
        call = status == 200
        cases.append(Case(f"delayed-offer-{target}", _invite("delayed", number), status,
                          "an INVITE without SDP (a delayed offer, RFC 3264) is a valid call set-up",
                          source=source, reason=reason, call=call))
        for size in (4_000, 12_000):
            cases.append(Case(f"big-sdp-{size // 1000}k-{target}", _invite("bigsdp", number, body=_big_sdp(size)),
                              status, f"a {size // 1000} KB SDP offer (under sip_max_message_bytes, 16 KB)",
                              source=source, reason=reason, call=call))
            cases.append(Case(f"big-header-delayed-offer-{size // 1000}k-{target}",
                              _invite("bigheader", number, headers=_big_header(size)), status,
                              f"a delayed offer with a {size // 1000} KB header", source=source, reason=reason,
                              call=call))
        cases.append(Case(f"forty-vias-{target}", _invite("vias", number, body=SDP, headers=_VIAS), status,
                          "40 Via header fields (39 proxies on the way): answered like any other request",
                          source=source, reason=reason, call=call))
        for size in (20_000, 60_000):
            cases.append(Case(f"big-sdp-{size // 1000}k-{target}", _invite("bigsdp", number, body=_big_sdp(size)),
                              513, f"a {size // 1000} KB INVITE, over sip_max_message_bytes: 513", source=source,
                              reason="Too Large"))
        cases.append(Case(f"big-header-100k-{target}", _invite("huge", number, headers=_big_header(100_000)), 513,
                          "a 100 KB INVITE over TCP (past pjsip's 64 KB buffer): 513", source=source,
                          transports=("TCP",), reason="Too Large"))
    return cases


REFUSALS = _refusals()

# ---------------------------------------------------------------------------------------------- scanner sweeps

# sipvicious (svmap, svwar) as it sends: no space before '<', From = To, its User-Agent, Accept: application/sdp.
_SIPVICIOUS = """{{method}} sip:{{ext}}@{{gateway}} SIP/2.0
Via: SIP/2.0/{{transport}} {{local}};branch={{branch}};rport
Max-Forwards: 70
To: "{{ext}}"<sip:{{ext}}@{{gateway}}>
From: "{{ext}}"<sip:{{ext}}@{{gateway}}>;tag=6434396633623535313363340131{{id}}
User-Agent: {{ua}}
Call-ID: {{id}}
Contact: sip:{{ext}}@{{local}}
CSeq: 1 {{method}}
Accept: application/sdp
Content-Length: 0

"""
SCANNER_AGENTS = ("friendly-scanner", "sipvicious", "sipcli/v1.8", "sundayddr", "VaxSIPUserAgent/3.1",
                  "pplsip", "sip-scan", "iWar", "SIVuS", "Gulp", "smap", "sipsak 0.9.6")
# Extensions a sweep tries, and the numbers toll fraud dials once it finds a way in (international, premium).
EXTENSIONS = [str(n) for n in range(100, 160)] + ["1000", "1001", "2000", "admin", "test", "guest", "operator", "0",
                                                  "+1", "+14155550100"]
TOLL_FRAUD = ["011972592" + f"{n:06d}" for n in range(5)] + ["00441613" + f"{n:06d}" for n in range(5)] + [
    "9011" + "37052" + f"{n:05d}" for n in range(5)] + ["+88213" + f"{n:07d}" for n in range(5)]


def sweep(method: str, extensions: list[str], expect: Expect, *, source: str = "127.0.0.1",
          agents: tuple[str, ...] = SCANNER_AGENTS) -> list[Case]:
    """A scanner's sweep: ``method`` to each of ``extensions``, User-Agents in turn."""
    return [Case(f"{method.lower()}-{ext}", _SIPVICIOUS.replace("{{method}}", method).replace("{{ext}}", ext)
                 .replace("{{ua}}", agents[i % len(agents)]), expect, "a scanner's probe", source=source)
            for i, ext in enumerate(extensions)]


SWEEPS: dict[str, list[Case]] = {
    # svmap: is there a SIP device? OPTIONS is answered (200) to anyone, as RFC 3261 §11 wants
    "svmap-options": sweep("OPTIONS", EXTENSIONS, 200),
    # svwar: which extensions exist? REGISTER is not taken at all: 405 for every one, so nothing is learnt
    "svwar-register": sweep("REGISTER", EXTENSIONS, 405),
    # svwar -m INVITE from an admitted source: no extension is a number (404)
    "svwar-invite": sweep("INVITE", EXTENSIONS + TOLL_FRAUD, 404),
    # from a source outside sip_allow: 403 before any routing, the open and closed numbers included, so that a
    # stranger cannot tell a number that exists from one that does not
    "svwar-invite-refused-source": sweep("INVITE", EXTENSIONS + TOLL_FRAUD + [OPEN_NUMBER, CLOSED_NUMBER], 403,
                                         source=REFUSED_SOURCE),
}


def cases() -> list[Case]:
    return RFC4475 + REFUSALS


def names_unique() -> bool:
    names = [case.name for case in cases()]
    return len(names) == len(set(names))
