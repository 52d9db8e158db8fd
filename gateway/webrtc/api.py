"""Browser calls over HTTP: the page, the personas it may call, and the offer/answer exchange.

    GET    /call                                  the page (static/call.html; ?tenant=…&persona=… preselects)
    GET    /v1/webrtc/personas                    personas this client may call, and the ICE servers to use
    POST   /v1/webrtc/calls/{tenant}/{persona}    body: the SDP offer → 201, the SDP answer, Location, and
                                                  Personagate-Call-Secret (the call's secret, given once)
    DELETE /v1/webrtc/calls/{id}                  hang up with the call's secret or an admin token → 204

Contract: WHIP's shape (RFC 9725). Checks run cheapest first (token, anonymous offer rate, body, persona,
anonymous caps) and a slot is claimed only after the offer passed them all and aiortc's parse; every refusal
is an HTTP status with a ``{"detail": …}`` and is counted in ``personagate_gateway_webrtc_refusals_total``.
What fails after the claim ends the call on the data channel (``call.py``).

Details (who may call, the call's secret, each status): docs/webrtc.md#signalling and
docs/webrtc.md#limits-and-bad-input.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials

from personagate_common.routing import Refusal

from ..admin.api import ApiError, Credentials, principal, read_body
from ..admin.throttle import source_key
from ..admin.tokens import Principal, TokensUnavailable
from ..call.metrics import call_metrics
from ..call.recording import check_recordings_dir
from ..call.state import CallState
from ..calls import PersonaRejected
from ..ratelimit import KeyedBuckets
from ..tenants.tenant import Rejection
from .call import BrowserCall
from .ice import (
    PEER_REFLEXIVE_ALLOWANCE,
    bound_remote_candidates,
    candidate_policy,
    ice_servers,
    restrict_host_addresses,
    rtc_configuration,
)
from .metrics import WebRtcMetrics
from .offer import OfferError, read_offer

if TYPE_CHECKING:
    from ..calls import Calls
    from ..config import GatewaySettings
    from ..tenants.registry import TenantRegistry
    from ..tenants.tenant import PersonaConfig, Tenant

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SDP = "application/sdp"
MAX_CLIENTS_TRACKED = 10_000
ENDED_KEPT = 4096  # ended calls a DELETE still answers 204 (the page hangs up by message, then by DELETE)
SECRET_HEADER = "Personagate-Call-Secret"
# An ending call no longer counts under the anonymous caps: its caller has hung up (or been told the call ended)
# and may call again; its slot is released within the second.


class Refused(ApiError):
    """An ``ApiError`` with the reason it is counted under (``personagate_gateway_webrtc_refusals_total``)."""

    def __init__(self, status: int, reason: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail, headers=headers)
        self.reason = reason


def refusal_reason(exc: ApiError) -> str:
    """What a refusal is counted as: its own reason, or one told by the status of an error raised by code shared
    with the admin API (the body's size, the token)."""
    if isinstance(exc, Refused):
        return exc.reason
    return {401: "invalid_token", 404: "not_found", 413: "too_large", 415: "not_sdp"}.get(exc.status, str(exc.status))


class OfferRateLimit:
    """A token bucket per client address: ``per_minute`` offers a minute, a third of them at once; at most
    MAX_CLIENTS_TRACKED clients remembered (``gateway/ratelimit.py``)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets = KeyedBuckets(capacity=max(1.0, per_minute / 3), per_second=per_minute / 60,
                                     max_keys=MAX_CLIENTS_TRACKED)
        self._clock = clock

    def take(self, client: str) -> float:
        """0 if ``client`` may post an offer now (one token taken), else the seconds until it may."""
        now = self._clock()
        tokens = self._buckets.level(client, now)
        if tokens < 1:
            # Refused: nothing taken (no penalty beyond the wait), but the client counts as recently seen, so it is
            # not the first forgotten when memory is full.
            self._buckets.store(client, tokens, now)
            return self._buckets.wait(tokens)
        self._buckets.store(client, tokens - 1, now)
        return 0.0


def public_cap(setting: int, tenant_limit: int) -> int:
    """Anonymous calls a tenant may have in progress: ``webrtc_public_calls_per_tenant``, and always below the
    tenant's own ``max_concurrent_calls`` (one of its calls is left to its phone numbers and admins; a tenant
    limited to one call has only that one, which its limit guards)."""
    return min(setting, tenant_limit - 1) if tenant_limit > 1 else setting


class WebRtc:
    """The browser front end's state: its calls in progress, its limits, its metrics."""

    def __init__(self, settings: GatewaySettings, registry: TenantRegistry, calls: Calls) -> None:
        self.settings = settings
        self.registry = registry
        self.calls = calls
        self.metrics = WebRtcMetrics(calls.metrics.registry)
        self.call_metrics = call_metrics(calls.metrics.registry, "webrtc")
        self.rate_limit = OfferRateLimit(settings.webrtc_offers_per_minute)
        self.active: dict[str, BrowserCall] = {}
        self.secrets: dict[str, str] = {}  # call id → its secret, for calls in progress
        # the last ENDED_KEPT calls: id → (secret, tenant), so that a late DELETE is still told apart from a stranger's
        self.ended: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self.public: dict[str, BrowserCall] = {}  # anonymous calls, from their offer's acceptance to their end
        self.candidates = candidate_policy(settings.webrtc_ice_interfaces)

    async def start(self) -> None:
        restrict_host_addresses(self.settings.webrtc_ice_interfaces)
        bound_remote_candidates(self.settings.webrtc_max_offer_candidates + PEER_REFLEXIVE_ALLOWANCE)
        self.candidates = await asyncio.to_thread(candidate_policy, self.settings.webrtc_ice_interfaces)
        if self.settings.recordings_dir is not None:
            await asyncio.to_thread(check_recordings_dir, self.settings.recordings_dir)

    def _forget(self, call_id: str) -> None:
        call = self.active.pop(call_id, None)
        self.public.pop(call_id, None)
        secret = self.secrets.pop(call_id, None)
        if call is not None and secret is not None:
            self.ended[call_id] = (secret, call.tenant.id)
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)

    def public_calls(self, tenant_id: str, client: str) -> tuple[int, int]:
        """Anonymous calls in progress (offers being answered included): this client's, and ``tenant_id``'s."""
        by_client = by_tenant = 0
        for call in self.public.values():
            if not call.lifecycle.over:
                by_client += source_key(call.client) == client
                by_tenant += call.tenant.id == tenant_id
        return by_client, by_tenant

    def check_public_caps(self, tenant: Tenant, client: str) -> None:
        """``Refused`` if an anonymous call from ``client`` to ``tenant`` would pass a cap."""
        settings = self.settings
        by_client, by_tenant = self.public_calls(tenant.id, source_key(client))
        retry = {"Retry-After": str(max(1, math.ceil(self.calls.router.retry_after_seconds)))}
        if by_client >= settings.webrtc_public_calls_per_client:
            raise Refused(429, "public_client_cap", f"this client already has {by_client} call(s) in progress; "
                          "hang up one first", headers=retry)
        if by_tenant >= public_cap(settings.webrtc_public_calls_per_tenant, tenant.spec.limits.max_concurrent_calls):
            raise Refused(503, "public_tenant_cap", f"{tenant.spec.name} takes no more calls from its public link now",
                          headers=retry)

    async def wait_idle(self, seconds: float) -> bool:
        """Until no browser call is in progress (True), or ``seconds`` pass (False): a drain waits here for calls
        bridged to a human (no agent session left) once agent calls have ended."""
        deadline = time.monotonic() + max(0.0, seconds)
        while self.active:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            tasks = [c.task for c in self.active.values() if c.task is not None]
            if not tasks:
                break
            await asyncio.wait(tasks, timeout=left)
        return True

    async def stop(self) -> None:
        """End every browser call (``shutdown``)."""
        await asyncio.gather(*(call.stop() for call in list(self.active.values())), return_exceptions=True)

    def callable_personas(self, who: Principal | None) -> list[PersonaConfig]:
        out = []
        for tenant_id, tenant in sorted(self.registry.tenants.items()):
            for persona in tenant.personas.values():
                if persona.public_link or (who is not None and who.may_reach(tenant_id)):
                    out.append(persona)
        return out

    def resolve(self, tenant_id: str, persona_name: str, who: Principal | None) -> tuple[Tenant, PersonaConfig]:
        """The tenant and the persona that answers now; ``ApiError`` if this client may not call it. A persona the
        caller may not call is answered as one that does not exist, so that nobody learns a tenant's private
        personas by guessing; a token for another tenant calls public personas as anyone does."""
        tenant = self.registry.tenants.get(tenant_id)
        persona = tenant.personas.get(persona_name) if tenant is not None else None
        admin = who is not None and who.may_reach(tenant_id)
        if persona is None or not (admin or persona.public_link):
            raise Refused(404, "not_found", f"no persona {persona_name!r} to call in tenant {tenant_id!r} (a persona without "
                                "public_link is called with its tenant's admin token)")
        assert tenant is not None
        if admin:
            return tenant, persona  # an admin trying a persona: at any hour
        answer = tenant.answer_for(persona_name, dt.datetime.now(dt.UTC))
        if isinstance(answer, Rejection):
            raise Refused(503, "closed", f"{tenant.spec.name} is closed now: {answer.reason}")
        return tenant, answer

    async def offer(self, tenant_id: str, persona_name: str, request: Request,
                    credentials: HTTPAuthorizationCredentials | None) -> Response:
        client = request.client.host if request.client else "unknown"
        who = await identify(request, credentials)
        if who is None:  # a valid token holder is not held to the anonymous per-client rate
            wait = self.rate_limit.take(source_key(client))
            if wait:
                raise Refused(429, "rate_limited", f"too many call attempts from {client}; try again in "
                              f"{math.ceil(wait)} s", headers={"Retry-After": str(math.ceil(wait))})
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != SDP:
            raise Refused(415, "not_sdp", f"the offer is sent as {SDP}, not {content_type or 'no content type'}")
        body = await read_body(request, self.settings.webrtc_max_offer_bytes, "the SDP offer")
        try:
            offer = read_offer(body, max_candidates=self.settings.webrtc_max_offer_candidates,
                               address_check=self.candidates.refuse)
        except OfferError as exc:
            raise Refused(400, exc.reason, str(exc)) from None
        tenant, persona = self.resolve(tenant_id, persona_name, who)
        if self.calls.draining:
            raise Refused(503, "draining", "this gateway is draining: it takes no new calls",
                          headers={"Retry-After": str(math.ceil(self.calls.router.retry_after_seconds))})
        anonymous = who is None or not who.may_reach(tenant.id)
        if anonymous:
            self.check_public_caps(tenant, client)
        if offer.dropped:
            self.metrics.candidates_dropped.inc(len(offer.dropped))
            log.info("ICE candidates taken out of an offer", extra={"client": client, "tenant": tenant.id,
                                                                    "dropped": offer.dropped[:8]})
        call_id = "webrtc-" + secrets.token_hex(16)
        secret = secrets.token_urlsafe(32)
        settings = self.settings
        call = BrowserCall(call_id=call_id, tenant=tenant, persona=persona, calls=self.calls,
                           configuration=rtc_configuration(settings), metrics=self.metrics,
                           call_metrics=self.call_metrics, client=client,
                           setup_timeout=settings.webrtc_setup_timeout_seconds,
                           media_timeout=settings.webrtc_media_timeout_seconds,
                           caller_first_wait=settings.sip_caller_first_wait_seconds,
                           cushion_packets=settings.webrtc_outbound_cushion_packets,
                           connect_timeout=settings.webrtc_connect_timeout_seconds,
                           jitter_buffer_packets=settings.webrtc_jitter_buffer_packets,
                           recordings_dir=settings.recordings_dir,
                           sip=getattr(request.app.state, "sip", None), ring_timeout=settings.sip_transfer_ring_seconds)
        if anonymous:
            self.public[call_id] = call  # counted from now: concurrent offers see it while this one is answered
        try:
            answer = await call.answer(offer.sdp)
        except OfferError as exc:
            raise Refused(400, exc.reason, str(exc)) from None
        except Refusal as exc:
            retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_seconds)))}
            if exc.reason == "tenant_limit":
                raise Refused(429, "tenant_limit", f"{tenant.spec.name} is at its limit of concurrent calls",
                              headers=retry) from None
            raise Refused(503, exc.reason, _REFUSALS.get(exc.reason, "no agent can take the call now"),
                          headers=retry) from None
        except PersonaRejected as exc:
            raise Refused(500, "persona_rejected", f"the persona could not be started: {exc.reason}") from None
        finally:
            if call.state is CallState.REFUSED:
                self.public.pop(call_id, None)
        self.active[call_id] = call
        self.secrets[call_id] = secret
        call.begin()
        assert call.task is not None
        call.task.add_done_callback(lambda _: self._forget(call_id))
        if await request.is_disconnected():  # the client gave up while the slot was claimed: free it now
            call.hang_up("hangup")
        log.info("WebRTC call answered", extra={"call": call_id, "tenant": tenant.id, "persona": persona.name,
                                                "client": client, "admin": who.name if who else None,
                                                "public": anonymous, "candidates": offer.candidates})
        return Response(answer, status_code=201, media_type=SDP,
                        headers={"Location": f"/v1/webrtc/calls/{call_id}", SECRET_HEADER: secret,
                                 "Cache-Control": "no-store"})

    async def hang_up(self, call_id: str, request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Hang up ``call_id`` for a client holding its secret (or an admin token of its tenant); ``Refused``
        otherwise (403: the call goes on; 404: no such call)."""
        call = self.active.get(call_id)
        if call is not None:
            secret, tenant_id = self.secrets[call_id], call.tenant.id
        elif call_id in self.ended:
            secret, tenant_id = self.ended[call_id]
        else:
            raise Refused(404, "no_such_call", "no such call")
        given = credentials.credentials if credentials is not None else ""
        if not (given and secrets.compare_digest(given.encode(), secret.encode())) \
                and not await self._admin_of(tenant_id, request, credentials):
            client = request.client.host if request.client else "unknown"
            log.warning("WebRTC hang-up refused: without the call's secret", extra={
                "call": call_id, "tenant": tenant_id, "client": client, "credentials": bool(given)})
            raise Refused(403, "hangup_forbidden", "hanging up a call takes its secret (Authorization: Bearer "
                          f"<the {SECRET_HEADER} answered with the call>) or an admin token of its tenant")
        if call is not None:
            call.hang_up("hangup")

    @staticmethod
    async def _admin_of(tenant_id: str, request: Request, credentials: HTTPAuthorizationCredentials | None) -> bool:
        """Whether the bearer token is an admin token that reaches ``tenant_id`` (False for no token or an unknown
        one: to a hang-up, a wrong token is just not the secret)."""
        if credentials is None:
            return False
        try:
            who = await identify(request, credentials)
        except ApiError:
            return False
        return who is not None and who.may_reach(tenant_id)


_REFUSALS = {"no_capacity": "no agent is free to take the call now", "draining": "this gateway is draining",
             "unavailable": "the call routing store cannot be reached"}


async def identify(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal | None:
    """Who the admin token belongs to (``principal``), or None without one; a caller with no token is never held
    up by the admin tokens file, and a token while that file cannot be used is a 401."""
    if credentials is None:
        return None
    try:
        return await principal(request, credentials)
    except TokensUnavailable as exc:  # the detail names a server file: for the log, not the client
        log.warning("an admin token was given, but admin tokens are not available: %s", exc)
        raise Refused(401, "invalid_token", "admin tokens are not available on this gateway") from exc


def install(app: FastAPI, webrtc: WebRtc) -> None:
    """The page and the signalling routes on ``app``."""
    router = APIRouter(prefix="/v1/webrtc", tags=["webrtc"])

    @router.get("/personas", summary="Personas this client may call from a browser, and the ICE servers to use")
    async def personas(request: Request, credentials: Credentials) -> JSONResponse:
        who = await identify(request, credentials)
        listed = [{"tenant": p.tenant, "tenant_name": webrtc.registry.tenants[p.tenant].spec.name,
                   "persona": p.name, "description": p.description, "public": p.public_link}
                  for p in webrtc.callable_personas(who)]
        return JSONResponse({"personas": listed, "ice_servers": ice_servers(webrtc.settings)},
                            headers={"Cache-Control": "no-store"})

    @router.post("/calls/{tenant}/{persona}", status_code=201, summary="Call a persona: post an SDP offer",
                 response_class=Response, responses={201: {"content": {SDP: {}}, "description": "the SDP answer"}})
    async def offer(tenant: str, persona: str, request: Request, credentials: Credentials) -> Response:
        try:
            answer = await webrtc.offer(tenant, persona, request, credentials)
        except ApiError as exc:
            webrtc.metrics.offers.labels(answer=str(exc.status)).inc()
            webrtc.metrics.refusals.labels(reason=refusal_reason(exc)).inc()
            raise
        except Exception:
            webrtc.metrics.offers.labels(answer="500").inc()
            raise
        webrtc.metrics.offers.labels(answer="201").inc()
        return answer

    @router.delete("/calls/{call_id}", status_code=204,
                   summary="Hang up a browser call (Authorization: Bearer <its secret, or an admin token>)")
    async def hang_up(call_id: str, request: Request, credentials: Credentials) -> Response:
        try:
            await webrtc.hang_up(call_id, request, credentials)
        except ApiError as exc:
            webrtc.metrics.refusals.labels(reason=refusal_reason(exc)).inc()
            raise
        return Response(status_code=204)

    app.include_router(router)

    @app.get("/call", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "call.html", headers=_PAGE_HEADERS)

    @app.get("/call/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise ApiError(404, "not found")
        return FileResponse(path, headers=_PAGE_HEADERS)


# The page loads nothing from elsewhere, and may use the microphone on its own origin only.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob: mediastream:; img-src 'self' data:",
    "Permissions-Policy": "microphone=(self)",
    "Cache-Control": "no-cache",
}
