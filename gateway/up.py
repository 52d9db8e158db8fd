"""``personagate up``: the whole stack on one machine — a worker and a gateway (HTTP and SIP), each in its own
process (so the model's compute never shares an interpreter with the gateway's real-time work),
supervised together.

Contract: a component that crashes after it was ready is restarted alone, with backoff, and hands its restart
count to the new process (``PERSONAGATE_RESTARTS``); one that never became ready, or was stopped on purpose,
stops ``up``. Ctrl-C stops both, SIGTERM drains both. The operator token and the internal plane's secret
(``worker-secret``, mode 0600) are made once in the state folder and given to both processes by path; a
secret in ``up``'s own environment is not passed on, so the pair always agrees.

Details (backoff, restart counts, what is printed): README.md#quick-start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from personagate_common.plane import new_secret, read_secrets, write_private_file
from personagate_common.serving import RESTARTS_ENV

from .admin.tokens import new_token

READY_TIMEOUT_SECONDS = 900.0  # a PersonaPlex checkpoint takes minutes to load from disk
STOP_TIMEOUT_SECONDS = 30.0
READY_POLL_SECONDS = 0.5
FIRST_RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 30.0
# Ready this long after a restart: the component is healthy again, and its next crash is a new incident
# (restarted after the first delay), not part of a crash loop.
HEALTHY_SECONDS = 60.0
# How a process ends when someone stops it on purpose (the worker and the gateway drain or stop on these and
# exit 0; they die by them only before their handlers are installed): not a crash.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_STATE_DIR = Path(".personagate")
WORKER_SECRET_FILE = "worker-secret"  # in the state folder: the shared secret of the worker and the gateway
# Where a worker or a gateway could otherwise pick up a secret of its own from up's environment.
INHERITED_SECRET_ENV = ("PERSONAGATE_WORKER_SESSION_SECRET", "PERSONAGATE_WORKER_SESSION_SECRET_FILE",
                        "PERSONAGATE_WORKER_INSECURE_OPEN_SESSIONS", "PERSONAGATE_GATEWAY_WORKER_SECRET",
                        "PERSONAGATE_GATEWAY_WORKER_SECRET_FILE")


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
    token, line = new_token()
    for path, text in ((token_file, token + "\n"), (tokens_file, f"operator:\n  - {line}\n")):
        write_private_file(path, text)
    return token, tokens_file


def worker_secret(state_dir: Path) -> Path:
    """The file of the shared secret the worker accepts and the gateway sends; made (mode 0600) on first use, and
    made again if it no longer holds a usable secret."""
    path = state_dir / WORKER_SECRET_FILE
    if path.is_file():
        try:
            read_secrets(str(path), path)
            return path
        except ValueError:
            pass
    write_private_file(path, new_secret() + "\n")
    return path


async def run_up(options: UpOptions) -> int:
    """Run the stack until Ctrl-C or SIGTERM (status 0), or until a component fails in a way a restart cannot
    mend or the stack is not ready in time (status 1); see the module docstring."""
    token, tokens_file = operator_token(options.state_dir)
    supervisor = Supervisor(_components(options, tokens_file, worker_secret(options.state_dir)), on_up=lambda: _say_ready(options, token, tokens_file))
    return await supervisor.run()


@dataclass
class Component:
    """The worker or the gateway: how to start it, and what ``up`` knows about its current process."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    ready_url: str  # 200 once this component is ready (its own part: the gateway's does not wait for a worker)
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0  # by this ``up``, after crashes
    crashes_in_a_row: int = 0  # without a healthy run in between: sets the restart delay
    ready_since: float | None = None  # loop time at which the current process was first seen ready
    ever_ready: bool = False  # some process of this component has been ready: a crash is worth a restart
    announced_restarts: int = 0  # restarts already reported as "up" or "back"

    async def start(self) -> asyncio.subprocess.Process:
        """Start a process of this component, telling it how many restarts came before it."""
        self.ready_since = None
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env | {RESTARTS_ENV: str(self.restarts)})
        return self.process

    def crashed(self, ready_since: float | None, now: float) -> float:
        """Count a crash, at ``now``, of a process that had been ready since ``ready_since`` (None: it never was);
        the seconds to wait before restarting it. Ready for HEALTHY_SECONDS makes it a first crash again."""
        healthy = ready_since is not None and now - ready_since >= HEALTHY_SECONDS
        self.crashes_in_a_row = 1 if healthy else self.crashes_in_a_row + 1
        self.restarts += 1
        return restart_delay(self.crashes_in_a_row)


