"""The internal plane between gateways and workers: the shared secret a gateway proves itself with, and TLS.

A worker serves sessions (``/v1/sessions``) and its ``/v1/info`` only to callers that send one of its accepted
secrets as ``Authorization: Bearer <secret>`` (``SecretChecker``); a gateway sends its secret on every session
and poll, and verifies ``wss://``/``https://`` workers against a CA file of its choosing (``WorkerAuth``). The
worker accepts several secrets at once so that one can be rotated without a moment where gateways and workers
disagree. No pjsua and no model here: both the worker's and the gateway's settings use it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MIN_SECRET_CHARS = 16  # 16 random characters or more: a guess is hopeless, a typo or a placeholder is refused
AuthResult = Literal["ok", "missing", "wrong"]


def new_secret() -> str:
    """A fresh shared secret: 43 URL-safe characters (256 random bits)."""
    return secrets.token_urlsafe(32)


def check_secret(setting: str, secret: str) -> str:
    """``secret`` as a usable shared secret (surrounding blanks removed); else a ValueError naming ``setting``.
    Never puts the secret itself in the message."""
    secret = secret.strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"{setting}: a shared secret is at least {MIN_SECRET_CHARS} characters "
                         f"(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in secret):
        raise ValueError(f"{setting}: a shared secret has no spaces or control characters (it travels in an "
                         "HTTP header)")
    return secret


def read_secrets(setting: str, path: Path) -> list[str]:
    """The secrets in ``path``: one per line, blank lines and ``#`` comments skipped (a Kubernetes Secret's key
    mounted as a file holds one). At least one; a ValueError naming ``setting`` otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{setting} {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{setting} {str(path)!r}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    found = [check_secret(f"{setting} {str(path)!r} line {n}", line)
             for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise ValueError(f"{setting} {str(path)!r}: no secret in it")
    return found


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600), replacing it in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def bearer(secret: str) -> dict[str, str]:
    """The request header that carries ``secret``."""
    return {"Authorization": f"Bearer {secret}"}


class SecretChecker:
    """Checks the ``Authorization`` header of a request against the accepted secrets, in constant time.

    Each candidate is compared with every accepted secret through their SHA-256 digests (equal lengths, so
    ``hmac.compare_digest`` takes the same time whatever the guess), and all of them are compared every time,
    so the time taken tells nothing about which secret, or how much of one, was right."""

    def __init__(self, accepted: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(s.encode()).digest() for s in accepted)

    @property
    def enabled(self) -> bool:
        """False when no secret is accepted: every request passes (the worker was started open on purpose)."""
        return bool(self._digests)

    def check(self, headers: Mapping[str, str]) -> AuthResult:
        """``ok``, ``missing`` (no bearer credential) or ``wrong`` for a request with these ``headers``."""
        if not self._digests:
            return "ok"
        scheme, _, credential = (headers.get("authorization") or "").strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return "missing"
        digest = hashlib.sha256(credential.encode(errors="surrogateescape")).digest()
        matched = False
        for accepted in self._digests:
            matched |= hmac.compare_digest(digest, accepted)
        return "ok" if matched else "wrong"


@dataclass(frozen=True)
class WorkerAuth:
    """How a gateway (or ``personagate session``) reaches workers: the secret it sends, and for ``wss://`` and
    ``https://`` workers the CA certificates their certificates must chain to (None: the system's)."""

    secret: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict, compare=False, repr=False)

    def headers(self) -> dict[str, str]:
        return bearer(self.secret) if self.secret else {}

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context for workers: certificates checked, host names checked (one per instance)."""
        context = self._contexts.get("client")
        if context is None:
            context = self._contexts["client"] = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None)
        return context

    def ssl_for(self, url: str) -> ssl.SSLContext | None:
        """The TLS context for ``url``: one for ``wss://`` and ``https://``, None for plain ``ws://``/``http://``."""
        return self.ssl_context() if url.startswith(("wss://", "https://")) else None


def check_server_tls(cert_setting: str, cert_file: Path | None, key_setting: str, key_file: Path | None) -> bool:
    """Server TLS settings given as a pair: True when both are set and load as a certificate and its key, False
    when neither is; a ValueError naming the settings otherwise."""
    from .tls import check_key_pair, check_readable

    if cert_file is None and key_file is None:
        return False
    if cert_file is None or key_file is None:
        given, missing = (cert_setting, key_setting) if key_file is None else (key_setting, cert_setting)
        raise ValueError(f"{given} is set but {missing} is not: TLS needs both")
    check_readable(cert_setting, cert_file)
    check_readable(key_setting, key_file)
    check_key_pair(cert_file, key_file, settings=(cert_setting, key_setting))
    return True


def check_ca_file(setting: str, ca_file: Path) -> Path:
    """``ca_file`` holds CA certificates OpenSSL can load; else a ValueError naming ``setting``."""
    from .tls import check_ca_file as check
    from .tls import check_readable

    check_readable(setting, ca_file)
    check(ca_file, setting=setting)
    return ca_file
