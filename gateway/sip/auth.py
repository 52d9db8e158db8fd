"""Digest authentication of inbound INVITEs (RFC 3261 §22, RFC 7616 semantics, RFC 8760 for SHA-256).

pjsua has no server-side authentication for calls, so the gateway does it itself, statelessly: the nonce
carries its own issue time and an HMAC under a per-process secret, so a flood of INVITEs costs no memory.

Contract: no credentials for our realm → 401 (one challenge per algorithm, most preferred first); a wrong
response, unknown user, foreign realm or ``uri`` → 403, never another 401 (a client with a wrong password would
loop); a correct response over an expired, foreign or replayed nonce (``nc`` not raised) → 401 ``stale=true``.
Work is bounded: headers over ``MAX_HEADER_CHARS`` are refused unread, a source with ``FAILURE_LIMIT`` failures
in ``FAILURE_WINDOW_SECONDS`` is refused without hashing, and the source and nonce tables are capped. Passwords
and digests are never logged.

Details: docs/sip.md#admitting-invites-sip_auth_policy.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ALGORITHMS: dict[str, Callable[[bytes], Any]] = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}

MAX_HEADER_CHARS = 2048
FAILURE_LIMIT = 10
FAILURE_WINDOW_SECONDS = 60.0
MAX_TRACKED_SOURCES = 4096
MAX_TRACKED_NONCES = 65536  # nonces that admitted an INVITE, with their highest nc (replay protection)

_NONCE_RANDOM_BYTES = 8
_NONCE_MAC_BYTES = 16
_NONCE_BYTES = 8 + _NONCE_RANDOM_BYTES + _NONCE_MAC_BYTES

# One auth-param: name=token or name="quoted string" (RFC 7616 §3.4, backslash escapes allowed).
_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')
_HEADER_LINE = re.compile(r"^(?:authorization|proxy-authorization)\s*:(.*)$", re.IGNORECASE)


class AuthResult(enum.StrEnum):
    """What became of an INVITE that had to be authenticated (the ``result`` label of ``sip_auth_total``)."""

    OK = "ok"  # a valid response over a fresh nonce: admitted
    CHALLENGED = "challenged"  # no credentials for our realm: 401
    STALE = "stale"  # right password, expired or foreign nonce: 401 stale=true
    REJECTED = "rejected"  # wrong password or unknown user: 403
    INVALID = "invalid"  # malformed, unsupported algorithm/qop, foreign realm, uri mismatch, too long: 403
    THROTTLED = "throttled"  # too many failures from this source lately: 403 without checking


@dataclass(frozen=True)
class AuthDecision:
    result: AuthResult
    username: str | None = None
    why: str = ""  # for the log: never a password or a digest
    algorithm: str | None = None  # of admitted credentials

    @property
    def admitted(self) -> bool:
        return self.result is AuthResult.OK

    @property
    def status(self) -> int:
        """The SIP answer: 0 (admit), 401 (challenge) or 403."""
        if self.result is AuthResult.OK:
            return 0
        return 401 if self.result in (AuthResult.CHALLENGED, AuthResult.STALE) else 403


def hash_hex(algorithm: str, text: str) -> str:
    return ALGORITHMS[algorithm](text.encode("utf-8")).hexdigest()


def digest_response(*, algorithm: str, username: str, realm: str, password: str, method: str, uri: str,
                    nonce: str, nc: str, cnonce: str, qop: str = "auth") -> str:
    """The ``response`` of RFC 7616 §3.4.1 for qop=auth: H(H(A1):nonce:nc:cnonce:qop:H(A2))."""
    ha1 = hash_hex(algorithm, f"{username}:{realm}:{password}")
    ha2 = hash_hex(algorithm, f"{method}:{uri}")
    return hash_hex(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def parse_digest(value: str) -> dict[str, str] | None:
    """The parameters of a ``Digest`` credentials or challenge value (names lower-case); None when it is not
    Digest or not well formed."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None or match.end() == position:
            return None
        name = match.group(1).lower()
        if name in params:
            return None
        quoted = match.group(2)
        params[name] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else match.group(3)
        position = match.end()
    return params