def restart_delay(crashes_in_a_row: int) -> float:
    """Seconds to wait before restarting a component after its ``crashes_in_a_row``-th crash (1 for the first)
    with no healthy run in between: 1, 2, 4, … capped at 30."""
    doublings = min(max(crashes_in_a_row - 1, 0), 16)
    return min(MAX_RESTART_DELAY_SECONDS, FIRST_RESTART_DELAY_SECONDS * 2**doublings)


def describe_exit(returncode: int) -> str:
    """A process's end as people read it: ``exit 1``, ``killed by SIGSEGV``."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def stopped_on_purpose(returncode: int) -> bool:
    """Whether a process ended as a stopped one does (status 0, or one of ``STOP_SIGNALS``), not as a crash."""
    return returncode == 0 or -returncode in STOP_SIGNALS


class Supervisor:
    """Runs the components, restarts those that crash after having been ready, and stops them all on a signal
    or a failure that a restart cannot mend."""

    def __init__(self, components: list[Component], on_up: Callable[[], None]) -> None:
        self.components = {component.name: component for component in components}
        self.on_up = on_up  # the stack can take calls for the first time
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.stopping = False  # set before the first stop signal goes out: from then on nothing is restarted
        self.stop_signal: int = signal.SIGINT  # what a process started while stopping is sent at once
        self._stopped = asyncio.Event()  # set with ``stopping``: wakes restarts waiting out their delay
        self._restarted = asyncio.Event()  # a component crashed: watch readiness until the stack is back

    async def run(self) -> int:
        """Start the components and supervise them until ``up`` stops; its exit status (0: stopped by a signal)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        keepers: list[asyncio.Task[None]] = []
        first_signal = asyncio.create_task(self.signals.get())
        watcher = asyncio.create_task(self._watch_readiness())
        failed = True
        try:
            for component in self.components.values():
                await component.start()
                keepers.append(asyncio.create_task(self._keep(component), name=component.name))
            done, _ = await asyncio.wait([first_signal, watcher, *keepers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a bug in the watcher or a keeper surfaces here, after everything is stopped
            # A keeper returns only after saying why its component cannot be restarted.
            if watcher in done and not first_signal.done():
                _say("not ready in time; stopping")
            failed = not first_signal.done()
        finally:
            watcher.cancel()
            # SIGTERM is passed on as a drain (calls in progress finish); Ctrl-C, a failure or a second
            # signal stop everything at once.
            first = first_signal.result() if first_signal.done() and not first_signal.cancelled() else signal.SIGINT
            first_signal.cancel()
            await self._stop(first, keepers)
        return 1 if failed else 0

    async def _keep(self, component: Component) -> None:
        """Restart ``component`` each time it crashes after having been ready. Returns once ``up`` stops, or
        after saying why the component is not restarted (which stops ``up``)."""
        loop = asyncio.get_running_loop()
        name = component.name
        while True:
            assert component.process is not None
            returncode = await component.process.wait()
            ready_since, component.ready_since = component.ready_since, None
            if self.stopping:
                return
            how = describe_exit(returncode)
            if stopped_on_purpose(returncode):
                _say(f"the {name} stopped ({how}) without up asking it to: not restarted; stopping the rest")
                return
            if not component.ever_ready:
                _say(f"the {name} exited ({how}) before it was ever ready: not restarted (a configuration error "
                     f"or a port in use would only fail again); stopping the rest")
                return
            delay = component.crashed(ready_since, loop.time())
            when = "" if ready_since is not None else " before it was ready again"
            _say(f"the {name} crashed ({how}){when}; restarting it in {delay:g} s "
                 f"(restart {component.restarts} since up started)")
            self._restarted.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopped.wait()
            if self.stopping:
                return
            try:
                process = await component.start()
            except OSError as exc:
                _say(f"the {name} could not be restarted ({exc}); stopping the rest")
                return
            if self.stopping:  # ``up`` began to stop while this process was starting: it missed the signal
                _send(process, self.stop_signal)

    async def _watch_readiness(self) -> None:
        """Say when the stack is up (once, in full) and when a restarted component is back. Returns only if
        the stack is not ready within READY_TIMEOUT_SECONDS of the start."""
        async with httpx.AsyncClient(timeout=2.0) as client:
            deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_SECONDS
            if not await self._until_ready(client, deadline):
                return
            self.on_up()
            for component in self.components.values():
                component.announced_restarts = component.restarts
            while True:
                await self._restarted.wait()
                self._restarted.clear()
                await self._until_ready(client, None)
                for component in self.components.values():
                    if component.restarts > component.announced_restarts:
                        _say(f"the {component.name} is back (restart {component.restarts})")
                        component.announced_restarts = component.restarts

    async def _until_ready(self, client: httpx.AsyncClient, deadline: float | None) -> bool:
        """Until a call placed now would be answered (True), or ``deadline`` (loop time) passes (False). Before
        the first time, says what the stack waits for whenever that changes."""
        loop = asyncio.get_running_loop()
        said = None
        while deadline is None or loop.time() < deadline:
            waiting = await self._not_ready(client)
            if waiting is None:
                return True
            if deadline is not None and waiting != said:
                _say(f"waiting: {waiting}")
                said = waiting
            await asyncio.sleep(READY_POLL_SECONDS)
        return False

    async def _not_ready(self, client: httpx.AsyncClient) -> str | None:
        """What the stack still waits for, or None when it can take a call: the worker ready, and the gateway
        ready (tenants loaded, the routing store answering) with the worker in view. Notes which components
        are ready on the way."""
        worker_status, _ = await self._probe(client, self.components["worker"])
        gateway_status, gateway = await self._probe(client, self.components["gateway"])
        if worker_status is None:
            return "the worker is starting"
        if worker_status != 200:
            return "the worker is loading its model"
        if gateway_status is None:
            return "the gateway is starting"
        if gateway_status != 200:
            return f"the gateway: {gateway.get('reason', 'not ready')}"
        # The worker's answer in the gateway's own poll, not only its routing record: after a worker restart
        # the old process's record stays alive for a few seconds and would announce "back" too early.
        if not gateway.get("workers_alive") or gateway.get("workers_reachable") == 0:
            return "the gateway to see the worker"
        return None

    async def _probe(self, client: httpx.AsyncClient, component: Component) -> tuple[int | None, dict[str, Any]]:
        """The status and JSON body of ``component``'s readiness probe, (None, {}) if it does not answer; marks
        the component ready on a 200 from the process running now."""
        process = component.process
        try:
            answer = await client.get(component.ready_url)
            details = answer.json()
        except (httpx.HTTPError, ValueError):
            return None, {}
        if answer.status_code == 200 and process is component.process and process is not None \
                and process.returncode is None and component.ready_since is None:
            component.ready_since = asyncio.get_running_loop().time()
            component.ever_ready = True
        return answer.status_code, details if isinstance(details, dict) else {}

    async def _stop(self, sig: int, keepers: list[asyncio.Task[None]]) -> None:
        """Stop every component (SIGTERM: a drain, until done or a second signal) and wait for them to exit."""
        self.stopping = True
        self._stopped.set()
        self._signal_all(sig)
        if sig == signal.SIGTERM:
            _say("draining: calls in progress finish (Ctrl-C stops at once)")
            again = asyncio.create_task(self.signals.get())
            running: set[asyncio.Task[None]] = set(keepers)
            while running and not again.done():
                done, _ = await asyncio.wait([*running, again], return_when=asyncio.FIRST_COMPLETED)
                running -= done
            again.cancel()
            if not running:
                return
            self._signal_all(signal.SIGINT)
        for component, keeper in zip(self.components.values(), keepers, strict=False):
            _, pending = await asyncio.wait([keeper], timeout=STOP_TIMEOUT_SECONDS)
            if pending and component.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    component.process.kill()
            await keeper

    def _signal_all(self, sig: int) -> None:
        self.stop_signal = sig
        for component in self.components.values():
            if component.process is not None:
                _send(component.process, sig)


def _components(options: UpOptions, tokens_file: Path, secret_file: Path) -> list[Component]:
    """The worker and the gateway of ``options``: their command lines, environments and readiness probes. Both
    get ``secret_file``, the worker as its accepted secret, the gateway as the one it sends."""
    cli = (sys.executable, "-m", "personagate")
    worker_url = f"http://{_url_host(options.host)}:{options.worker_port}"
    gateway_url = f"http://{_url_host(options.host)}:{options.http_port}"
    inherited = {k: v for k, v in os.environ.items() if k not in INHERITED_SECRET_ENV}
    worker_env = inherited | {"PERSONAGATE_WORKER_SESSION_SECRET_FILE": str(secret_file.absolute())}
    routing: tuple[str, ...] = ("--worker", worker_url)
    if options.redis_url:
        worker_env["PERSONAGATE_WORKER_REDIS_URL"] = options.redis_url
        routing = ("--redis-url", options.redis_url)
    # Tenants that record calls (with a consent announcement) are recorded here unless the environment says where.
    gateway_env = {"PERSONAGATE_GATEWAY_RECORDINGS_DIR": str(recordings_dir(options))} | inherited | {
        "PERSONAGATE_GATEWAY_WORKER_SECRET_FILE": str(secret_file.absolute())}
    return [
        Component("worker", (*cli, "worker", "--host", options.host, "--port", str(options.worker_port),
                             *options.worker_args), worker_env, f"{worker_url}/readyz"),
        Component("gateway", (*cli, "gateway", "--host", options.host, "--port", str(options.http_port),
                              "--tenants", str(options.tenants), "--admin-tokens", str(tokens_file),
                              "--sip-host", options.host, "--sip-port", str(options.sip_port), *routing),
                  gateway_env, f"{gateway_url}/readyz"),
    ]


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


def _say_ready(options: UpOptions, token: str, tokens_file: Path) -> None:
    worker = f"ws://{options.host}:{options.worker_port}/v1/sessions"
    # personagate session finds the secret in the default state folder by itself; elsewhere it is told where.
    secret_flag = "" if options.state_dir == DEFAULT_STATE_DIR else \
        f" --secret-file {options.state_dir / WORKER_SECRET_FILE}"
    admin = f"http://{options.host}:{options.http_port}"
    print(f"""
personagate is up.
  worker        {worker}
  routing       {"Redis at " + _redact(options.redis_url) if options.redis_url else "embedded (no Redis)"}
  tenants       {options.tenants} (edits apply to new calls within seconds)
  recordings    {recordings_dir(options)}   (calls to tenants with recording enabled)
  SIP           udp and tcp {_url_host(options.host)}:{options.sip_port}   (trunks from loopback; the dialed number picks the tenant)
  browser       {admin}/call   (call a persona from this machine's browser: harbor-mutual/claims is public)
  admin API     {admin}/v1/admin   (docs: {admin}/docs)
  admin token   {token}   (operator; kept in {tokens_file.parent})

Call a tenant's number over SIP (a real pjsua2 caller; plays the wav, records the agent, prints timings):
  .venv/bin/personagate call sip:+14155550186@{_url_host(options.host)}:{options.sip_port} --play caller.wav --record agent.wav
Talk to a tenant's persona without SIP (with the workers' shared secret, kept in {options.state_dir / WORKER_SECRET_FILE}):
  .venv/bin/personagate session {worker} --persona harbor-mutual/claims --record agent.wav{secret_flag}
List the tenants:
  curl -H 'Authorization: Bearer {token}' {admin}/v1/admin/tenants
Ctrl-C stops everything.
""", flush=True)


def _redact(url: str) -> str:
    return re.sub(r"//([^@/:]*):[^@/]*@", r"//\1:***@", url)


def _say(text: str) -> None:
    print(f"personagate up: {text}", file=sys.stderr, flush=True)


def _send(process: asyncio.subprocess.Process, sig: int) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
