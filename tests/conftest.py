"""Shared test set-up: environment, and a real worker process on loopback."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest

# moshi reads this when its modules are imported: without it every test would pay torch.compile's
# start-up on CPU for nothing.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

WORKER_SLOTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def worker() -> Iterator[str]:
    """A `personagate worker` subprocess (tiny model, greedy); yields "127.0.0.1:PORT"."""
    port = free_port()
    env = os.environ | {"NO_TORCH_COMPILE": "1", "PERSONAGATE_WORKER_START_TIMEOUT_SECONDS": "2"}
    # The log goes to a file, not a pipe: an unread pipe would block the worker once full.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker", "--port", str(port), "--slots", str(WORKER_SLOTS),
             "--greedy"],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
        base = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://{base}/readyz").status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"worker did not become ready: {log.read().decode()[-2000:]}")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
