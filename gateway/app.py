"""The gateway's HTTP app: the tenant admin API (``/v1/admin``, docs at ``/docs``), probes and metrics;
with ``sip_enabled``, the SIP front end (``gateway/sip``) starts and stops with it; with ``webrtc_enabled`` (the
default), the browser page ``/call`` and its signalling under ``/v1/webrtc`` (``gateway/webrtc``) are served.

The live tenant configuration (``TenantRegistry``) is loaded before the app serves, then watched for
changes by a background task for as long as the app runs; the calls (``Calls``: routing, worker sessions,
their background loops) start with it and end with it. ``/healthz`` is liveness; ``/readyz`` is 200 only
while tenants are loaded and the gateway is not draining, and says whether the routing store answers (an
unreachable store fails readiness only with ``ready_without_routing_store: false``: ``Calls.readiness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from personagate_common.kube import PodDeletionCost, PodRef
from personagate_common.serving import SecondListener

from .admin.api import Admin, AdminMetrics, install
from .admin.audit import AuditLog
from .admin.docs import install_docs
from .admin.throttle import FailureThrottle
from .admin.tokens import TokenFile
from .calls import Calls
from .config import GatewaySettings
from .metrics import GatewayMetrics
from .tenants.loader import ClipCache
from .tenants.registry import TenantRegistry
from .tenants.store import TenantStore

log = logging.getLogger(__name__)

DESCRIPTION = """\
Tenant administration for personagate: tenants, personas (YAML, validated exactly as the gateway loads
them), voice clips, version history with rollback, and reload status.

Authenticate with `Authorization: Bearer <token>`. An operator token reaches every tenant; a tenant
admin's token reaches its own tenant only (403 elsewhere). Tokens are made with
`personagate tenants token`; the gateway stores only their SHA-256 hashes.
"""


def settle_garbage_collector() -> None:
    """Once started: what the gateway holds for good (modules, settings, tenants) leaves the collector's view, so
    that a full collection, which holds the interpreter lock throughout, scans only what calls make. Unfrozen,
    each one scanned ~150,000 objects for ~90 ms, a stall every media callback of every call waited out (a gap
    in the RTP sent to callers), and the collector took a fifth of the gateway's CPU with dozens of calls."""
    gc.collect()
    gc.freeze()


