"""A browser caller in the test (an aiortc peer connection: Opus, ICE, DTLS-SRTP, a data channel, what a browser
speaks) and the WebRTC test stack it calls: a real `personagate worker` and `personagate gateway` on loopback, with
the shipped tenants changed so that what a test sees never depends on the time of day.

    with webrtc_stack(tenant_copy(folder / "tenants")) as stack:
        async with browser() as call:
            await place(http, call, *PUBLIC)
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import os
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml
from aiortc import MediaStreamTrack, RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from gateway.admin.tokens import new_token
from tests.helpers.processes import free_port, serve
from tests.helpers.stack import readyz
from tests.helpers.wait import scaled, until

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
PUBLIC = ("harbor-mutual", "claims")  # public_link: true in the shipped tenant
PRIVATE = ("northwind-bank", "lost-stolen")  # admins only
CLOSED = ("northwind-bank", "card-services")  # public in the test's copy, where the bank is always closed
LOUD_RMS = 100.0  # int16 RMS above which a received frame counts as agent audio (silence is 0)


# ---------------------------------------------------------------------- the browser's side


class CallerVoice(MediaStreamTrack):
    """The browser's microphone: a tone in half-second bursts (or silence), 20 ms at 48 kHz, paced in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.speaking = True
        self._n = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        loop = asyncio.get_running_loop()
        self._start = self._start or loop.time()
        due = self._start + self._n * 0.02
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        t = (np.arange(960) + self._n * 960) / 48_000
        burst = self.speaking and (self._n // 25) % 2 == 0
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t) * burst).astype(np.int16)
        # stereo, as the Opus encoder takes it: aiortc would mix a mono frame into stereo 3 dB down
        frame = AudioFrame.from_ndarray(np.repeat(pcm, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48_000, self._n * 960, fractions.Fraction(1, 48_000)
        self._n += 1
        return frame


@dataclass
class Browser:
    """One browser call: its peer connection, what came over the data channel, and the agent audio heard."""

    pc: RTCPeerConnection
    voice: CallerVoice
    began: float = field(default_factory=time.monotonic)
    events: list[dict] = field(default_factory=list)
    frames: int = 0
    loud_frames: int = 0
    first_audio: float | None = None
    location: str | None = None
    secret: str | None = None  # the call's secret, answered with it: what hangs it up
    channel: RTCDataChannel | None = None  # the "events" data channel
    heard: list[np.ndarray] = field(default_factory=list)  # every received frame, mono, with its arrival time
    arrivals: list[float] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events]

    def transcript(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "text")

    async def until(self, check, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + scaled(timeout)
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting until {what}; events: {self.kinds()[:20]}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    call = Browser(pc, CallerVoice())
    channel = call.channel = pc.createDataChannel("events")
    channel.on("message", lambda message: call.events.append(json.loads(message)))
    pc.addTrack(call.voice)

    async def listen(track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            call.frames += 1
            samples = frame.to_ndarray().astype(np.float32).reshape(-1, len(frame.layout.channels)).mean(axis=1)
            call.heard.append(samples)
            call.arrivals.append(time.monotonic())
            if float(np.sqrt(np.mean(samples * samples))) > LOUD_RMS:
                call.loud_frames += 1
                call.first_audio = call.first_audio or time.monotonic()

    listeners: list[asyncio.Task] = []
    pc.on("track", lambda track: listeners.append(asyncio.create_task(listen(track))))
    await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers every candidate first
    try:
        yield call
    finally:
        await pc.close()
        for task in listeners:
            task.cancel()


async def place(http: httpx.AsyncClient, call: Browser, tenant: str, persona: str,
                token: str | None = None) -> httpx.Response:
    """POST the browser's offer; on 201 apply the answer."""
    headers = {"Content-Type": "application/sdp"} | ({"Authorization": f"Bearer {token}"} if token else {})
    response = await http.post(f"/v1/webrtc/calls/{tenant}/{persona}", content=call.pc.localDescription.sdp,
                               headers=headers)
    if response.status_code == 201:
        call.location = response.headers["location"]
        call.secret = response.headers["personagate-call-secret"]
        await call.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
    return response


async def hang_up(http: httpx.AsyncClient, call: Browser) -> httpx.Response:
    """DELETE the call as its creator does: with the call's secret."""
    assert call.location is not None and call.secret is not None
    return await http.delete(call.location, headers={"Authorization": f"Bearer {call.secret}"})


# ---------------------------------------------------------------------- the stack


@dataclass
class Stack:
    http: str
    admin_token: str  # harbor-mutual's admin
    other_token: str  # northwind-bank's admin
    gateway_log: Path | None = None  # the gateway's log (stderr), while the stack runs


def tenant_copy(folder: Path, *, harbor_limit: int | None = None, bank_public_and_closed: bool = False,
                harbor_always_open: bool = False, bank_public_always_open: bool = False) -> Path:
    """The shipped tenants copied into ``folder``, changed for a test: Harbor Mutual's call limit, the bank's public
    link with its lines closed at every hour (or open at every hour), or Harbor Mutual open at every hour (its
    ``hours`` removed), so that what a test sees never depends on the time of day it runs at."""
    for tenant in ("harbor-mutual", "northwind-bank"):
        shutil.copytree(ROOT / "tenants" / tenant, folder / tenant)
    for tenant, always_open in (("harbor-mutual", harbor_always_open), ("northwind-bank", bank_public_always_open)):
        if always_open:  # no hours: the line is open all the time (docs/tenants.md)
            path = folder / tenant / "tenant.yaml"
            data, n = re.subn(r"\nhours:\n(?:(?:  .*)?\n)*", "\n", path.read_text())
            assert n == 1
            path.write_text(data)
    if bank_public_and_closed or bank_public_always_open:  # card-services on a public link
        path = folder / "northwind-bank" / "tenant.yaml"
        data = path.read_text()
        if bank_public_and_closed:  # and the bank closed at every hour
            data = re.sub(r'"\d\d:\d\d-\d\d:\d\d"', "closed", data)
        data, n = re.subn(r"(\n    voice:\n      clip: voices/card-services.flac\n)",
                          r"\1    public_link: true\n", data)
        assert n == 1
        path.write_text(data)
    if harbor_limit is not None:
        path = folder / "harbor-mutual" / "tenant.yaml"
        data = path.read_text()
        data, n = re.subn(r"max_concurrent_calls: \d+", f"max_concurrent_calls: {harbor_limit}", data)
        if not n:
            data += f"\nlimits:\n  max_concurrent_calls: {harbor_limit}\n"
        path.write_text(data)
    return folder


@contextlib.contextmanager
def webrtc_stack(folder: Path, env: dict[str, str] | None = None, *, slots: int = 2,
                 worker_args: tuple[str, ...] = ()) -> Iterator[Stack]:
    """A tiny-model worker (or ``worker_args``'s) and a gateway (embedded routing) with an admin tokens file, as
    real processes."""
    env = os.environ | {"NO_TORCH_COMPILE": "1"} | (env or {})
    (harbor, harbor_hash), (bank, bank_hash) = new_token(), new_token()
    tokens = folder / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tenants": {"harbor-mutual": [harbor_hash], "northwind-bank": [bank_hash]}}))
    worker_port, http_port = free_port(), free_port()
    worker = serve([sys.executable, "-m", "personagate", "worker", *worker_args, "--port", str(worker_port),
                    "--slots", str(slots)],
                   f"http://127.0.0.1:{worker_port}/readyz", env=env, timeout=120)
    gateway = serve([sys.executable, "-m", "personagate", "gateway", "--port", str(http_port), "--tenants",
                     str(folder / "tenants"), "--worker", f"http://127.0.0.1:{worker_port}"],
                    f"http://127.0.0.1:{http_port}/readyz",
                    env=env | {"PERSONAGATE_GATEWAY_ADMIN_TOKENS_FILE": str(tokens)})
    with worker, gateway as gateway_process:
        http = f"http://127.0.0.1:{http_port}"
        until(lambda: readyz(http)["slots_free"] == slots, "the gateway sees the worker's slots")
        yield Stack(http, harbor, bank, gateway_log=gateway_process.log_path)


async def metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """Every sample of the gateway's /metrics (``http``'s base URL), by its name with labels."""
    samples = {}
    for line in (await http.get("/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
