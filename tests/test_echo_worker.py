"""`personagate worker --model echo`: a real worker process that returns each caller's audio one frame later."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers.processes import free_port, serve
from tests.helpers.worker import WORKER_AUTH_HEADERS

FRAME_BYTES = 3840


@pytest.fixture(scope="module")
def echo_worker() -> Iterator[tuple[str, float]]:
    """The worker's "127.0.0.1:PORT" and the seconds it took to become ready."""
    port = free_port()
    env = os.environ | {"NO_TORCH_COMPILE": "1", "PERSONAGATE_WORKER_START_TIMEOUT_SECONDS": "2"}
    command = [sys.executable, "-m", "personagate", "worker", "--model", "echo", "--port", str(port)]
    started = time.monotonic()
    with serve(command, f"http://127.0.0.1:{port}/readyz", env=env):
        yield f"127.0.0.1:{port}", time.monotonic() - started


def _frames(count: int, seed: int) -> list[bytes]:
    """Distinct frames of noise, so that any frame out of place shows."""
    rng = np.random.default_rng(seed)
    return [rng.integers(-32768, 32768, FRAME_BYTES // 2, dtype=np.int64).astype("<i2").tobytes()
            for _ in range(count)]


async def _echo_call(address: str, frames: list[bytes], persona: dict) -> tuple[dict, list[bytes]]:
    """One session: the ready message and the agent frames, caller frames sent every 80 ms."""
    async with connect(f"ws://{address}/v1/sessions", additional_headers=WORKER_AUTH_HEADERS) as ws:
        await ws.send(json.dumps({"type": "start", "persona": persona}))
        ready = json.loads(await ws.recv())
        received: list[bytes] = []

        async def speak() -> None:
            began = asyncio.get_running_loop().time()
            for i, frame in enumerate(frames):
                await asyncio.sleep(max(0.0, began + i * 0.08 - asyncio.get_running_loop().time()))
                await ws.send(frame)
            await asyncio.sleep(0.3)  # the last frames' echoes
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(speak())
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await ws.recv()
                assert isinstance(message, bytes), f"an echo sends no text, got {message!r}"
                received.append(message)
        await sender
        return ready, received


def test_echo_worker_says_it_is_the_echo_model(echo_worker: tuple[str, float]) -> None:
    # How fast it starts is not asserted here: a 2-core machine under load took 15 s once. It loads no model, and
    # its readiness (the fixture's) is all that tests built on it need.
    address, _ = echo_worker
    info = httpx.get(f"http://{address}/v1/info", headers=WORKER_AUTH_HEADERS).json()
    assert info["model"] == "echo"
    assert info["ready"] is True
    assert info["slots"] == 128
    assert {"NATF0", "tiny-low"} <= set(info["voices"])


async def test_caller_hears_their_own_audio_one_frame_later_byte_for_byte(echo_worker: tuple[str, float]) -> None:
    address, _ = echo_worker
    sent = _frames(30, seed=1)
    ready, received = await _echo_call(address, sent, {"prompt": "You are an echo.", "voice": "NATF0"})
    assert ready["type"] == "ready" and ready["persona_cached"] is True
    assert len(received) == len(sent)  # one agent frame per caller frame
    assert received[0] == bytes(FRAME_BYTES)  # the first frame back is silence
    for n in range(1, len(received)):
        assert received[n] == sent[n - 1], f"agent frame {n} is not caller frame {n - 1}"


async def test_two_callers_each_hear_only_themselves(echo_worker: tuple[str, float]) -> None:
    address, _ = echo_worker
    a, b = _frames(15, seed=2), _frames(15, seed=3)
    clip_persona = {"prompt": "", "voice": "tiny-high"}
    (_, got_a), (ready_b, got_b) = await asyncio.gather(
        _echo_call(address, a, {"prompt": "Caller A's echo.", "voice": "NATM1"}),
        _echo_call(address, b, clip_persona),
    )
    assert ready_b["persona_cached"] is True
    assert got_a[1:] == a[:-1] and got_b[1:] == b[:-1]
    async with httpx.AsyncClient() as client:
        info = (await client.get(f"http://{address}/v1/info", headers=WORKER_AUTH_HEADERS)).json()
    assert len(info["cached_personas"]) >= 2


async def test_echo_worker_refuses_an_unknown_voice_as_a_model_would(echo_worker: tuple[str, float]) -> None:
    address, _ = echo_worker
    async with connect(f"ws://{address}/v1/sessions", additional_headers=WORKER_AUTH_HEADERS) as ws:
        await ws.send(json.dumps({"type": "start", "persona": {"prompt": "x", "voice": "nobody"}}))
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 4422
        assert "unknown voice preset 'nobody'" in ws.close_reason


# ``personagate worker`` as ``python -m personagate`` runs it, which writes the top-level modules it has loaded to
# argv[1] once the command returns (after SIGTERM's drain).
_WORKER_RECORDING_ITS_MODULES = """
import json, sys
from pathlib import Path
from personagate.cli import main
record = Path(sys.argv.pop(1))
try:
    status = main(sys.argv[1:])
finally:
    record.write_text(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
sys.exit(status)
"""


@pytest.mark.e2e  # starts a process
async def test_echo_worker_never_loads_torch_or_moshi(tmp_path: Path) -> None:
    """An echo worker that served sessions (a preset voice, and a clip checked as a model checks it) has loaded
    neither torch nor moshi: the echo path imports only the torch-free side of agent_runtime (slots.py)."""
    port, record = free_port(), tmp_path / "modules.json"
    env = os.environ | {"NO_TORCH_COMPILE": "1"}
    command = [sys.executable, "-c", _WORKER_RECORDING_ITS_MODULES, str(record),
               "worker", "--model", "echo", "--port", str(port)]
    clip = io.BytesIO()
    soundfile.write(clip, (np.sin(np.arange(24_000 * 2) / 20) * 0.3).astype(np.float32), 24_000, format="WAV")
    clip_persona = {"prompt": "A clip.", "voice_audio_base64": base64.b64encode(clip.getvalue()).decode()}
    with serve(command, f"http://127.0.0.1:{port}/readyz", env=env):
        for persona in ({"prompt": "A preset.", "voice": "NATF0"}, clip_persona):
            ready, received = await _echo_call(f"127.0.0.1:{port}", _frames(3, seed=4), persona)
            assert ready["type"] == "ready" and len(received) == 3, ready
    loaded = set(json.loads(record.read_text()))
    assert "agent_runtime" in loaded and loaded.isdisjoint({"torch", "moshi"}), sorted(loaded & {"torch", "moshi"})
