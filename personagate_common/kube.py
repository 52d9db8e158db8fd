"""Keeps ``controller.kubernetes.io/pod-deletion-cost`` on this process's own pod equal to the calls it carries, so
that a scale-in (HPA, KEDA, fewer replicas) deletes the idlest pod first and its drain frees the GPU or edge node
soonest (docs/deploy.md, "Which pod goes on scale-in").

Contract: with the in-cluster credentials and the pod's name and namespace (downward API), the value is written at
start and then when it changes, at most once every ``min_interval`` seconds (each write is an API-server write and
an event to every watcher of the pod), as a merge patch of that one annotation. A failure is logged, counted and
retried at the next change or interval; it never stops the process: without the annotation the ReplicaSet picks by
its other rules. The HTTP request runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIN_INTERVAL_SECONDS = 10.0
CHECK_EVERY_SECONDS = 1.0
REQUEST_TIMEOUT_SECONDS = 5.0


class PodDeletionCostError(Exception):
    """The process cannot keep the annotation (it was asked to): what is missing, for the operator."""


@dataclass(frozen=True)
class PodRef:
    """Where this process's pod is, and how to reach the API server."""

    api: str  # https://host:port
    namespace: str
    name: str
    token_file: Path  # re-read for every request: projected tokens rotate
    ca_file: Path | None  # None: the system's trust store (http:// in tests)

    @classmethod
    def in_cluster(cls, environ: Mapping[str, str] = os.environ, account: Path = SERVICE_ACCOUNT) -> PodRef:
        """From a pod's environment (``POD_NAME``, ``POD_NAMESPACE``, ``KUBERNETES_SERVICE_HOST`` and ``_PORT``)
        and its mounted service account; ``PodDeletionCostError`` naming whatever is missing."""
        missing = [name for name in ("POD_NAME", "POD_NAMESPACE", "KUBERNETES_SERVICE_HOST") if not environ.get(name)]
        token = account / "token"
        if not token.is_file():
            missing.append(f"the service account token ({token}: automountServiceAccountToken)")
        if missing:
            raise PodDeletionCostError("pod_deletion_cost is on, but this is not a pod that may annotate itself: "
                                       f"missing {', '.join(missing)} (deploy/k8s/components/pod-deletion-cost)")
        host = environ["KUBERNETES_SERVICE_HOST"]
        host = f"[{host}]" if ":" in host else host
        ca = account / "ca.crt"
        return cls(api=f"https://{host}:{environ.get('KUBERNETES_SERVICE_PORT', '443')}",
                   namespace=environ["POD_NAMESPACE"], name=environ["POD_NAME"], token_file=token,
                   ca_file=ca if ca.is_file() else None)


class PodDeletionCost:
    """Writes ``count()`` (the calls this process carries) as its pod's deletion cost; ``run()`` until cancelled."""

    def __init__(self, pod: PodRef, count: Callable[[], int], registry: CollectorRegistry, *,
                 min_interval: float = MIN_INTERVAL_SECONDS, check_every: float = CHECK_EVERY_SECONDS) -> None:
        self.pod = pod
        self.count = count
        self.min_interval = min_interval
        self.check_every = check_every
        self.updates = Counter(
            "personagate_pod_deletion_cost_updates_total",
            "Writes of this pod's controller.kubernetes.io/pod-deletion-cost annotation (pod_deletion_cost), by "
            "result: ok, failed (logged; retried at the next change or interval).", ["result"], registry=registry)
        for result in ("ok", "failed"):
            self.updates.labels(result=result)
        self.written: int | None = None  # the value the pod carries, as far as we know
        self._failing = False
        self._context = ssl.create_default_context(cafile=str(pod.ca_file)) if pod.ca_file else None

    async def run(self) -> None:
        last_try = -self.min_interval
        while True:
            value = self.count()
            if value != self.written and time.monotonic() - last_try >= self.min_interval:
                last_try = time.monotonic()
                if await asyncio.to_thread(self._patch, value):
                    self.written = value
            await asyncio.sleep(self.check_every)

    def _patch(self, value: int) -> bool:
        """(a thread) The merge patch; True if the API server took it."""
        body = json.dumps({"metadata": {"annotations": {ANNOTATION: str(value)}}}).encode()
        url = f"{self.pod.api}/api/v1/namespaces/{self.pod.namespace}/pods/{self.pod.name}"
        try:
            token = self.pod.token_file.read_text(encoding="utf-8").strip()
            request = urllib.request.Request(url, data=body, method="PATCH", headers={
                "Content-Type": "application/merge-patch+json", "Authorization": f"Bearer {token}",
                "Accept": "application/json"})
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS, context=self._context) as answer:
                answer.read()
        except (OSError, urllib.error.URLError, ValueError) as exc:
            self.updates.labels(result="failed").inc()
            why = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else f"{type(exc).__name__}: {exc}"
            if not self._failing:  # once per outage, not every 10 s
                log.warning("pod-deletion-cost not written (%s); retrying while it fails, the process goes on", why,
                            extra={"pod": self.pod.name, "value": value})
            self._failing = True
            return False
        self.updates.labels(result="ok").inc()
        if self._failing:
            log.info("pod-deletion-cost written again", extra={"pod": self.pod.name, "value": value})
        self._failing = False
        return True
