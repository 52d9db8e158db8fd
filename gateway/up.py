"""``personagate up``: the whole stack on one machine — a worker and a gateway (HTTP and SIP), each in its own
process (so the model's compute never shares an interpreter with the gateway's real-time work),
supervised together: both start, both are reported ready, and both stop when either stops. Ctrl-C
stops both at once; SIGTERM drains both (calls in progress finish; a second signal stops at once).

Routing: by default the gateway's embedded store, fed by reading the worker's ``/v1/info`` every second
(no Redis needed); with ``--redis-url`` both the worker (heartbeats) and the gateway (claims) use that Redis.

On first use it makes an operator token for the admin API and keeps it in the state folder
(``.personagate/`` by default), so the local admin API works without any set-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from .admin.tokens import new_token

READY_TIMEOUT_SECONDS = 900.0  # a PersonaPlex checkpoint takes minutes to load from disk
STOP_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class UpOptions:
    host: str
    worker_port: int
    http_port: int
    tenants: Path
    state_dir: Path
    worker_args: tuple[str, ...]  # --model, --weights, --slots, --device, --greedy as given
    redis_url: str | None = None  # routing through Redis instead of the gateway's embedded store
    sip_port: int = 5060  # the gateway's SIP (UDP) port, on ``host``


def operator_token(state_dir: Path) -> tuple[str, Path]:
    """The local operator token and the tokens file that admits it; made on first use."""
    tokens_file = state_dir / "admin-tokens.yaml"
    token_file = state_dir / "operator-token"
    if tokens_file.is_file() and token_file.is_file():
        return token_file.read_text().strip(), tokens_file
    state_dir.mkdir(parents=True, exist_ok=True)
    token, line = new_token()
    for path, text in ((token_file, token + "\n"), (tokens_file, f"operator:\n  - {line}\n")):
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    return token, tokens_file


async def run_up(options: UpOptions) -> int:
    token, tokens_file = operator_token(options.state_dir)
    cli = [sys.executable, "-m", "gateway.cli"]
    worker_env = None
    routing: list[str] = ["--worker", f"http://{_url_host(options.host)}:{options.worker_port}"]
    if options.redis_url:
        worker_env = os.environ | {"PERSONAGATE_WORKER_REDIS_URL": options.redis_url}
        routing = ["--redis-url", options.redis_url]
    worker = await asyncio.create_subprocess_exec(
        *cli, "worker", "--host", options.host, "--port", str(options.worker_port), *options.worker_args,
        env=worker_env)
    # Tenants that record calls (with a consent announcement) are recorded here unless the environment says where.
    gateway_env = {"PERSONAGATE_GATEWAY_RECORDINGS_DIR": str(recordings_dir(options))} | os.environ
    gateway = await asyncio.create_subprocess_exec(
        *cli, "gateway", "--host", options.host, "--port", str(options.http_port), "--tenants", str(options.tenants),
        "--admin-tokens", str(tokens_file), "--sip-host", options.host, "--sip-port", str(options.sip_port), *routing,
        env=gateway_env)
    children = {"worker": worker, "gateway": gateway}

    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)

    exits = {name: asyncio.create_task(proc.wait(), name=name) for name, proc in children.items()}
    stopping = asyncio.create_task(signals.get())
    ready = asyncio.create_task(_until_ready(options))
    try:
        done, _ = await asyncio.wait([ready, stopping, *exits.values()], return_when=asyncio.FIRST_COMPLETED)
        if ready in done and ready.result():
            _say_ready(options, token, tokens_file)
            done, _ = await asyncio.wait([stopping, *exits.values()], return_when=asyncio.FIRST_COMPLETED)
        failed = [name for name, task in exits.items() if task in done]
        for name in failed:
            print(f"personagate up: the {name} stopped (exit {children[name].returncode}); stopping the rest",
                  file=sys.stderr)
        if not failed and not stopping.done():
            print("personagate up: not ready in time; stopping", file=sys.stderr)
            failed = ["timeout"]
        return 1 if failed else 0
    finally:
        ready.cancel()
        # SIGTERM is passed on as a drain (calls in progress finish); Ctrl-C, a child's failure or a
        # second signal stop everything at once.
        first = stopping.result() if stopping.done() and not stopping.cancelled() else signal.SIGINT
        stopping.cancel()
        await _stop(children, first, signals)


def recordings_dir(options: UpOptions) -> Path:
    """Where the gateway writes call recordings: ``PERSONAGATE_GATEWAY_RECORDINGS_DIR``, else the state folder's."""
    return Path(os.environ.get("PERSONAGATE_GATEWAY_RECORDINGS_DIR") or options.state_dir / "recordings").absolute()


