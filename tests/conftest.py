"""Shared test set-up: environment, and a real worker process on loopback."""

import contextlib
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from personagate_common.plane import WorkerAuth, bearer
from tests.redis_server import redis_server  # noqa: F401

# moshi reads this when its modules are imported: without it every test would pay torch.compile's
# start-up on CPU for nothing.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

# The internal plane's shared secret (personagate_common/plane.py), in one place: every worker the tests start
# accepts it and every gateway they start sends it, through the environment both inherit; clients the tests drive
# themselves send WORKER_AUTH_HEADERS (raw WebSocket/HTTP) or WORKER_AUTH (WorkerSession.open, Calls).
TEST_WORKER_SECRET = "personagate-tests-shared-secret-3f9c"
os.environ["PERSONAGATE_WORKER_SESSION_SECRET"] = TEST_WORKER_SECRET
os.environ["PERSONAGATE_GATEWAY_WORKER_SECRET"] = TEST_WORKER_SECRET
WORKER_AUTH_HEADERS = bearer(TEST_WORKER_SECRET)
WORKER_AUTH = WorkerAuth(secret=TEST_WORKER_SECRET)

WORKER_SLOTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def udp_free_port() -> int:
    """A loopback port free for UDP and for TCP: a SIP port (the gateway listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@contextlib.contextmanager
def serve(command: list[str], ready_url: str, *, env: dict[str, str] | None = None, timeout: float = 60.0,
          verify: ssl.SSLContext | bool = True) -> Iterator[subprocess.Popen]:
    """Run ``command`` (a server on loopback) until ``ready_url`` answers 200 (an https one checked with
    ``verify``); stop it afterwards.
    Its log (stderr) goes to a file, not a pipe: an unread pipe would block the server once full. The process
    yielded carries that file's path as ``log_path`` (``tests.helpers.logs`` reads it), until it is stopped; with
    ``PERSONAGATE_TEST_KEEP_LOGS=<folder>`` the log is copied there when the server stops."""
    with tempfile.NamedTemporaryFile(prefix="personagate-", suffix=".log") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        proc.log_path = Path(log.name)  # type: ignore[attr-defined] - read by tests.helpers.logs
        try:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, verify=verify).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{shlex.join(command)} did not become ready: {log.read().decode()[-3000:]}")
                time.sleep(0.1)
            yield proc
        finally:
            stop_process(proc)
            if keep := os.environ.get("PERSONAGATE_TEST_KEEP_LOGS"):  # a folder to copy each server's log to
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(log.name, Path(keep) / f"{Path(command[0]).name}-{command[3] if len(command) > 3 else ''}-{proc.pid}.log")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def worker() -> Iterator[str]:
    """A `personagate worker` subprocess (tiny model, greedy); yields "127.0.0.1:PORT"."""
    port = free_port()
    env = os.environ | {"NO_TORCH_COMPILE": "1", "PERSONAGATE_WORKER_START_TIMEOUT_SECONDS": "2"}
    command = [sys.executable, "-m", "personagate", "worker", "--port", str(port), "--slots", str(WORKER_SLOTS),
               "--greedy"]
    with serve(command, f"http://127.0.0.1:{port}/readyz", env=env):
        yield f"127.0.0.1:{port}"
