"""Admin API tokens: who a bearer token is, from a file of their SHA-256 hashes.

The file (in production a Kubernetes Secret mounted as a file)::

    operator:                 # reach every tenant
      - sha256:9f86d08...
    tenants:
      acme:                   # reach tenant 'acme' only
        - sha256:2c26b46...

Tokens are 32 random bytes (url-safe base64), so a plain SHA-256 cannot be reversed by guessing and
the file holds nothing that grants access. ``personagate tenants token`` makes one. The file is read
again when it changes (modification time, size or inode: a rotated Secret is an atomic swap of a
symbolic link), so a new or revoked token applies without a restart. A file that cannot be read or
is malformed disables the admin API until it is fixed: a broken rotation must not leave revoked
tokens working. Why it cannot be used (its path, its problems) goes to the gateway's log, never to
clients: the answer they get says only that the admin API is disabled.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from personagate_common.bounded_yaml import describe, load_yaml

from ..tenants.schema import TENANT_ID

log = logging.getLogger(__name__)

UNUSABLE = "admin API disabled: the admin tokens file cannot be used; the gateway's log says why"
HASH = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: the operator (every tenant) or one tenant's admin."""

    tenant: str | None  # None: the operator

    @property
    def operator(self) -> bool:
        return self.tenant is None

    @property
    def name(self) -> str:
        """As recorded in a tenant's history: ``operator`` or ``tenant:<id>``."""
        return "operator" if self.tenant is None else f"tenant:{self.tenant}"

    def may_reach(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


class TokensUnavailable(Exception):
    """The tokens file cannot be used (missing, unreadable, malformed). ``str()`` is what a client may be told;
    ``detail`` says why, for the log and the command line (it may name the file's path)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


@dataclass(frozen=True)
class TokenTable:
    entries: tuple[tuple[bytes, Principal], ...]

    def identify(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, principal in self.entries:  # every entry is compared: no early exit
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh token and the line for the tokens file: (token, ``sha256:<hex>``)."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def parse_tokens(text: str, file: str) -> TokenTable:
    """The token table in ``text``; TokensUnavailable names every problem, one per line."""
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        line, column, message = describe(exc)
        raise TokensUnavailable(f"{file}:{line}:{column}: {message}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TokensUnavailable(f"{file}: expected a mapping with 'operator' and/or 'tenants', got {_kind(data)}")
    problems: list[str] = []
    entries: list[tuple[bytes, Principal]] = []
    for key in data:
        if key not in ("operator", "tenants"):
            problems.append(f"{key}: unknown key; expected 'operator' or 'tenants'")
    entries += _hashes(data.get("operator"), "operator", Principal(None), problems)
    tenants = data.get("tenants") or {}
    if not isinstance(tenants, dict):
        problems.append(f"tenants: expected a mapping of tenant id to token hashes, got {_kind(tenants)}")
        tenants = {}
    for tenant, hashes in tenants.items():
        if not isinstance(tenant, str) or not TENANT_ID.match(tenant):
            problems.append(f"tenants.{tenant}: not a tenant id; expected lower-case letters, digits and '-'")
            continue
        entries += _hashes(hashes, f"tenants.{tenant}", Principal(tenant), problems)
    seen: dict[bytes, Principal] = {}
    for digest, principal in entries:
        if digest in seen and seen[digest] != principal:
            problems.append(f"sha256:{digest.hex()[:12]}...: given to both {seen[digest].name} and {principal.name}; "
                            "expected each token once")
        seen[digest] = principal
    if problems:
        raise TokensUnavailable(f"{file}: " + "; ".join(problems))
    return TokenTable(tuple(entries))


def _hashes(value: Any, where: str, principal: Principal, problems: list[str]) -> list[tuple[bytes, Principal]]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list of 'sha256:<hex>' lines, got {_kind(value)}")
        return []
    found = []
    for index, item in enumerate(value):
        match = HASH.match(item) if isinstance(item, str) else None
        if match is None:
            problems.append(f"{where}[{index}]: expected 'sha256:' and 64 lower-case hex digits (the output of "
                            "'personagate tenants token'), not a token itself")
            continue
        found.append((bytes.fromhex(match.group(1)), principal))
    return found


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text"}.get(type(value), type(value).__name__)


class TokenFile:
    """The tokens file, read again whenever it changes. ``path`` None: the admin API is disabled."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: object = None
        self._table: TokenTable | None = None
        self._error: str | None = None

    def current(self) -> TokenTable:
        """The table as the file says now (blocking: a stat, and a read when it changed)."""
        if self.path is None:
            raise TokensUnavailable("admin API disabled: no admin_tokens_file configured")
        try:
            st = os.stat(self.path)
            stamp: object = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as exc:
            stamp = ("missing", exc.errno)
        with self._lock:
            if stamp != self._stamp:
                self._table, self._error = self._read()
                self._stamp = stamp
                if self._error is not None:  # logged once per change of the file, not once per request
                    log.error("admin API disabled: %s", self._error, extra={"tokens_file": str(self.path)})
            if self._table is None:
                raise TokensUnavailable(UNUSABLE, f"admin API disabled: {self._error}")
            return self._table

    def _read(self) -> tuple[TokenTable | None, str | None]:
        assert self.path is not None
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"cannot read the admin tokens file {self.path} ({exc})"
        try:
            return parse_tokens(text, str(self.path)), None
        except TokensUnavailable as exc:
            return None, f"the admin tokens file is invalid: {exc}"