def _url_host(host: str) -> str:
    """The host part of a URL that reaches a server listening on ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _until_ready(options: UpOptions) -> bool:
    """Until a call placed now would be answered: the worker ready, and the gateway ready (tenants loaded, the
    routing store answering) with the worker in view. Says once what each is waiting for, when it changes."""
    worker = f"http://{options.host}:{options.worker_port}/readyz"
    gateway = f"http://{options.host}:{options.http_port}/readyz"
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_SECONDS
    said = None
    async with httpx.AsyncClient(timeout=2.0) as client:
        while asyncio.get_running_loop().time() < deadline:
            waiting = await _not_ready(client, worker, gateway)
            if waiting is None:
                return True
            if waiting != said:
                print(f"personagate up: waiting: {waiting}", file=sys.stderr, flush=True)
                said = waiting
            await asyncio.sleep(0.5)
    return False


async def _not_ready(client: httpx.AsyncClient, worker: str, gateway: str) -> str | None:
    """What the stack still waits for, or None when it can take a call."""
    try:
        if (await client.get(worker)).status_code != 200:
            return "the worker is loading its model"
    except httpx.HTTPError:
        return "the worker is starting"
    try:
        answer = await client.get(gateway)
        details = answer.json()
    except (httpx.HTTPError, ValueError):
        return "the gateway is starting"
    if answer.status_code != 200:
        return f"the gateway: {details.get('reason', 'not ready')}"
    if not details.get("workers_alive"):
        return "the gateway to see the worker"
    return None


def _say_ready(options: UpOptions, token: str, tokens_file: Path) -> None:
    worker = f"ws://{options.host}:{options.worker_port}/v1/sessions"
    admin = f"http://{options.host}:{options.http_port}"
    print(f"""
personagate is up.
  worker        {worker}
  routing       {"Redis at " + _redact(options.redis_url) if options.redis_url else "embedded (no Redis)"}
  tenants       {options.tenants} (edits apply to new calls within seconds)
  recordings    {recordings_dir(options)}   (calls to tenants with recording enabled)
  SIP           udp {_url_host(options.host)}:{options.sip_port}   (trunks from loopback; the dialed number picks the tenant)
  browser       {admin}/call   (call a persona from this machine's browser: harbor-mutual/claims is public)
  admin API     {admin}/v1/admin   (docs: {admin}/docs)
  admin token   {token}   (operator; kept in {tokens_file.parent})

Call a tenant's number over SIP (a real pjsua2 caller; plays the wav, records the agent, prints timings):
  .venv/bin/personagate call sip:+14155550186@{_url_host(options.host)}:{options.sip_port} --play caller.wav --record agent.wav
Talk to a tenant's persona without SIP:
  .venv/bin/personagate session {worker} --persona harbor-mutual/claims --record agent.wav
List the tenants:
  curl -H 'Authorization: Bearer {token}' {admin}/v1/admin/tenants
Ctrl-C stops everything.
""", flush=True)


def _redact(url: str) -> str:
    return re.sub(r"//([^@/:]*):[^@/]*@", r"//\1:***@", url)


async def _stop(children: dict[str, asyncio.subprocess.Process], sig: int, signals: asyncio.Queue[int]) -> None:
    _signal(children, sig)
    if sig == signal.SIGTERM:
        print("personagate up: draining: calls in progress finish (Ctrl-C stops at once)", file=sys.stderr)
        exited = asyncio.gather(*(proc.wait() for proc in children.values()))
        again = asyncio.create_task(signals.get())
        await asyncio.wait([exited, again], return_when=asyncio.FIRST_COMPLETED)
        again.cancel()
        if exited.done():
            return
        _signal(children, signal.SIGINT)
    for proc in children.values():
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _signal(children: dict[str, asyncio.subprocess.Process], sig: int) -> None:
    for proc in children.values():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
