"""The live tenant configuration: what new calls are routed with, reloaded when the folder changes.

A change is picked up by polling a cheap fingerprint of the folder (names, sizes, modification times
and inodes, following symbolic links), which also sees Kubernetes' atomic swap of a ConfigMap's
``..data`` link, where file-change notifications on the visible names never fire.

Each tenant is applied on its own: a tenant whose new files are invalid keeps serving its last good
configuration, and its problems are reported (log, metric, admin API) until it is fixed, while other
tenants' changes apply. A call holds the PersonaConfig it started with, so reloads never touch it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..metrics import GatewayMetrics
from .loader import TENANT_FILE, ClipCache, Problem, load_tenant, number_clashes, tenant_folders
from .tenant import PersonaConfig, Rejection, Tenant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TenantStatus:
    """``serving`` (current files), ``serving_previous`` (the files are invalid; the last good
    configuration serves), ``rejected`` (invalid and nothing to fall back on)."""

    state: str
    problems: tuple[Problem, ...] = ()
    applied_at: float | None = None


@dataclass(frozen=True)
class ReloadStatus:
    checked_at: float
    tenants: Mapping[str, TenantStatus] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(not s.problems for s in self.tenants.values())

    @property
    def problems(self) -> list[Problem]:
        return sorted(p for s in self.tenants.values() for p in s.problems)


class TenantRegistry:
    def __init__(self, root: Path, *, poll_seconds: float = 1.0, metrics: GatewayMetrics | None = None) -> None:
        self.root = root
        self.poll_seconds = poll_seconds
        self.metrics = metrics or GatewayMetrics()
        self._clips = ClipCache()
        self._tenants: dict[str, Tenant] = {}
        self._numbers: dict[str, Tenant] = {}
        self._applied_at: dict[str, float] = {}
        self._fingerprint: object = None
        self._lock = threading.Lock()  # one reload at a time (the poll loop and the admin API)
        self.status = ReloadStatus(checked_at=0.0)

    # ------------------------------------------------------------------ reading, for calls

    @property
    def tenants(self) -> Mapping[str, Tenant]:
        return self._tenants

    def route(self, number: str, when: dt.datetime | None = None) -> tuple[Tenant, PersonaConfig | Rejection] | None:
        """The tenant and the answer for a call to ``number`` now (or at ``when``); None if no tenant
        has the number."""
        tenant = self._numbers.get(number)
        if tenant is None:
            return None
        return tenant, tenant.answer(number, when or dt.datetime.now(dt.UTC))

    # ------------------------------------------------------------------ reloading

    def reload(self, *, force: bool = False) -> ReloadStatus:
        """Check the folder and apply what is valid (blocking: file reads and clip decoding). Without
        ``force``, an unchanged folder is not read again."""
        with self._lock:
            fingerprint = self._fingerprint_now()
            if fingerprint == self._fingerprint and not force:
                return self.status
            checked = self._check()
            self._clips.loaded()
            self._fingerprint = fingerprint  # only once checked: a check that fails is tried again
            self._apply(checked)
            return self.status

    def _check(self) -> dict[str, tuple[Tenant | None, list[Problem]]]:
        if not self.root.is_dir():
            problem = Problem(str(self.root), 1, 1, "(folder)", "not found; expected a folder of tenant folders")
            return {"": (None, [problem])}
        # Files are named relative to the tenants folder, as admins know them: "acme/tenant.yaml".
        return {folder.name: load_tenant(folder, self._clips, label=f"{folder.name}/{TENANT_FILE}")
                for folder in tenant_folders(self.root)}

    def _apply(self, checked: dict[str, tuple[Tenant | None, list[Problem]]]) -> None:
        now = time.time()
        previous = self._tenants
        serving = {tid: t for tid, t in previous.items() if tid in checked}  # a removed folder is dropped
        problems = {tid: list(found) for tid, (_, found) in checked.items()}
        pending = {tid: t for tid, (t, _) in checked.items() if t is not None and t is not previous.get(tid)}
        # Apply changed tenants one by one until none more fits: one that takes over a number another
        # tenant gives up in the same change waits for that other tenant to be applied first.
        progress = True
        while pending and progress:
            progress = False
            for tid in sorted(pending):
                others = {o: t for o, t in serving.items() if o != tid}
                if not number_clashes([pending[tid]], fixed=others):
                    serving[tid] = pending.pop(tid)
                    self._applied_at[tid] = now
                    progress = True
        for tid, tenant in pending.items():
            others = {o: t for o, t in serving.items() if o != tid}
            problems[tid] += [p for _, p in number_clashes([tenant], fixed=others)]

        statuses = {}
        for tid, found in problems.items():
            if not found:
                state = "serving"
            elif tid in serving:
                state = "serving_previous"
            else:
                state = "rejected"
            statuses[tid] = TenantStatus(state, tuple(sorted(found)), self._applied_at.get(tid))
        self._tenants = serving
        self._numbers = {number: t for t in serving.values() for number in t.spec.numbers}
        self.status = ReloadStatus(now, statuses)
        self._report(previous, statuses)

    def _report(self, previous: Mapping[str, Tenant], statuses: Mapping[str, TenantStatus]) -> None:
        m = self.metrics
        bad = sum(1 for s in statuses.values() if s.problems)
        result = "applied" if not bad else "partial" if self._tenants else "rejected"
        m.tenant_reloads.labels(result).inc()
        m.tenants_serving.set(len(self._tenants))
        m.tenant_config_errors.clear()
        for tid, status in statuses.items():
            m.tenant_config_errors.labels(tid or "(folder)").set(len(status.problems))
        if not bad:
            m.tenant_last_reload_success.set(self.status.checked_at)
        for tid, status in statuses.items():
            if status.problems:
                log.error("tenant configuration invalid", extra={
                    "tenant": tid, "state": status.state, "problems": [str(p) for p in status.problems]})
            elif previous.get(tid) is not self._tenants.get(tid):
                log.info("tenant configuration applied", extra={
                    "tenant": tid, "personas": sorted(self._tenants[tid].personas),
                    "numbers": sorted(self._tenants[tid].spec.numbers)})
        for tid in set(previous) - set(self._tenants):
            log.info("tenant removed", extra={"tenant": tid})

    def _fingerprint_now(self) -> object:
        entries = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                entries.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(entries)

    async def watch(self) -> None:
        """Poll the folder and apply changes until cancelled. A failing check is logged and retried."""
        while True:
            try:
                await asyncio.to_thread(self.reload)
            except Exception:
                log.exception("tenant reload failed")
            await asyncio.sleep(self.poll_seconds)
