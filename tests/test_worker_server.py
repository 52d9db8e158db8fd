"""The worker as a gateway sees it: a real `personagate worker` process on loopback, spoken to over
WebSocket and HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time

import httpx
import numpy as np
import pytest
import soundfile
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import WORKER_SLOTS as SLOTS

FRAME = (np.sin(np.arange(1920) * 2 * np.pi * 300 / 24000) * 6000).astype("<i2").tobytes()


def _start(voice: str = "tiny-low", **persona) -> str:
    return json.dumps({"type": "start", "persona": {"prompt": "You are a claims agent.", "voice": voice} | persona})


async def _open(base: str, start: str | None = None) -> tuple[ClientConnection, dict]:
    ws = await connect(f"ws://{base}/v1/sessions")
    await ws.send(start or _start())
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws, ready


async def _talk(ws: ClientConnection, frames: int) -> tuple[int, list[str], list[float]]:
    """Send frames at 80 ms pacing while counting agent frames; returns (frames, texts, arrival times)."""

    async def send() -> None:
        for _ in range(frames):
            await ws.send(FRAME)
            await asyncio.sleep(0.08)

    sender = asyncio.create_task(send())
    audio, texts, arrivals = 0, [], []
    deadline = time.monotonic() + frames * 0.08 + 1.0
    with contextlib.suppress(TimeoutError):
        while (left := deadline - time.monotonic()) > 0:
            message = await asyncio.wait_for(ws.recv(), left)
            if isinstance(message, bytes):
                assert len(message) == 3840
                audio += 1
                arrivals.append(time.monotonic())
            else:
                texts.append(json.loads(message)["text"])
    await sender
    return audio, texts, arrivals


async def _closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code, ws.close_reason


async def _free_slots(base: str) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://{base}/v1/info")).json()["free_slots"]


async def test_a_call_streams_agent_audio_and_text_and_ends_cleanly(worker):
    """A gateway starts a session with a persona, streams caller audio in 80 ms frames and gets one
    agent frame back per frame, with the agent's text; `end` closes with 1000."""
    ws, ready = await _open(worker)
    assert ready["slot"] in range(SLOTS) and ready["start_ms"] < 5000
    audio, texts, _ = await _talk(ws, 20)
    assert audio >= 17
    assert all(isinstance(t, str) and t for t in texts)
    await ws.send(json.dumps({"type": "end"}))
    assert await _closed(ws) == (1000, "session ended: client_end")


async def test_a_malformed_frame_ends_only_its_own_session(worker):
    """A client sending a frame of the wrong size gets a close code with the reason, and a call
    running next to it on the same worker keeps receiving audio without a gap."""
    steady, _ = await _open(worker)
    broken, _ = await _open(worker, _start("tiny-high"))
    talking = asyncio.create_task(_talk(steady, 30))
    await asyncio.sleep(0.8)
    await broken.send(b"\x00" * 100)
    code, reason = await _closed(broken)
    assert code == 4400 and "3840 bytes" in reason
    audio, _, arrivals = await talking
    assert audio >= 25
    assert max(np.diff(arrivals)) < 0.5
    await steady.close()


@pytest.mark.parametrize("first, code, reason", [
    (b"\x00" * 3840, 4400, "JSON start message"),
    ("not json", 4400, "not JSON"),
    (json.dumps({"type": "hello"}), 4400, '{"type": "start"'),
    (json.dumps({"type": "start", "persona": "claims"}), 4400, "persona must be an object"),
    (_start("nobody"), 4422, "unknown voice preset 'nobody'"),
    (json.dumps({"type": "start", "persona": {"prompt": "x", "voice_audio_base64": "!!"}}), 4400, "not base64"),
])
async def test_bad_start_messages_get_a_close_code_and_reason(worker, first, code, reason):
    """Every malformed start is refused with a close code and a reason a developer can act on."""
    ws = await connect(f"ws://{worker}/v1/sessions")
    await ws.send(first)
    got_code, got_reason = await _closed(ws)
    assert got_code == code and reason in got_reason


async def test_no_start_message_times_out(worker):
    """A client that connects and says nothing is closed with 4408 instead of holding a socket."""
    ws = await connect(f"ws://{worker}/v1/sessions")
    code, reason = await _closed(ws)
    assert code == 4408 and "start message" in reason


async def test_a_full_worker_refuses_and_a_freed_slot_is_reused(worker):
    """With every slot busy the next session is refused with 4503 at once, so the gateway can try
    another worker; as soon as a call ends its slot takes a new call."""
    sessions = [(await _open(worker))[0] for _ in range(SLOTS)]
    refused = await connect(f"ws://{worker}/v1/sessions")
    await refused.send(_start())
    code, reason = await _closed(refused)
    assert code == 4503 and "slots are in use" in reason
    await sessions[0].send(json.dumps({"type": "end"}))
    await _closed(sessions[0])
    again, _ = await _open(worker)
    for ws in [again, *sessions[1:]]:
        await ws.close()


async def test_a_vanished_client_frees_its_slot_at_once(worker):
    """A gateway that dies mid-call (no close handshake) does not leave a ghost session behind."""
    ws, _ = await _open(worker)
    await _talk(ws, 3)
    assert await _free_slots(worker) == SLOTS - 1
    ws.transport.abort()
    deadline = time.monotonic() + 3
    while await _free_slots(worker) != SLOTS:
        assert time.monotonic() < deadline, "slot not freed"
        await asyncio.sleep(0.05)


async def test_a_voice_clip_can_be_sent_with_the_session(worker):
    """A persona's voice may be a clip sent inline (any rate, stereo); a clip of the wrong length is
    refused with the measured length."""
    t = np.arange(2 * 16_000) / 16_000
    tone = 0.3 * np.sin(2 * np.pi * 140 * t)
    clip = io.BytesIO()
    soundfile.write(clip, np.stack([tone, tone], axis=1).astype(np.float32), 16_000, format="WAV")
    start = json.dumps({"type": "start", "persona": {
        "prompt": "You are a bank agent.", "voice_audio_base64": base64.b64encode(clip.getvalue()).decode()}})
    ws, ready = await _open(worker, start)
    assert ready["persona_cached"] is False
    await ws.close()
    short = io.BytesIO()
    soundfile.write(short, tone[:1600].astype(np.float32), 16_000, format="WAV")
    ws = await connect(f"ws://{worker}/v1/sessions")
    await ws.send(json.dumps({"type": "start", "persona": {
        "prompt": "x", "voice_audio_base64": base64.b64encode(short.getvalue()).decode()}}))
    code, reason = await _closed(ws)
    assert code == 4422 and "0.10 s long" in reason


async def test_probes_and_metrics(worker):
    """Kubernetes probes answer, and Prometheus sees the pool: capacity, tick times, sessions."""
    ws, _ = await _open(worker)
    await _talk(ws, 3)
    await ws.send(json.dumps({"type": "end"}))
    await _closed(ws)
    async with httpx.AsyncClient(base_url=f"http://{worker}") as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = (await http.get("/readyz")).json()
        assert ready["ready"] is True and ready["free_slots"] == SLOTS
        metrics = (await http.get("/metrics")).text
    for line in (
        f"personagate_worker_slots_capacity {float(SLOTS)}",
        "personagate_worker_tick_step_seconds_count",
        "personagate_worker_sessions_started_total",
        'personagate_worker_sessions_ended_total{reason="client_end"}',
        'personagate_worker_session_start_seconds_bucket{le="0.3",persona_cache="hit"}',
        "personagate_worker_tick_deadline_misses_total",
    ):
        assert line in metrics, line
