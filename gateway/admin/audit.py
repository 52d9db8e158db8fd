"""The admin API's audit log: who changed (or tried to change) what, from where, with what result.

Entries are kept in memory, newest last, in two bounded rings: *changes* (every write attempt through the
API — persona PUT/DELETE, clip upload, rollback, reload — applied or refused) and *refused logins* (unknown
tokens and throttled attempts). Two rings, so that a flood of wrong tokens cannot push the record of real
changes out. Each entry is also logged (``admin audit``, structured), which is where a durable copy lives.

Who reads what: the operator every entry; a tenant admin only entries about its own tenant, with other
tenants' admins shown as ``another tenant``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable

from pydantic import BaseModel

log = logging.getLogger(__name__)

OTHER_TENANT = "another tenant"


class AuditEntry(BaseModel):
    seq: int  # increasing: the order entries were recorded in
    time: float  # Unix time
    actor: str | None  # operator, tenant:<id>; None: no known token
    source: str  # the client's address
    action: str  # put_persona, delete_persona, put_clip, rollback, reload, login
    tenant: str | None  # the tenant the request was about, where it names one
    target: str | None  # the persona, the clip's path, or the version rolled back to
    status: int  # the HTTP status answered
    result: str  # applied, unchanged, refused
    version: int | None = None  # the version written
    detail: str | None = None  # why it was refused


class AuditLog:
    """Bounded: the last ``changes`` write attempts and the last ``logins`` refused logins."""

    def __init__(self, changes: int = 10_000, logins: int = 1_000, clock: Callable[[], float] = time.time) -> None:
        self._changes: collections.deque[AuditEntry] = collections.deque(maxlen=changes)
        self._logins: collections.deque[AuditEntry] = collections.deque(maxlen=logins)
        self._clock = clock
        self._seq = itertools.count(1)

    def record(self, *, actor: str | None, source: str, action: str, tenant: str | None, target: str | None,
               status: int, result: str, version: int | None = None, detail: str | None = None) -> AuditEntry:
        entry = AuditEntry(seq=next(self._seq), time=self._clock(), actor=actor, source=source, action=action, tenant=tenant,
                           target=target, status=status, result=result, version=version,
                           detail=detail[:300] if detail else None)
        (self._logins if action == "login" else self._changes).append(entry)
        # A throttled guesser's every attempt is an entry; at info level they would flood the log.
        log.log(logging.DEBUG if entry.status == 429 else logging.INFO, "admin audit", extra=entry.model_dump())
        return entry

    def read(self, viewer_tenant: str | None, *, tenant: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first, at most ``limit``: all entries for the operator (``viewer_tenant`` None), or those about
        ``viewer_tenant`` with other tenants' admins not named; ``tenant`` narrows to one tenant."""
        entries = sorted([*self._changes, *self._logins], key=lambda e: e.seq, reverse=True)
        out: list[AuditEntry] = []
        for entry in entries:
            if tenant is not None and entry.tenant != tenant:
                continue
            if viewer_tenant is not None:
                if entry.tenant != viewer_tenant:
                    continue
                if entry.actor not in (None, "operator", f"tenant:{viewer_tenant}"):
                    entry = entry.model_copy(update={"actor": OTHER_TENANT})
            out.append(entry)
            if len(out) >= limit:
                break
        return out
