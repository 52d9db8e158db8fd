"""The routing store on Redis: every decision is one Lua script (``scripts.py``), so claims from any number of
gateways cannot over-commit a worker's slots or a tenant's limit.

Contract: ``RedisRouter`` takes a ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://`` URL (or
``SentinelSettings``, or a client it then does not own); every method either answers within ``timeout`` or
raises ``Refusal("unavailable")``, never hangs, and nothing needs restarting when Redis is back.

Details (URL forms, outage behaviour, keys): docs/routing.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import AfterValidator
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from . import scripts
from .metrics import RoutingMetrics
from .router import Claim, HeartbeatResult, ReapResult, Refusal, Router, WorkerSnapshot, WorkerState

log = logging.getLogger(__name__)

# Server errors that mean "not now" rather than "this script is wrong".
TRANSIENT_ERRORS = ("READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "NOREPLICAS", "OOM")
REAP_BATCH = 200
RENEW_BATCH = 200


@dataclass(frozen=True)
class SentinelSettings:
    sentinels: tuple[tuple[str, int], ...]  # (host, port) of each Sentinel
    service: str  # the monitored master's name
    db: int = 0
    username: str | None = None
    password: str | None = None  # the Redis servers' password
    sentinel_password: str | None = None
    ssl: bool = False  # TLS to the Redis servers


def parse_sentinel_url(url: str) -> SentinelSettings:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?sentinel_password=...]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise ValueError(f"not a redis+sentinel:// URL: {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address must be host:port, got {item!r} in {url!r}")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"redis+sentinel URL needs /service or /service/db after the hosts: {url!r}")
    query = parse_qs(parts.query)
    return SentinelSettings(
        sentinels=tuple(sentinels), service=unquote(path[0]), db=int(path[1]) if len(path) == 2 else 0,
        username=username, password=password,
        sentinel_password=query.get("sentinel_password", [None])[0], ssl=parts.scheme == "rediss+sentinel",
    )


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master lookup with the blocking pool's wait-for-a-connection behaviour."""


