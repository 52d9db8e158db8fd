"""Workers in the tests: the internal plane's shared secret, the size of the session's shared worker, a worker of a
test's own (``own_worker``) and a session that talks to one in real time (``TalkingSession``).

Every worker the tests start accepts TEST_WORKER_SECRET and every gateway they start sends it, through the
environment both inherit (tests/conftest.py sets it); clients the tests drive themselves send WORKER_AUTH_HEADERS
(raw WebSocket/HTTP) or WORKER_AUTH (WorkerSession.open, Calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from personagate_common.plane import WorkerAuth, bearer
from tests.helpers.processes import free_port, serve
from tests.helpers.wait import scaled

TEST_WORKER_SECRET = "personagate-tests-shared-secret-3f9c"
WORKER_AUTH_HEADERS = bearer(TEST_WORKER_SECRET)
WORKER_AUTH = WorkerAuth(secret=TEST_WORKER_SECRET)
WORKER_SLOTS = 3  # slots of the `worker` fixture's process (tests/conftest.py)
FRAME_SECONDS = 0.08  # one caller frame: TalkingSession sends one every 80 ms


@contextlib.contextmanager
def own_worker(**settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A worker of this test's own; ``settings`` become PERSONAGATE_WORKER_* variables."""
    port = free_port()
    env = os.environ | {"NO_TORCH_COMPILE": "1"} | {f"PERSONAGATE_WORKER_{k.upper()}": v for k, v in settings.items()}
    command = [sys.executable, "-m", "personagate", "worker", "--port", str(port), "--slots", "2", "--greedy"]
    with serve(command, f"http://127.0.0.1:{port}/readyz", env=env) as proc:
        yield f"127.0.0.1:{port}", proc


class TalkingSession:
    """A session that talks in real time (one caller frame per 80 ms) and notes when agent frames arrive."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.arrivals: list[float] = []
        self._sender = asyncio.create_task(self._send())
        self._receiver = asyncio.create_task(self._receive())

    @classmethod
    async def start(cls, base: str, session_id: str) -> TalkingSession:
        ws = await connect(f"ws://{base}/v1/sessions", open_timeout=scaled(10), additional_headers=WORKER_AUTH_HEADERS)
        await ws.send(json.dumps({"type": "start", "session_id": session_id,
                                  "persona": {"prompt": "You are a claims agent.", "voice": "tiny-low"}}))
        ready = json.loads(await asyncio.wait_for(ws.recv(), scaled(30)))
        assert ready["type"] == "ready" and ready["session_id"] == session_id, ready
        return cls(ws)

    async def _send(self) -> None:
        rng = np.random.default_rng(3)
        began = time.monotonic()
        with contextlib.suppress(ConnectionClosed):
            for i in range(10**6):
                await asyncio.sleep(max(0.0, began + i * FRAME_SECONDS - time.monotonic()))
                await self.ws.send((rng.standard_normal(1920) * 3000).astype("<i2").tobytes())

    async def _receive(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.arrivals.append(time.monotonic())

    def largest_gap(self, since: float) -> float:
        times = [since] + [t for t in self.arrivals if t >= since] + [time.monotonic()]
        return float(max(np.diff(times)))

    async def end(self) -> tuple[int | None, str | None]:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps({"type": "end"}))
        return await self.closed()

    async def closed(self, within: float = 15.0) -> tuple[int | None, str | None]:
        await asyncio.wait_for(asyncio.shield(self._receiver), scaled(within))
        self._sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sender
        return self.ws.close_code, self.ws.close_reason


async def exit_status(proc: subprocess.Popen, within: float) -> int:
    """The exit status of ``proc``, waited for on the event loop; fails the test after ``within`` seconds (scaled)."""
    deadline = time.monotonic() + scaled(within)
    while proc.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"the worker did not exit within {scaled(within):g} s")
        await asyncio.sleep(0.05)
    return proc.returncode