def authorization_headers(message: str) -> list[str]:
    """The values of the ``Authorization`` headers of a SIP message (header section only, folded lines
    joined). ``Proxy-Authorization`` is included: some trunks answer a 401 with it."""
    head = message.split("\r\n\r\n", 1)[0]
    head = re.sub(r"\r\n[ \t]+", " ", head)
    values = []
    for line in head.split("\r\n")[1:]:
        match = _HEADER_LINE.match(line)
        if match:
            values.append(match.group(1).strip())
    return values


def request_uri(message: str) -> str | None:
    first = message.split("\r\n", 1)[0].split(" ")
    return first[1] if len(first) == 3 else None


def same_resource(digest_uri: str, request: str | None) -> bool:
    """The ``uri`` of the credentials names the Request-URI: equal, or equal without its user part (some UAs,
    sipp among them, sign ``sip:host:port`` for ``sip:number@host:port``)."""
    if request is None:
        return False
    if digest_uri == request:
        return True
    scheme, _, rest = request.partition(":")
    return "@" in rest and digest_uri == f"{scheme}:{rest.split('@', 1)[1]}"


class NonceIssuer:
    """Stateless, expiring nonces: valid when this issuer made them and they are younger than ``lifetime``."""

    def __init__(self, lifetime: float, secret: bytes | None = None, clock: Callable[[], float] = time.time) -> None:
        self.lifetime = lifetime
        self._secret = secret or secrets.token_bytes(32)
        self._clock = clock

    def issue(self) -> str:
        body = struct.pack(">Q", int(self._clock())) + secrets.token_bytes(_NONCE_RANDOM_BYTES)
        return base64.urlsafe_b64encode(body + self._mac(body)).decode("ascii").rstrip("=")

    def check(self, nonce: str) -> str:
        """``"fresh"``, ``"expired"`` (ours, too old, or from the future) or ``"foreign"`` (not ours)."""
        if len(nonce) > 64:
            return "foreign"
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except ValueError:
            return "foreign"
        if len(raw) != _NONCE_BYTES:
            return "foreign"
        body, mac = raw[:-_NONCE_MAC_BYTES], raw[-_NONCE_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return "foreign"
        age = self._clock() - struct.unpack(">Q", body[:8])[0]
        return "fresh" if -5 <= age <= self.lifetime else "expired"

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:_NONCE_MAC_BYTES]


class FailureTracker:
    """Recent authentication failures per source address, in a capped table."""

    def __init__(self, limit: int = FAILURE_LIMIT, window: float = FAILURE_WINDOW_SECONDS,
                 capacity: int = MAX_TRACKED_SOURCES, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.capacity = capacity
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, source: str) -> bool:
        times = self._failures.get(source)
        if times is None:
            return False
        horizon = self._clock() - self.window
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self._failures[source]
            return False
        return len(times) >= self.limit

    def failed(self, source: str) -> None:
        times = self._failures.pop(source, None) or deque(maxlen=self.limit)
        times.append(self._clock())
        self._failures[source] = times  # most recent last
        while len(self._failures) > self.capacity:
            self._failures.popitem(last=False)


