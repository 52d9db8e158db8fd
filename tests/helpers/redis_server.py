"""A real ``redis-server`` for the tests: one per session, on a free loopback port, no persistence.

``stop()`` and ``start()`` restart it on the same port (empty, since nothing is saved), which is how the
outage tests take Redis away and bring it back. Skips with a clear message where redis-server is missing.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import free_port
from tests.helpers.programs import require
from tests.helpers.wait import scaled


def ping(port: int, timeout: float = 0.2) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


class RedisServer:
    """A redis-server subprocess. ``args`` are extra command-line arguments (e.g. ``--cluster-enabled yes``)."""

    def __init__(self, executable: str, directory: Path, port: int | None = None, args: tuple[str, ...] = (),
                 config: str | None = None) -> None:
        self.executable = executable
        self.directory = directory
        self.port = port or free_port()
        self.args = args
        self.config = config  # a config file's text (Sentinel needs a writable one)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        command = [self.executable]
        if self.config is not None:
            conf = self.directory / f"redis-{self.port}.conf"
            conf.write_text(self.config)
            command.append(str(conf))
        command += [
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), "--logfile", str(self.log_path), *self.args,
        ]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + scaled(timeout)
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING: {log}")
            time.sleep(0.02)

    def stop(self, kill: bool = False) -> None:
        """Stop it (SIGKILL with ``kill``: as abrupt as a crash). Its data is gone: nothing is saved."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def redis_executable() -> str:
    """redis-server's path; skips the test where it is missing."""
    return require("redis-server")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A running redis-server (``.url``, ``.stop()``, ``.start()``); tests must leave it running."""
    exe = redis_executable()
    with tempfile.TemporaryDirectory(prefix="pg-redis-") as directory:
        server = RedisServer(exe, Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()
