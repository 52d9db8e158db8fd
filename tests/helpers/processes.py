"""Real processes for the tests: free loopback ports, a server run until it answers, and its stop."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.helpers.wait import scaled


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
    ``verify``), failing after ``timeout`` seconds (scaled); stop it afterwards.
    Its log (stderr) goes to a file, not a pipe: an unread pipe would block the server once full. The process
    yielded carries that file's path as ``log_path`` (``tests.helpers.logs`` reads it), until it is stopped; with
    ``PERSONAGATE_TEST_KEEP_LOGS=<folder>`` the log is copied there when the server stops."""
    with tempfile.NamedTemporaryFile(prefix="personagate-", suffix=".log") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        proc.log_path = Path(log.name)  # type: ignore[attr-defined] - read by tests.helpers.logs
        try:
            deadline = time.monotonic() + scaled(timeout)
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
    """SIGTERM, then SIGKILL if it has not exited within 10 s (scaled)."""
    proc.terminate()
    try:
        proc.wait(scaled(10))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