def create_app(
    settings: GatewaySettings, *, registry: TenantRegistry | None = None, calls: Calls | None = None,
) -> FastAPI:
    metrics = registry.metrics if registry is not None else calls.metrics if calls is not None else GatewayMetrics()
    registry = registry or TenantRegistry(settings.tenants_dir, poll_seconds=settings.tenants_poll_seconds,
                                          metrics=metrics)
    calls = calls or Calls.from_settings(settings, registry, metrics)
    admin = Admin(
        registry=registry,
        store=TenantStore(settings.tenants_dir, history_versions=settings.history_versions),
        tokens=TokenFile(settings.admin_tokens_file),
        max_clip_bytes=settings.max_clip_bytes,
        clips=ClipCache(),
        sources=_auth_throttle(settings),
        prefixes=_auth_throttle(settings),
        audit=AuditLog(changes=settings.admin_audit_entries, logins=max(100, settings.admin_audit_entries // 10)),
        metrics=AdminMetrics(metrics.registry),
    )

    webrtc = None
    if settings.webrtc_enabled:
        from .webrtc.api import WebRtc

        webrtc = WebRtc(settings, registry, calls)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(registry.reload)
        watcher = asyncio.create_task(registry.watch(), name="tenant-watch")
        sip = None
        admin_listener = None
        deletion_cost: asyncio.Task[None] | None = None
        try:
            if app.state.admin_app is not None:
                admin_listener = app.state.admin_listener = SecondListener(
                    app.state.admin_app, "admin API", settings.admin_host or settings.host, settings.admin_port or 0,
                    cert_file=settings.http_tls_cert_file, key_file=settings.http_tls_key_file,
                    forwarded_allow_ips=settings.forwarded_allow_ips)
                await admin_listener.start()
            await calls.startup()
            if settings.sip_enabled:
                from .sip.server import SipServer

                sip = app.state.sip = SipServer(settings, registry, calls)
                await sip.start()
            if webrtc is not None:
                await webrtc.start()
            if settings.pod_deletion_cost:
                front_ends = (sip, webrtc)

                def calls_in_progress() -> int:
                    return sum(len(front_end.active) for front_end in front_ends if front_end is not None)

                deletion_cost = asyncio.create_task(
                    PodDeletionCost(PodRef.in_cluster(), calls_in_progress, metrics.registry).run(),
                    name="pod-deletion-cost")
            settle_garbage_collector()
            yield
        finally:
            if deletion_cost is not None:
                deletion_cost.cancel()
            if webrtc is not None:
                await webrtc.stop()  # "ended" on each call's data channel, its peer connection closed
            if sip is not None:
                await sip.stop()  # BYE to calls in progress, 503 to calls being set up; the endpoint destroyed
            await calls.close()
            if admin_listener is not None:
                await admin_listener.stop()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    # With admin_port the admin API (and its docs) is served only on a listener of its own, so that whatever
    # exposes the public port (browser calls) cannot expose the admin API by accident.
    admin_app = _admin_app(admin, metrics) if settings.admin_port is not None else None
    # /docs is served from the swagger-ui-bundle package (admin/docs.py), not a CDN: it works offline.
    app = FastAPI(title="personagate gateway", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    install_docs(app)
    app.state.admin = admin
    app.state.registry = registry
    app.state.calls = calls
    app.state.metrics = metrics
    app.state.sip = None
    app.state.webrtc = webrtc
    app.state.admin_app = admin_app
    install(app, admin)  # its error answers and app.state.admin serve browser signalling too
    if webrtc is not None:
        from .webrtc.api import install as install_webrtc

        install_webrtc(app, webrtc)

    async def drain(deadline_seconds: float) -> None:
        """SIGTERM: new calls refused; calls in progress, agent sessions first, then SIP and browser calls that no
        longer have one (bridged to a human), end by themselves within ``deadline_seconds`` or are ended then."""
        began = time.monotonic()
        await calls.drain(deadline_seconds)
        sip = app.state.sip
        if sip is not None and not await sip.wait_idle(deadline_seconds - (time.monotonic() - began)):
            log.warning("drain deadline passed with %d SIP call(s) in progress: they are hung up", len(sip.active))
        if webrtc is not None and not await webrtc.wait_idle(deadline_seconds - (time.monotonic() - began)):
            log.warning("drain deadline passed with %d browser call(s) in progress: they are ended",
                        len(webrtc.active))

    app.state.drain = drain

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "tenants_serving": len(registry.tenants)})

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ready, details = calls.readiness()
        return JSONResponse({"ready": ready, **details}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if admin_app is not None:
        app.add_middleware(_NotServedHere, prefixes=ADMIN_PATHS)
    app.add_middleware(_CountRequests, metrics=metrics)
    return app


def _auth_throttle(settings: GatewaySettings) -> FailureThrottle:
    return FailureThrottle(burst=settings.admin_auth_failure_burst, per_minute=settings.admin_auth_failures_per_minute,
                           max_keys=settings.admin_auth_tracked_keys)


ADMIN_PATHS = ("/v1/admin", "/docs", "/redoc", "/openapi.json")


def _admin_app(admin: Admin, metrics: GatewayMetrics) -> FastAPI:
    """The admin API (and its docs) alone, for its own listener (``admin_port``); /healthz for its probe."""
    admin_app = FastAPI(title="personagate gateway admin API", version="0.1.0", description=DESCRIPTION,
                        docs_url=None, redoc_url=None)
    admin_app.state.admin = admin
    install_docs(admin_app)
    install(admin_app, admin)

    @admin_app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    admin_app.add_middleware(_CountRequests, metrics=metrics)
    return admin_app


class _NotServedHere:
    """404 for every path under ``prefixes`` (the admin API and its docs, when they have a listener of their own),
    whatever routes the app holds: nothing under them is reachable through this listener."""

    def __init__(self, app: Any, prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] in ("http", "websocket") else ""
        if any(path == p or path.startswith(p + "/") for p in self.prefixes):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _CountRequests:
    """Counts every HTTP answer by method, route template (not the raw path) and status."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            route = getattr(scope.get("route"), "path", "(no route)")
            self.metrics.http_requests.labels(scope["method"], route, str(status)).inc()