class DigestAuthenticator:
    """Challenges and verifies INVITEs for ``realm`` against ``users`` (username → password)."""

    def __init__(self, realm: str, users: Mapping[str, str], *, algorithms: Sequence[str] = ("SHA-256", "MD5"),
                 nonce_seconds: float = 300.0, nonces: NonceIssuer | None = None,
                 failures: FailureTracker | None = None) -> None:
        unknown = [a for a in algorithms if a not in ALGORITHMS]
        if unknown or not algorithms:
            raise ValueError(f"digest algorithms must be among {sorted(ALGORITHMS)}, got {list(algorithms)}")
        self.realm = realm
        self._users = dict(users)
        self.algorithms = tuple(algorithms)
        self.nonces = nonces or NonceIssuer(nonce_seconds)
        self.failures = failures or FailureTracker()
        self._counts: OrderedDict[str, int] = OrderedDict()  # nonce → the highest nc it admitted

    def challenges(self, *, stale: bool = False) -> list[str]:
        """``WWW-Authenticate`` values, one per algorithm, sharing one fresh nonce."""
        nonce = self.nonces.issue()
        tail = ", stale=true" if stale else ""
        return [f'Digest realm="{_quote(self.realm)}", nonce="{nonce}", algorithm={algorithm}, qop="auth"{tail}'
                for algorithm in self.algorithms]

    def verify(self, message: str, method: str, source: str) -> AuthDecision:
        """Decide on a request (its whole text) from ``source`` (an IP address)."""
        if self.failures.blocked(source):
            return AuthDecision(AuthResult.THROTTLED, why=f"more than {self.failures.limit} failures from {source} "
                                                          f"in {self.failures.window:g} s")
        decision = self._verify(message, method)
        if decision.result in (AuthResult.REJECTED, AuthResult.INVALID):
            self.failures.failed(source)
        return decision

    def _verify(self, message: str, method: str) -> AuthDecision:
        credentials = None
        for value in authorization_headers(message)[:4]:
            if len(value) > MAX_HEADER_CHARS:
                return AuthDecision(AuthResult.INVALID, why=f"Authorization longer than {MAX_HEADER_CHARS} characters")
            params = parse_digest(value)
            if params is None:
                continue  # another scheme, or not ours to judge
            credentials = params
            if params.get("realm") == self.realm:
                break
        if credentials is None:
            return AuthDecision(AuthResult.CHALLENGED, why="no Digest credentials")
        username = credentials.get("username", "")
        if credentials.get("realm") != self.realm:
            return AuthDecision(AuthResult.INVALID, username, f"realm {credentials.get('realm')!r} is not ours")
        missing = [p for p in ("username", "nonce", "uri", "response", "nc", "cnonce") if not credentials.get(p)]
        if missing:
            return AuthDecision(AuthResult.INVALID, username, "missing " + ", ".join(missing))
        algorithm = credentials.get("algorithm", "MD5")
        algorithm = next((a for a in self.algorithms if a.lower() == algorithm.lower()), algorithm)
        if algorithm not in self.algorithms:
            return AuthDecision(AuthResult.INVALID, username, f"algorithm {algorithm[:32]!r} not offered")
        if credentials.get("qop", "").lower() != "auth":
            return AuthDecision(AuthResult.INVALID, username, "qop is not auth")
        if not same_resource(credentials["uri"], request_uri(message)):
            return AuthDecision(AuthResult.INVALID, username, "uri is not the Request-URI")
        password = self._users.get(username)
        # An unknown user costs the same hashing as a known one, and is refused the same way.
        expected = digest_response(
            algorithm=algorithm, username=username, realm=self.realm, password=password or secrets.token_hex(8),
            method=method, uri=credentials["uri"], nonce=credentials["nonce"], nc=credentials["nc"],
            cnonce=credentials["cnonce"])
        if password is None or not hmac.compare_digest(expected.encode(), credentials["response"].lower().encode()):
            return AuthDecision(AuthResult.REJECTED, username, "unknown user" if password is None else "wrong response")
        nonce = self.nonces.check(credentials["nonce"])
        if nonce != "fresh":
            return AuthDecision(AuthResult.STALE, username, f"{nonce} nonce")
        try:
            count = int(credentials["nc"], 16)
        except ValueError:
            return AuthDecision(AuthResult.INVALID, username, "nc is not hexadecimal")
        if count <= self._counts.get(credentials["nonce"], 0):
            return AuthDecision(AuthResult.STALE, username, "nonce count not raised: a replayed INVITE")
        self._counts[credentials["nonce"]] = count
        self._counts.move_to_end(credentials["nonce"])
        while len(self._counts) > MAX_TRACKED_NONCES:
            self._counts.popitem(last=False)
        return AuthDecision(AuthResult.OK, username, algorithm=algorithm)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
