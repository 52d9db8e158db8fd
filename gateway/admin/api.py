"""The tenant admin API, under ``/v1/admin``: tenants, personas as YAML, voice clips, history and
rollback, reload status. OpenAPI at ``/docs`` and ``/openapi.json``.

Every request carries ``Authorization: Bearer <token>`` (see tokens.py): an operator token reaches
every tenant, a tenant admin's token only its own tenant. A tenant token on another tenant's path is
answered 403 whether that tenant exists or not, before anything about it is looked up. Wrong tokens are
throttled per client address and per token prefix (throttle.py: 429 with Retry-After); every write
attempt and every refused login is recorded in the audit log (audit.py, ``GET /v1/admin/audit``).
Errors never carry the server's paths: those go to the log.

Every write is checked the way the gateway will load it (the whole tenant.yaml after the change, with
the same ``file:line:column: field.path: message`` problems as ``personagate tenants validate``; a
clip with the same checks as a clip in a tenant folder), written atomically with a version recorded
(store.py), and applied at once (``TenantRegistry.reload``). Blocking work (file I/O, YAML, clip
decoding) runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Security
from fastapi import Path as Path_
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, TypeAdapter, ValidationError

from personagate_common.voices import VoiceClipError

from ..tenants import schema
from ..tenants.edit import (
    BODY,
    MAX_BODY_BYTES,
    EditError,
    check_body,
    delete_persona,
    put_persona,
    read_persona,
)
from ..tenants.loader import (
    ANNOUNCEMENT_SECONDS,
    MAX_TENANT_FILE_BYTES,
    TENANT_FILE,
    VOICE_SECONDS,
    ClipCache,
    Problem,
    load_tenant,
    number_clashes,
)
from ..tenants.registry import TenantRegistry, TenantStatus
from ..tenants.store import NotWritable, TenantStore, Version, VersionNotFound, sha256
from .audit import AuditEntry, AuditLog
from .throttle import FailureThrottle, retry_after, source_key
from .tokens import Principal, TokenFile, TokensUnavailable

log = logging.getLogger(__name__)

MAX_PERSONA_BYTES = MAX_BODY_BYTES
YAML_TYPE = "text/yaml; charset=utf-8"
CLIP_TYPES = {".wav": "audio/wav", ".flac": "audio/flac"}
_OTHER_TENANT = re.compile(r"tenant '([a-z0-9-]+)' \(([^()]*)\)")
# The per-prefix throttle's key: 8 characters of a token (48 bits). Guessers spread over many addresses who
# hold the start of one token (a truncated log line) are held on it; random guesses spread over prefixes and
# meet the per-address throttle instead.
TOKEN_PREFIX_CHARS = 8
REFUSAL_REASONS = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found", 409: "conflict",
                   412: "precondition_failed", 413: "too_large", 422: "invalid", 429: "throttled",
                   503: "unavailable"}


class ApiError(Exception):
    """An answer other than success: ``{"detail": ..., "problems": [...]}`` with ``status``."""

    def __init__(self, status: int, detail: str, *, problems: list[str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.problems, self.headers = status, detail, problems, headers


# ------------------------------------------------------------------------------------ response models


class ErrorOut(BaseModel):
    detail: str
    problems: list[str] | None = None


class StateOut(BaseModel):
    """``serving`` (current files), ``serving_previous`` (the files are invalid: the last good
    configuration serves), ``rejected`` (invalid, nothing to fall back on), ``unchecked`` (not seen
    by a reload yet)."""

    state: str
    problems: list[str] = []
    applied_at: float | None = None


class TenantOut(BaseModel):
    id: str
    name: str | None  # None when no configuration of the tenant has ever been valid
    state: str
    personas: list[str]
    numbers: dict[str, str]


class TenantDetailOut(TenantOut):
    problems: list[str]
    applied_at: float | None
    checked_at: float
    etag: str | None  # of tenant.yaml as it is now; send it as If-Match with a write


class ReloadOut(BaseModel):
    checked_at: float
    ok: bool
    tenants: dict[str, StateOut]


class HistoryOut(BaseModel):
    tenant: str
    versions: list[Version]  # newest first


class AuditOut(BaseModel):
    entries: list[AuditEntry]  # newest first


class WriteOut(BaseModel):
    tenant: str
    file: str
    changed: bool  # False: the content was already this; nothing was written
    version: Version | None
    etag: str | None
    status: StateOut  # the tenant after the reload that applied the write


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in {
        401: "no bearer token, or an unknown one", 403: "the token is for another tenant",
        404: "no such tenant, persona, file or version",
        429: "too many wrong tokens from this address or for this token prefix; see Retry-After",
        503: "the admin API is disabled (no tokens file, or one that cannot be used)",
    }.items()
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, **{
    code: {"model": ErrorOut, "description": text} for code, text in {
        409: "the tenants folder is read-only here, or the current tenant.yaml cannot be parsed",
        412: "If-Match does not match the current file: it changed since you read it",
        413: "the body is larger than allowed",
        422: "the result would be invalid; 'problems' lists every problem",
    }.items()
}}


# ------------------------------------------------------------------------------------ the service


class AdminMetrics:
    """Refusals, counted: every admin API request refused, and every failed or throttled token check (the admin
    API's and the browser call API's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refusals = Counter(
            "personagate_gateway_admin_refusals_total",
            "Admin API requests refused, by reason (unauthenticated, throttled, forbidden, not_found, invalid, "
            "too_large, conflict, precondition_failed, unavailable, bad_request).",
            ["reason"], registry=registry)
        self.auth_failures = Counter(
            "personagate_gateway_auth_failures_total",
            "Bearer tokens refused (admin API and browser calls), by reason: invalid_token (unknown), throttled "
            "(the address or the token prefix is held after too many wrong tokens).",
            ["reason"], registry=registry)
        for reason in ("invalid_token", "throttled"):
            self.auth_failures.labels(reason)


@dataclass
class Admin:
    registry: TenantRegistry
    store: TenantStore
    tokens: TokenFile
    max_clip_bytes: int
    clips: ClipCache
    # Wrong tokens per client address, and per token prefix (TOKEN_PREFIX_CHARS): see throttle.py.
    sources: FailureThrottle = field(default_factory=lambda: FailureThrottle(burst=10, per_minute=6))
    prefixes: FailureThrottle = field(default_factory=lambda: FailureThrottle(burst=10, per_minute=6))
    audit: AuditLog = field(default_factory=AuditLog)
    metrics: AdminMetrics = field(default_factory=lambda: AdminMetrics(CollectorRegistry()))

    @property
    def root(self) -> Path:
        return self.registry.root

    # -------------------------------------------------------------- access

    async def reach(self, who: Principal, tenant: str) -> Path:
        """The tenant's folder, if ``who`` may reach it and it exists."""
        if not who.may_reach(tenant):
            log.warning("admin token refused on another tenant", extra={"actor": who.name, "tenant": tenant})
            raise ApiError(403, f"this token cannot reach tenant {tenant!r}")
        folder = self.store.folder(tenant)
        if not schema.TENANT_ID.match(tenant) or not await asyncio.to_thread(folder.is_dir):
            raise ApiError(404, f"no tenant {tenant!r}")
        return folder

    def show(self, problem: Problem, who: Principal) -> str:
        """A problem as a viewer sees it: files named relative to the tenants folder; for a tenant
        admin, other tenants (number clashes) are not named."""
        file = problem.file
        try:
            file = str(Path(file).relative_to(self.root))
        except ValueError:
            pass
        text = str(replace(problem, file=file)).replace(f"{self.root}/", "")
        if who.tenant is not None:
            text = _OTHER_TENANT.sub(lambda m: m.group(0) if m.group(1) == who.tenant else "another tenant", text)
        return text

    def state(self, tenant: str, who: Principal) -> StateOut:
        status = self.registry.status.tenants.get(tenant)
        if status is None:
            return StateOut(state="serving" if tenant in self.registry.tenants else "unchecked")
        return self._state(status, who)

    def _state(self, status: TenantStatus, who: Principal) -> StateOut:
        return StateOut(state=status.state, problems=[self.show(p, who) for p in status.problems],
                        applied_at=status.applied_at)

    def summary(self, tenant: str, who: Principal) -> TenantOut:
        serving = self.registry.tenants.get(tenant)
        return TenantOut(
            id=tenant,
            name=serving.spec.name if serving else None,
            state=self.state(tenant, who).state,
            personas=sorted(serving.personas) if serving else [],
            numbers=dict(serving.spec.numbers) if serving else {},
        )

    def reload_out(self, who: Principal) -> ReloadOut:
        status = self.registry.status
        tenants = {tid: self._state(s, who) for tid, s in status.tenants.items() if who.may_reach(tid)}
        if who.tenant is not None:
            tenants = {tid: s for tid, s in tenants.items() if tid}
        return ReloadOut(checked_at=status.checked_at, ok=all(not s.problems for s in tenants.values()),
                         tenants=tenants)

    # -------------------------------------------------------------- writing

    async def write_tenant_file(self, who: Principal, tenant: str, change: Callable[[str], str | None], *,
                                if_match: str | None, action: str = "write", from_version: int | None = None,
                                missing: str = "") -> WriteOut:
        """Apply ``change`` (current text -> new text, or None: nothing to change it in) to tenant.yaml
        under the tenant's lock; validate the result as a whole; write it; reload."""
        async with self.store.lock(tenant):
            version, etag = await asyncio.to_thread(
                self._tenant_file_transaction, who, tenant, change, if_match, action, from_version, missing)
        return await self._applied(who, tenant, TENANT_FILE, version, etag)

    def _tenant_file_transaction(self, who: Principal, tenant: str, change: Callable[[str], str | None],
                                 if_match: str | None, action: str, from_version: int | None, missing: str
                                 ) -> tuple[Version | None, str]:
        label = f"{tenant}/{TENANT_FILE}"
        with self._writing(), self.store.transaction(tenant):
            raw = self.store.read(tenant, TENANT_FILE)
            if raw is None:
                raise ApiError(404, f"tenant {tenant!r} has no {TENANT_FILE}")
            etag = _etag(raw)
            _check_if_match(if_match, etag)
            text = _decode(raw, label)
            try:
                new_text = change(text)
            except EditError as exc:
                raise _edit_error(exc, who, self) from exc
            if new_text is None:
                raise ApiError(404, missing or "nothing to change")
            new = new_text.encode("utf-8")
            if new == raw:
                return None, etag
            if len(new) > MAX_TENANT_FILE_BYTES:
                raise ApiError(422, "tenant configuration invalid", problems=[
                    f"{label}:1:1: (file): would be {len(new)} bytes; expected at most {MAX_TENANT_FILE_BYTES}"])
            checked, problems = load_tenant(self.store.folder(tenant), self.clips, text=new_text, label=label)
            if checked is not None:
                others = {tid: t for tid, t in self.registry.tenants.items() if tid != tenant}
                problems = [p for _, p in number_clashes([checked], fixed=others)]
            if problems:
                raise ApiError(422, "tenant configuration invalid", problems=[self.show(p, who) for p in problems])
            version = self.store.write(tenant, TENANT_FILE, new, actor=who.name, action=action,
                                       from_version=from_version)
        log.info("tenant file written", extra={"tenant": tenant, "file": TENANT_FILE, "version": version.version,
                                               "actor": who.name, "action": action})
        return version, _etag(new)

    async def write_clip(self, who: Principal, tenant: str, path: str, data: bytes, *, if_match: str | None,
                         action: str = "write", from_version: int | None = None) -> WriteOut:
        seconds = self._clip_seconds(tenant, path)
        try:
            await asyncio.to_thread(self.clips.prepare, data, seconds)
        except VoiceClipError as exc:
            raise ApiError(422, f"voice clip rejected: {exc}", problems=[f"{tenant}/{path}: {exc}"]) from exc
        async with self.store.lock(tenant):
            version, etag = await asyncio.to_thread(
                self._clip_transaction, who, tenant, path, data, if_match, action, from_version)
        return await self._applied(who, tenant, path, version, etag)

    def _clip_transaction(self, who: Principal, tenant: str, path: str, data: bytes, if_match: str | None,
                          action: str, from_version: int | None) -> tuple[Version | None, str]:
        with self._writing(), self.store.transaction(tenant):
            current = self.store.read(tenant, path)
            if if_match is not None:
                if current is None:
                    raise ApiError(412, f"If-Match given but {tenant}/{path} does not exist")
                _check_if_match(if_match, _etag(current))
            if current == data:
                return None, _etag(data)
            version = self.store.write(tenant, path, data, actor=who.name, action=action,
                                       from_version=from_version)
        log.info("tenant file written", extra={"tenant": tenant, "file": path, "version": version.version,
                                               "actor": who.name, "action": action, "bytes": len(data)})
        return version, _etag(data)

    def _clip_seconds(self, tenant: str, path: str) -> tuple[float, float]:
        """A clip is held to the consent announcement's length limits where the tenant's serving
        configuration uses it as one, else to a voice's."""
        serving = self.registry.tenants.get(tenant)
        if serving is not None and serving.spec.recording.consent_announcement == path:
            return ANNOUNCEMENT_SECONDS
        return VOICE_SECONDS

    async def _applied(self, who: Principal, tenant: str, file: str, version: Version | None, etag: str) -> WriteOut:
        if version is not None:
            await asyncio.to_thread(self.registry.reload, force=True)
        return WriteOut(tenant=tenant, file=file, changed=version is not None,
                        version=version, etag=etag,
                        status=self.state(tenant, who))

    @staticmethod
    @contextlib.contextmanager
    def _writing() -> Iterator[None]:
        try:
            yield
        except NotWritable as exc:
            raise ApiError(409, str(exc)) from exc
        except OSError as exc:
            log.exception("cannot write a tenant's files")  # the path and the reason: for the log only
            raise ApiError(500, "cannot write the tenant's files; the gateway's log says why") from exc


def _etag(data: bytes) -> str:
    return f'"{sha256(data)}"'


def _check_if_match(if_match: str | None, etag: str) -> None:
    if if_match is None:
        return
    tags = [tag.strip() for tag in if_match.split(",")]
    if not any(tag == "*" or tag.removeprefix("W/") == etag for tag in tags):
        raise ApiError(412, f"the file changed since it was read (If-Match {if_match}, now {etag}); read it again "
                            "and redo the change", headers={"ETag": etag})


def _decode(raw: bytes, label: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ApiError(409, f"{TENANT_FILE} cannot be edited as it is; fix it first",
                       problems=[f"{label}:{line}:1: (file): is not UTF-8 text; save it as UTF-8"]) from exc


def _edit_error(exc: EditError, who: Principal, admin: Admin) -> ApiError:
    admin.registry.metrics.tenant_edit_refusals.labels(exc.reason).inc()
    log.info("tenant edit refused", extra={"actor": who.name, "reason": exc.reason,
                                           "problems": [str(p) for p in exc.problems[:5]]})
    problems = [admin.show(p, who) for p in exc.problems]
    if all(p.file == BODY for p in exc.problems):
        return ApiError(422, "persona invalid (positions are in the request body)", problems=problems)
    return ApiError(409, f"{TENANT_FILE} cannot be edited as it is; fix it first", problems=problems)


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (never read whole)."""
    too_large = ApiError(413, f"{what} is larger than {limit} bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


_PERSONA_NAME = TypeAdapter(schema.PersonaName)
_CLIP_PATH = TypeAdapter(schema.ClipPath)


def _valid(adapter: TypeAdapter[Any], value: str) -> str:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ApiError(422, str((error.get("ctx") or {}).get("error", error["msg"]))) from exc


async def _clip_path(admin: Admin, tenant: str, path: str) -> None:
    """A clip path as tenant.yaml may name one, inside the tenant's folder (no link leads out)."""
    _valid(_CLIP_PATH, path)
    if any(part.startswith(".") for part in path.split("/")):
        raise ApiError(422, f"{path!r} has a part starting with '.'; those names are the gateway's own")
    folder = admin.store.folder(tenant)

    def inside() -> bool:
        return (folder / path).resolve().is_relative_to(folder.resolve())

    if not await asyncio.to_thread(inside):
        raise ApiError(422, f"{path!r} leads out of the tenant folder (a symbolic link); expected a file inside it")


def _media_type(path: str) -> str:
    return CLIP_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")


# ------------------------------------------------------------------------------------ routes


bearer = HTTPBearer(
    auto_error=False, scheme_name="bearer",
    description="An admin token: the operator's (every tenant) or a tenant admin's (that tenant only). "
                "Make one with `personagate tenants token`.",
)


Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _path_tenant(request: Request) -> str | None:
    tenant = request.path_params.get("tenant")
    return tenant if isinstance(tenant, str) and schema.TENANT_ID.match(tenant) else None


async def principal(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal | None:
    """Who the bearer token belongs to (None without one): 401 for a token the tokens file does not know, 429
    while the client's address or the token's prefix is held by the failure throttle (the token is not even
    checked then); ``TokensUnavailable`` while the file cannot be used. Shared with the browser call API
    (``gateway/webrtc``), so wrong tokens there count against the same throttle."""
    admin: Admin = request.app.state.admin
    if credentials is None:
        await asyncio.to_thread(admin.tokens.current)
        return None
    table = await asyncio.to_thread(admin.tokens.current)
    # From here on nothing awaits: the throttle's test and its count are one step of the event loop, so wrong
    # tokens sent at once cannot all pass an unheld address while their checks are in flight.
    source = client_address(request)
    address, prefix = source_key(source), credentials.credentials[:TOKEN_PREFIX_CHARS]
    wait = max(admin.sources.held(address), admin.prefixes.held(prefix))
    if wait:
        admin.metrics.auth_failures.labels("throttled").inc()
        _audit_login(admin, request, source, 429, "throttled: too many wrong tokens")
        raise ApiError(429, f"too many wrong tokens; try again in {retry_after(wait)} s",
                       headers={"Retry-After": retry_after(wait)})
    who = table.identify(credentials.credentials)
    if who is None:
        held = max(admin.sources.failed(address), admin.prefixes.failed(prefix))
        admin.metrics.auth_failures.labels("invalid_token").inc()
        _audit_login(admin, request, source, 401, "invalid token" + (f"; held for {retry_after(held)} s" if held else ""))
        log.warning("invalid admin token", extra={"client": source, "path": request.url.path, "held_seconds": held})
        raise ApiError(401, "invalid token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return who


def _audit_login(admin: Admin, request: Request, source: str, status: int, detail: str) -> None:
    admin.audit.record(actor=None, source=source, action="login", tenant=_path_tenant(request),
                       target=f"{request.method} {request.url.path}"[:200], status=status, result="refused",
                       detail=detail)


async def caller(request: Request, credentials: Credentials) -> Principal:
    """Who the bearer token belongs to: 503 while the API is disabled, else 401 unless it is known."""
    try:
        who = await principal(request, credentials)
    except TokensUnavailable as exc:
        raise ApiError(503, str(exc)) from exc  # never exc.detail: it names the file (logged by TokenFile)
    if who is None:
        if request.method != "GET":  # a write attempt without a token; reads without one are only probes
            _audit_login(request.app.state.admin, request, client_address(request), 401, "no bearer token")
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": "Bearer"})
    return who


Who = Annotated[Principal, Depends(caller)]
# The pattern is documentation (and guides schema-driven clients and fuzzers to paths that reach the checks);
# _clip_path checks every path, with messages that say what is wrong.
ClipPathParam = Annotated[str, Path_(description="the clip's path in the tenant folder, e.g. voices/agent.wav",
                                     json_schema_extra={"pattern": r"\.(wav|flac)$"})]
IfMatch = Annotated[str | None, Header(description="the ETag last read; the write is refused (412) if the file "
                                                   "has changed since")]


def install(app: FastAPI, admin: Admin) -> None:
    """Add the admin API's routes and its error answers to ``app`` (which must hold ``admin`` as
    ``app.state.admin``)."""

    router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ERRORS)

    async def audited(request: Request, who: Principal, action: str, tenant: str | None, target: str | None,
                      work: Awaitable[WriteOut]) -> WriteOut:
        """``work``'s answer, with an audit entry for it: applied, unchanged, or refused and why."""
        source = client_address(request)
        try:
            out = await work
        except ApiError as exc:
            admin.audit.record(actor=who.name, source=source, action=action, tenant=tenant, target=target,
                               status=exc.status, result="refused", detail=exc.detail)
            raise
        except Exception:
            admin.audit.record(actor=who.name, source=source, action=action, tenant=tenant, target=target,
                               status=500, result="failed", detail="internal error")
            raise
        admin.audit.record(actor=who.name, source=source, action=action, tenant=tenant, target=target, status=200,
                           result="applied" if out.changed else "unchanged",
                           version=out.version.version if out.version else None)
        return out

    @router.get("/tenants", response_model=list[TenantOut], summary="Tenants this token may see")
    async def list_tenants(who: Who) -> list[TenantOut]:
        status, serving = admin.registry.status, admin.registry.tenants
        ids = sorted((set(status.tenants) | set(serving)) - {""})
        return [admin.summary(tid, who) for tid in ids if who.may_reach(tid)]

    @router.get("/tenants/{tenant}", response_model=TenantDetailOut, summary="A tenant and its reload status")
    async def get_tenant(tenant: str, who: Who) -> TenantDetailOut:
        await admin.reach(who, tenant)
        raw = await asyncio.to_thread(admin.store.read, tenant, TENANT_FILE)
        state = admin.state(tenant, who)
        return TenantDetailOut(**admin.summary(tenant, who).model_dump(), problems=state.problems,
                               applied_at=state.applied_at, checked_at=admin.registry.status.checked_at,
                               etag=_etag(raw) if raw is not None else None)

    @router.get("/tenants/{tenant}/personas/{persona}", summary="A persona's YAML, as written in tenant.yaml",
                response_class=Response, responses={200: {"content": {"text/yaml": {}},
                                                          "description": "the persona's settings (de-indented)"}})
    async def get_persona(tenant: str, persona: str, who: Who) -> Response:
        await admin.reach(who, tenant)
        label = f"{tenant}/{TENANT_FILE}"

        def read() -> tuple[str | None, str]:
            raw = admin.store.read(tenant, TENANT_FILE)
            if raw is None:
                raise ApiError(404, f"tenant {tenant!r} has no {TENANT_FILE}")
            try:
                return read_persona(_decode(raw, label), persona, file=label), _etag(raw)
            except EditError as exc:
                raise _edit_error(exc, who, admin) from exc

        text, etag = await asyncio.to_thread(read)
        if text is None:
            raise ApiError(404, f"no persona {persona!r} in tenant {tenant!r}")
        return Response(text, media_type=YAML_TYPE, headers={"ETag": etag})

    yaml_body = {"requestBody": {"required": True, "content": {"text/yaml": {"schema": {"type": "string"}, "example": (
        "prompt: You are Sam, a claims agent at Acme Insurance.\nvoice:\n  preset: NATF0\nsampling:\n"
        "  temperature: 0.7\n")}}}}

    @router.put("/tenants/{tenant}/personas/{persona}", response_model=WriteOut, responses=WRITE_ERRORS,
                openapi_extra=yaml_body, summary="Replace (or add) a persona: its YAML, spliced into tenant.yaml")
    async def put_persona_(tenant: str, persona: str, request: Request, who: Who, if_match: IfMatch = None
                           ) -> WriteOut:
        async def put() -> WriteOut:
            await admin.reach(who, tenant)
            _valid(_PERSONA_NAME, persona)
            raw = await read_body(request, MAX_PERSONA_BYTES, "the persona")
            try:
                body = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ApiError(422, "the persona is not UTF-8 text") from exc
            try:
                # Body problems first, with positions in the body, before the file is read; parsed once, in a
                # thread (CPU work, bounded): the splice takes what this returns.
                settings = await asyncio.to_thread(check_body, body)
            except EditError as exc:
                raise _edit_error(exc, who, admin) from exc
            return await admin.write_tenant_file(
                who, tenant, lambda text: put_persona(text, persona, settings, file=f"{tenant}/{TENANT_FILE}"),
                if_match=if_match)

        return await audited(request, who, "put_persona", tenant, persona, put())

    @router.delete("/tenants/{tenant}/personas/{persona}", response_model=WriteOut, responses=WRITE_ERRORS,
                   summary="Remove a persona (refused while a number or after-hours routes to it)")
    async def delete_persona_(tenant: str, persona: str, request: Request, who: Who, if_match: IfMatch = None
                              ) -> WriteOut:
        async def delete() -> WriteOut:
            await admin.reach(who, tenant)
            return await admin.write_tenant_file(
                who, tenant, lambda text: delete_persona(text, persona, file=f"{tenant}/{TENANT_FILE}"),
                if_match=if_match, missing=f"no persona {persona!r} in tenant {tenant!r}")

        return await audited(request, who, "delete_persona", tenant, persona, delete())

    clip_body = {"requestBody": {"required": True, "content": {
        media: {"schema": {"type": "string", "format": "binary"}} for media in ("audio/wav", "audio/flac")}}}

    @router.put("/tenants/{tenant}/clips/{path:path}", response_model=WriteOut, responses=WRITE_ERRORS,
                openapi_extra=clip_body, summary="Upload a voice clip (wav or flac, checked like any tenant clip)")
    async def put_clip(tenant: str, path: ClipPathParam, request: Request, who: Who, if_match: IfMatch = None
                       ) -> WriteOut:
        async def put() -> WriteOut:
            await admin.reach(who, tenant)
            await _clip_path(admin, tenant, path)
            data = await read_body(request, admin.max_clip_bytes, "the clip")
            return await admin.write_clip(who, tenant, path, data, if_match=if_match)

        return await audited(request, who, "put_clip", tenant, path[:200], put())

    @router.get("/tenants/{tenant}/clips/{path:path}", response_class=Response, summary="A voice clip as stored",
                responses={200: {"content": {"audio/wav": {}, "audio/flac": {}}, "description": "the clip"}})
    async def get_clip(tenant: str, path: ClipPathParam, who: Who) -> Response:
        await admin.reach(who, tenant)
        await _clip_path(admin, tenant, path)
        data = await asyncio.to_thread(admin.store.read, tenant, path)
        if data is None:
            raise ApiError(404, f"no clip {path!r} in tenant {tenant!r}")
        return Response(data, media_type=_media_type(path), headers={"ETag": _etag(data)})

    @router.get("/tenants/{tenant}/history", response_model=HistoryOut, summary="Versions of the tenant's files")
    async def history(tenant: str, who: Who, file: str | None = None) -> HistoryOut:
        await admin.reach(who, tenant)
        versions = await asyncio.to_thread(admin.store.history, tenant)
        return HistoryOut(tenant=tenant, versions=[v for v in reversed(versions)
                                                   if file is None or v.file == file])

    @router.get("/tenants/{tenant}/history/{version}", response_class=Response, summary="One version's content",
                responses={200: {"content": {"text/yaml": {}, "audio/wav": {}, "audio/flac": {}},
                                 "description": "the file as it was"}})
    async def history_content(tenant: str, version: int, who: Who) -> Response:
        await admin.reach(who, tenant)
        entry, data = await _version(tenant, version)
        media = YAML_TYPE if entry.file == TENANT_FILE else _media_type(entry.file)
        return Response(data, media_type=media, headers={"ETag": _etag(data)})

    @router.post("/tenants/{tenant}/history/{version}/rollback", response_model=WriteOut, responses=WRITE_ERRORS,
                 summary="Restore one version of a file (checked like any write; recorded as a new version)")
    async def rollback(tenant: str, version: int, request: Request, who: Who, if_match: IfMatch = None
                       ) -> WriteOut:
        async def restore() -> WriteOut:
            await admin.reach(who, tenant)
            entry, data = await _version(tenant, version)
            if entry.file != TENANT_FILE:
                return await admin.write_clip(who, tenant, entry.file, data, if_match=if_match, action="rollback",
                                              from_version=version)
            try:
                old = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ApiError(422, f"version {version} is not UTF-8 text") from exc
            return await admin.write_tenant_file(who, tenant, lambda _: old, if_match=if_match, action="rollback",
                                                 from_version=version)

        return await audited(request, who, "rollback", tenant, f"version {version}", restore())

    async def _version(tenant: str, version: int) -> tuple[Version, bytes]:
        try:
            return await asyncio.to_thread(admin.store.content, tenant, version)
        except VersionNotFound as exc:
            raise ApiError(404, f"no version {version} of tenant {tenant!r} is kept") from exc

    @router.get("/reload", response_model=ReloadOut, summary="The last reload: each tenant's state and problems")
    async def reload_status(who: Who) -> ReloadOut:
        return admin.reload_out(who)

    @router.post("/reload", response_model=ReloadOut, summary="Check the tenants folder now and apply changes")
    async def reload_now(request: Request, who: Who) -> ReloadOut:
        # The operator's check re-reads everything; a tenant admin's reads only what changed.
        await asyncio.to_thread(admin.registry.reload, force=who.operator)
        admin.audit.record(actor=who.name, source=client_address(request), action="reload", tenant=who.tenant,
                           target=None, status=200, result="applied")
        return admin.reload_out(who)

    @router.get("/audit", response_model=AuditOut, summary="The audit log: write attempts and refused logins",
                description="Newest first. The operator reads every entry; a tenant admin only those about its "
                            "own tenant (other tenants' admins shown as 'another tenant').")
    async def audit(who: Who, tenant: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> AuditOut:
        if tenant is not None and not who.may_reach(tenant):
            raise ApiError(403, f"this token cannot reach tenant {tenant!r}")
        return AuditOut(entries=admin.audit.read(who.tenant, tenant=tenant, limit=limit))

    app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if request.url.path.startswith(router.prefix):
            admin.metrics.refusals.labels(REFUSAL_REASONS.get(exc.status, str(exc.status))).inc()
        content: dict[str, Any] = {"detail": exc.detail}
        if exc.problems is not None:
            content["problems"] = exc.problems
        return JSONResponse(content, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith(router.prefix):
            admin.metrics.refusals.labels("invalid").inc()
        return await request_validation_exception_handler(request, exc)