class RedisRouter(Router):
    """``Router`` on Redis. URL forms and outage behaviour: docs/routing.md."""

    def __init__(
        self,
        url_or_client: str | SentinelSettings | Redis | Any,
        *,
        prefix: str = "{pg}",
        lease_seconds: float = 15.0,
        worker_ttl: float = 6.0,
        retry_after_seconds: float = 5.0,
        timeout: float = 1.0,
        connect_timeout: float = 0.5,
        max_connections: int = 32,
        metrics: RoutingMetrics | None = None,
    ) -> None:
        super().__init__(
            lease_seconds=lease_seconds, worker_ttl=worker_ttl, retry_after_seconds=retry_after_seconds,
            metrics=metrics,
        )
        if not re.fullmatch(r"\{[^{}]+\}[^{}]*", prefix):
            raise ValueError(f"prefix must start with a hash tag such as '{{pg}}' (one Cluster slot), got {prefix!r}")
        self.prefix = prefix
        self.timeout = timeout
        self._keys = [f"{prefix}:{name}" for name in scripts.KEY_NAMES]
        if isinstance(url_or_client, str) and url_or_client.split("://", 1)[0].endswith("+sentinel"):
            url_or_client = parse_sentinel_url(url_or_client)
        self._owns_client = isinstance(url_or_client, str | SentinelSettings)
        connection = {
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout,
            # one immediate retry: a connection pooled before a Redis restart fails once, then reconnects
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            "decode_responses": True,
        }
        if isinstance(url_or_client, str):
            pool = BlockingConnectionPool.from_url(
                url_or_client, max_connections=max_connections, timeout=timeout, **connection,
            )
            self.client: Any = Redis.from_pool(pool)
            self.where = redact(url_or_client)
        elif isinstance(url_or_client, SentinelSettings):
            s = url_or_client
            sentinel = Sentinel(
                list(s.sentinels),
                sentinel_kwargs={
                    "socket_timeout": timeout, "socket_connect_timeout": connect_timeout,
                    "password": s.sentinel_password, "retry": Retry(NoBackoff(), 0),
                },
                db=s.db, username=s.username, password=s.password, ssl=s.ssl, **connection,
            )
            self.client = sentinel.master_for(
                s.service, connection_pool_class=BlockingSentinelConnectionPool,
                max_connections=max_connections, timeout=timeout,
            )
            self.where = f"sentinel service {s.service!r} via " + ",".join(f"{h}:{p}" for h, p in s.sentinels)
        else:
            self.client = url_or_client
            self.where = "the given Redis client"
        self._scripts = {name: self.client.register_script(src) for name, src in scripts.SCRIPTS.items()}
        self._reachable = True

    # -- plumbing --------------------------------------------------------------------------------

    async def _run(self, name: str, *args: object) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                result = await self._scripts[name](keys=self._keys, args=list(args))
        except ResponseError as exc:
            if not str(exc).startswith(TRANSIENT_ERRORS):
                raise  # a bug in a script, not an outage
            raise self._unavailable(exc) from exc
        except (RedisError, OSError, TimeoutError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The caller is being cancelled and the cancel surfaced as a timeout or a dropped
                # connection: stop, rather than report an outage the caller's loop would retry.
                raise asyncio.CancelledError from exc
            raise self._unavailable(exc) from exc
        if not self._reachable:
            self._reachable = True
            log.info("routing store reachable again (%s)", self.where)
        return result

    def _unavailable(self, exc: BaseException) -> Refusal:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, TimeoutError):
            what = f"no answer within {self.timeout:g} s"
        if self._reachable:
            self._reachable = False
            log.warning("routing store unreachable (%s): %s", self.where, what)
        return Refusal("unavailable", f"the routing store cannot be reached ({what})", self.retry_after_seconds)

    def _ms(self, seconds: float) -> int:
        return max(1, round(seconds * 1000))

    def _claim_from(self, call_id: str, reply: list[Any], tenant: str | None = None) -> Claim:
        status, worker, url, cached, stored_tenant = reply
        return Claim(
            call_id=call_id, worker_id=worker, url=url, tenant=stored_tenant or tenant or "",
            persona_cached=bool(int(cached)), reused=status == "reused",
        )

    # -- Router ----------------------------------------------------------------------------------

    async def _heartbeat(self, state: WorkerState, ttl: float) -> HeartbeatResult:
        personas = sorted(set(state.cached_personas))
        reserved, free, draining, recovered = await self._run(
            "heartbeat", state.worker_id, state.capacity, state.url, int(state.draining), self._ms(ttl),
            self._ms(self.lease_seconds), len(personas), *personas, *state.active_calls,
        )
        return HeartbeatResult(int(reserved), int(free), bool(int(draining)), tuple(recovered))

    async def _drain(self, worker_id: str) -> bool:
        return bool(await self._run("drain", worker_id))

    async def _workers(self) -> list[WorkerSnapshot]:
        rows = await self._run("workers")
        out = []
        for worker, url, capacity, reserved, remaining_ms, draining, personas in rows:
            capacity, reserved = int(capacity), int(reserved)
            out.append(WorkerSnapshot(
                worker_id=worker, url=url, capacity=capacity, reserved=reserved, free=max(0, capacity - reserved),
                draining=bool(int(draining)), alive=int(remaining_ms) > 0, cached_personas=int(personas),
            ))
        return out

    async def _reap(self) -> ReapResult:
        dead: list[str] = []
        orphaned: list[str] = []
        expired: list[str] = []
        while True:
            d, o, e = await self._run("reap", REAP_BATCH, self._ms(self.lease_seconds))
            dead += d
            orphaned += o
            expired += e
            if len(d) < REAP_BATCH and len(e) < REAP_BATCH:
                return ReapResult(tuple(dead), tuple(orphaned), tuple(expired))

    async def _claim(
        self, call_id: str, tenant: str, tenant_limit: int | None, persona_key: str | None,
        exclude: tuple[str, ...],
    ) -> Claim:
        reply = await self._run(
            "claim", call_id, tenant, -1 if tenant_limit is None else tenant_limit, persona_key or "",
            self._ms(self.lease_seconds), *exclude,
        )
        if reply[0] == "no_capacity":
            raise self.no_capacity()
        if reply[0] == "tenant_limit":
            raise self.tenant_limit(tenant, tenant_limit)
        return self._claim_from(call_id, reply, tenant)

    async def _renew(self, claims: list[Claim]) -> tuple[str, ...]:
        moved: list[str] = []
        for start in range(0, len(claims), RENEW_BATCH):
            args: list[object] = [self._ms(self.lease_seconds)]
            for c in claims[start:start + RENEW_BATCH]:
                args += (c.call_id, c.tenant, c.worker_id)
            moved += await self._run("renew", *args)
        return tuple(moved)

    async def _release(self, call_id: str) -> bool:
        return bool(await self._run("release", call_id, self._ms(self.lease_seconds)))

    async def _rehome(
        self, call_id: str, dead_worker_id: str, persona_key: str | None, tenant: str | None,
    ) -> Claim:
        reply = await self._run(
            "rehome", call_id, dead_worker_id, persona_key or "", self._ms(self.lease_seconds), tenant or "",
        )
        if reply[0] == "no_capacity":
            raise self.no_capacity(f"no live worker other than {dead_worker_id!r} has a free slot")
        return self._claim_from(call_id, reply, tenant)

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()


def redact(url: str) -> str:
    """A URL fit for a message or a log: its password replaced."""
    return re.sub(r"//([^@/]*):([^@/]*)@", r"//\1:***@", url)


def check_redis_url(url: str) -> str:
    """``url`` if a routing store can be reached with it (redis://, rediss://, unix://, or Sentinel),
    else ValueError saying what is wrong (settings validators of workers and gateways call this)."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError(f"a {parts.scheme}:// URL needs a host, e.g. redis://redis:6379/0; got {redact(url)!r}")
        try:
            parts.port  # noqa: B018 (a port that is not a number raises here)
        except ValueError as exc:
            raise ValueError(f"bad port in {redact(url)!r}: {exc}") from exc
    elif parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"a unix:// URL needs a socket path, e.g. unix:///run/redis.sock; got {redact(url)!r}")
    elif parts.scheme in ("redis+sentinel", "rediss+sentinel"):
        parse_sentinel_url(url)  # its ValueError says what is wrong
    else:
        raise ValueError("expected a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL, "
                         f"got scheme {parts.scheme!r}")
    return url


def check_redis_prefix(prefix: str) -> str:
    """Every key of the store starts with ``prefix``, which must be a hash tag (one Redis Cluster slot)."""
    if not re.fullmatch(r"\{[^{}]+\}[^{}]*", prefix):
        raise ValueError(f"must start with a hash tag such as '{{pg}}' (one Redis Cluster slot), got {prefix!r}")
    return prefix


# The settings fields of workers and gateways: an empty URL is no Redis (the single-machine store).
RedisUrlSetting = Annotated[str | None, AfterValidator(lambda url: check_redis_url(url) if url else None)]
RedisPrefixSetting = Annotated[str, AfterValidator(check_redis_prefix)]
