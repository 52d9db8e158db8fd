"""The worker's public surface, end to end: a real `personagate worker` process on loopback (the
session-scoped ``worker`` fixture in conftest.py: tiny model, 3 slots, greedy, a 2 s start timeout),
spoken to the way a gateway would, over WebSocket (``websockets``) and HTTP (``httpx``).

No assert here depends on exact timings: waits are generous and gaps are bounded loosely, so that
the file passes on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import time
import uuid

import httpx
import numpy as np
import pytest
import soundfile
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from personagate_common.voices import PRESET_VOICES
from tests.helpers.worker import WORKER_AUTH_HEADERS
from tests.helpers.worker import WORKER_SLOTS as SLOTS

FRAME_BYTES = 3840  # 1920 samples s16le mono, 24 kHz: 80 ms
FRAME_SECONDS = 0.08
START_WAIT = 30.0  # priming a new persona on a busy CPU: generous
CLOSE_WAIT = 10.0


def _tone_frames(count: int, hz: float = 220.0) -> list[bytes]:
    """`count` consecutive 80 ms frames of a tone with a little noise (a caller saying something)."""
    rng = np.random.default_rng(7)
    t = np.arange(count * 1920) / 24_000
    signal = 0.25 * np.sin(2 * np.pi * hz * t) + 0.02 * rng.standard_normal(t.size)
    pcm = (signal * 32767).astype("<i2").tobytes()
    return [pcm[i * FRAME_BYTES:(i + 1) * FRAME_BYTES] for i in range(count)]


def _start(voice: str = "tiny-low", prompt: str = "You are a claims agent.", **fields) -> str:
    return json.dumps({"type": "start", "persona": {"prompt": prompt, "voice": voice}} | fields)


async def _open(base: str, start: str | None = None) -> tuple[ClientConnection, dict]:
    ws = await connect(f"ws://{base}/v1/sessions", open_timeout=10, additional_headers=WORKER_AUTH_HEADERS)
    await ws.send(start or _start())
    ready = json.loads(await asyncio.wait_for(ws.recv(), START_WAIT))
    assert ready["type"] == "ready", ready
    return ws, ready


async def _refused(base: str, first: str | bytes | None) -> tuple[int | None, str | None]:
    """Connect, send `first` (or nothing) and return the close code and reason the worker gives."""
    ws = await connect(f"ws://{base}/v1/sessions", open_timeout=10, additional_headers=WORKER_AUTH_HEADERS)
    if first is not None:
        await ws.send(first)
    return await _closed(ws)


async def _closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read (and discard) until the worker closes; the close code and reason."""
    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()

    await asyncio.wait_for(drain(), CLOSE_WAIT)
    return ws.close_code, ws.close_reason


async def _end(ws: ClientConnection) -> tuple[int | None, str | None]:
    await ws.send(json.dumps({"type": "end"}))
    return await _closed(ws)


async def _talk(ws: ClientConnection, frames: list[bytes], linger: float = 1.0
                ) -> tuple[list[float], list[str]]:
    """Send `frames` paced at 80 ms (on an absolute clock, so no drift) while reading the agent;
    keep reading `linger` s after the last one. Returns the agent frames' arrival times and texts."""
    arrivals: list[float] = []
    texts: list[str] = []

    async def send() -> None:
        began = time.monotonic()
        for i, frame in enumerate(frames):
            await asyncio.sleep(max(0.0, began + i * FRAME_SECONDS - time.monotonic()))
            await ws.send(frame)

    sender = asyncio.create_task(send())
    deadline = time.monotonic() + len(frames) * FRAME_SECONDS + linger
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                break
            if isinstance(message, bytes):
                assert len(message) == FRAME_BYTES, f"agent frame of {len(message)} bytes"
                arrivals.append(time.monotonic())
            else:
                event = json.loads(message)
                assert event["type"] == "text" and isinstance(event["text"], str) and event["text"], event
                texts.append(event["text"])
        await sender
    finally:
        sender.cancel()
    return arrivals, texts


async def _info(base: str) -> dict:
    async with httpx.AsyncClient(timeout=10, headers=WORKER_AUTH_HEADERS) as http:
        response = await http.get(f"http://{base}/v1/info")
    assert response.status_code == 200
    return response.json()


async def _wait_free_slots(base: str, wanted: int, within: float) -> float:
    """Poll /v1/info until at least `wanted` slots are free; the seconds it took."""
    began = time.monotonic()
    while (free := (await _info(base))["free_slots"]) < wanted:
        assert time.monotonic() - began < within, f"{free} free slots after {within} s, expected {wanted}"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


def _metric(text: str, series: str, default: float | None = None) -> float:
    """The value of one series (name plus labels, exactly as exposed) in Prometheus text;
    `default` if it is absent (a labelled counter has no series until its first count)."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    if match is None and default is not None:
        return default
    assert match, f"{series} not in /metrics"
    return float(match.group(1))


async def _metrics(base: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://{base}/metrics")
    assert response.status_code == 200
    return response.text


def _wav(seconds: float, rate: int = 16_000, channels: int = 2) -> bytes:
    """A harmonic tone (a voice-like 140 Hz fundamental and overtones) as a wav file in memory."""
    t = np.arange(int(seconds * rate)) / rate
    tone = sum(0.2 / k * np.sin(2 * np.pi * 140 * k * t) for k in range(1, 6))
    clip = io.BytesIO()
    soundfile.write(clip, np.repeat(tone[:, None], channels, axis=1).astype(np.float32), rate, format="WAV")
    return clip.getvalue()


# ---------------------------------------------------------------------------- sessions


async def test_a_session_streams_agent_frames_and_ends_with_1000(worker):
    """A gateway starts a session, gets `ready` (echoing its session id), streams caller audio in
    80 ms frames and gets agent audio back in frames of exactly 3840 bytes (plus well-formed text
    messages, if the agent says anything); `{"type": "end"}` closes the socket with 1000."""
    await _wait_free_slots(worker, 1, within=5)
    session_id = f"call-{uuid.uuid4().hex[:8]}"
    ws, ready = await _open(worker, _start(session_id=session_id))
    assert ready["session_id"] == session_id
    assert ready["slot"] in range(SLOTS)
    assert isinstance(ready["start_ms"], int | float) and ready["start_ms"] >= 0
    assert isinstance(ready["persona_cached"], bool)

    arrivals, _texts = await _talk(ws, _tone_frames(20))
    assert len(arrivals) >= 10, f"only {len(arrivals)} agent frames for 20 caller frames"
    assert len(arrivals) <= 20, "more agent frames than caller frames"

    code, reason = await _end(ws)
    assert code == 1000 and "client_end" in reason


async def test_a_malformed_frame_closes_only_its_own_session(worker):
    """A frame of the wrong size is a client bug: that session alone is closed with 4400 and a
    reason naming the 3840-byte frame size, while another call on the same worker keeps getting
    agent audio without a gap, before and after, and can still end normally."""
    await _wait_free_slots(worker, 2, within=5)
    steady, _ = await _open(worker)
    broken, _ = await _open(worker, _start("tiny-high"))
    talking = asyncio.create_task(_talk(steady, _tone_frames(30), linger=0.5))
    await asyncio.sleep(1.0)
    broke_at = time.monotonic()
    await broken.send(b"\x01" * 100)
    code, reason = await _closed(broken)
    assert code == 4400 and "3840" in reason, (code, reason)

    arrivals, _ = await talking
    assert len(arrivals) >= 20, f"the steady call got only {len(arrivals)} of 30 frames"
    assert any(t < broke_at for t in arrivals) and any(t > broke_at + 0.5 for t in arrivals)
    gap = max(np.diff(arrivals))
    assert gap < 1.0, f"the steady call went {gap:.2f} s without agent audio"
    assert await _end(steady) == (1000, "session ended: client_end")


@pytest.mark.parametrize("first, reason", [
    (b"\x00" * FRAME_BYTES, "start message"),  # audio before the start message
    ("hello worker", "not JSON"),
    (json.dumps({"type": "begin", "persona": {"prompt": "x", "voice": "tiny-low"}}), '"type": "start"'),
    (json.dumps(["start"]), '"type": "start"'),
    (json.dumps({"type": "start", "persona": {"prompt": "x", "voice": "tiny-low", "mood": "calm"}}), "unknown fields"),
    (_start(session_id="call\n1"), "no control characters"),  # ids go into the routing store's indexes
], ids=["binary", "not-json", "wrong-type", "not-an-object", "unknown-persona-field", "control-char-id"])
async def test_a_malformed_start_is_refused_with_4400(worker, first, reason):
    """A first message that is not a JSON start message is refused with 4400 and a reason that
    says what was wrong, so a gateway author can fix the client."""
    code, got = await _refused(worker, first)
    assert code == 4400 and reason in got, (code, got)


async def test_an_unknown_voice_is_refused_with_4422_naming_it(worker):
    """A persona with a voice preset the model does not have is refused with 4422; the reason
    names the voice asked for and the ones the model has, as many as fit in a close reason (the
    list ends with an ellipsis where it is cut, never in the middle of a name)."""
    code, reason = await _refused(worker, _start("no-such-voice-42"))
    assert code == 4422 and "no-such-voice-42" in reason and "NATF0, NATF1" in reason, (code, reason)
    assert len(reason.encode()) <= 123 and reason.endswith("\u2026"), reason
    assert reason.removesuffix("\u2026").rsplit(", ", 1)[-1] in PRESET_VOICES, reason  # a whole name


async def test_every_refused_persona_is_counted(worker):
    """Operators see refused personas on /metrics whether the worker refuses them on reading the
    start message (a prompt over 4000 characters) or on priming (an unknown voice): each 4422 adds
    one to sessions_refused_total{reason="persona_rejected"}."""
    series = 'personagate_worker_sessions_refused_total{reason="persona_rejected"}'
    before = _metric(await _metrics(worker), series, default=0.0)
    code, reason = await _refused(worker, _start(prompt="x" * 5000))
    assert code == 4422 and "5000 characters" in reason, (code, reason)
    code, _ = await _refused(worker, _start("no-such-voice-43"))
    assert code == 4422
    assert _metric(await _metrics(worker), series) == before + 2


async def test_a_silent_client_is_closed_with_4408(worker):
    """A client that connects and never sends the start message is closed with 4408 after the
    worker's start timeout (2 s here) instead of holding a socket forever."""
    began = time.monotonic()
    code, reason = await _refused(worker, None)
    assert code == 4408 and "start message" in reason, (code, reason)
    assert 1.0 < time.monotonic() - began < CLOSE_WAIT


async def test_a_full_worker_refuses_with_4503_and_reuses_a_freed_slot(worker):
    """With every slot busy the next start is refused at once with 4503 (so the gateway tries
    another worker); once one call has ended, a new call gets its slot."""
    await _wait_free_slots(worker, SLOTS, within=5)
    sessions = [(await _open(worker))[0] for _ in range(SLOTS)]
    try:
        assert (await _info(worker))["free_slots"] == 0
        code, reason = await _refused(worker, _start())
        assert code == 4503 and f"{SLOTS} slots" in reason, (code, reason)

        assert (await _end(sessions.pop(0)))[0] == 1000
        await _wait_free_slots(worker, 1, within=2)
        again, ready = await _open(worker)
        sessions.append(again)
        assert ready["slot"] in range(SLOTS)
        arrivals, _ = await _talk(again, _tone_frames(5))
        assert arrivals, "the reused slot produced no agent audio"
    finally:
        for ws in sessions:
            with contextlib.suppress(Exception):
                await _end(ws)


async def test_a_vanished_client_frees_its_slot_quickly(worker):
    """A gateway that dies mid-call (its TCP connection drops without a close handshake) leaves
    no ghost session: the slot is free again within about 2 s."""
    await _wait_free_slots(worker, SLOTS, within=5)
    ws, _ = await _open(worker)
    await _talk(ws, _tone_frames(3), linger=0.3)
    assert (await _info(worker))["free_slots"] == SLOTS - 1
    ws.transport.abort()  # no close frame, no FIN handshake: a reset connection
    await _wait_free_slots(worker, SLOTS, within=2)


async def test_a_voice_clip_can_be_sent_inline(worker):
    """A persona's voice may be a wav clip sent with the start message (any rate, stereo is
    fine): the session starts, the same persona starts from the cache the second time, and a clip
    too short to use is refused with 4422 and its measured length."""
    clip = base64.b64encode(_wav(2.0)).decode()
    start = json.dumps({"type": "start", "persona": {
        "prompt": f"You are a bank agent ({uuid.uuid4().hex[:6]}).", "voice_audio_base64": clip}})
    await _wait_free_slots(worker, 1, within=5)
    ws, ready = await _open(worker, start)
    assert ready["persona_cached"] is False
    arrivals, _ = await _talk(ws, _tone_frames(5), linger=0.5)
    assert arrivals
    assert (await _end(ws))[0] == 1000

    await _wait_free_slots(worker, 1, within=5)
    ws, ready = await _open(worker, start)
    assert ready["persona_cached"] is True
    assert (await _end(ws))[0] == 1000

    short = base64.b64encode(_wav(0.1)).decode()
    code, reason = await _refused(worker, json.dumps(
        {"type": "start", "persona": {"prompt": "x", "voice_audio_base64": short}}))
    assert code == 4422 and "0.10 s" in reason, (code, reason)


def _start_sampling(sampling: object, voice: str = "tiny-low") -> str:
    return json.dumps({"type": "start", "persona": {"prompt": "You are a claims agent.", "voice": voice,
                                                     "sampling": sampling}})


async def test_a_persona_may_bring_its_own_sampling(worker):
    """A persona may set any of temperature, top_k, text_temperature and text_top_k (the others take
    the worker's defaults): the session starts and streams like any other."""
    await _wait_free_slots(worker, 1, within=5)
    ws, ready = await _open(worker, _start_sampling({"temperature": 0.6, "text_top_k": 10}))
    assert ready["type"] == "ready"
    arrivals, _ = await _talk(ws, _tone_frames(4), linger=0.5)
    assert arrivals
    assert (await _end(ws))[0] == 1000


@pytest.mark.parametrize("sampling, code, reason", [
    ({"temp": 0.5}, 4400, "unknown field 'temp'"),
    ({"top_k": "many"}, 4400, "start.persona.sampling.top_k must be an integer"),
    ({"temperature": True}, 4400, "start.persona.sampling.temperature must be a number"),
    ([0.5], 4400, "start.persona.sampling must be an object"),
    ({"temperature": 5}, 4422, "persona.sampling.temperature must be in (0, 2], got 5"),
    ({"text_temperature": 0}, 4422, "persona.sampling.text_temperature must be in (0, 2], got 0"),
    ({"top_k": 0}, 4422, "persona.sampling.top_k must be in [1, 2048], got 0"),
    ({"text_top_k": 40000}, 4422, "persona.sampling.text_top_k must be in [1, 32000], got 40000"),
], ids=["old-name", "top-k-text", "temperature-bool", "not-an-object", "temperature-5", "text-temperature-0",
        "top-k-0", "text-top-k-huge"])
async def test_bad_sampling_is_refused_with_its_reason(worker, sampling, code, reason):
    """A misspelt or mistyped sampling setting is a client bug (4400, naming the field); a value out
    of the worker's bounds is a persona to fix (4422, saying the bounds and the value given)."""
    got_code, got = await _refused(worker, _start_sampling(sampling))
    assert got_code == code and reason in got, (got_code, got)


async def test_the_tiny_worker_offers_personaplex_voice_names(worker):
    """A persona written for PersonaPlex's preset voices (NATF0 ... VARM4) runs on the tiny model
    too: /v1/info lists every preset name beside tiny-low and tiny-high, and a session with one starts."""
    voices = set((await _info(worker))["voices"])
    assert set(PRESET_VOICES) <= voices and {"tiny-low", "tiny-high"} <= voices
    await _wait_free_slots(worker, 1, within=5)
    ws, ready = await _open(worker, _start("VARM4"))
    assert ready["type"] == "ready"
    assert (await _end(ws))[0] == 1000


# ---------------------------------------------------------------------------- HTTP


async def test_probes_info_and_metrics(worker):
    """Kubernetes probes answer 200 on a ready worker, /v1/info describes it for a gateway, and
    Prometheus sees the pool: capacity, tick step times, sessions started and ended by reason."""
    async with httpx.AsyncClient(base_url=f"http://{worker}", timeout=10, headers=WORKER_AUTH_HEADERS) as http:
        before = (await http.get("/metrics")).text
        started_before = _metric(before, "personagate_worker_sessions_started_total")

        session_id = f"call-{uuid.uuid4().hex[:8]}"
        ws, _ = await _open(worker, _start(session_id=session_id))
        during = (await http.get("/v1/info")).json()
        await _talk(ws, _tone_frames(3), linger=0.3)
        assert (await _end(ws))[0] == 1000
        await _wait_free_slots(worker, SLOTS, within=5)
        assert session_id in during["active_sessions"] and during["draining"] is False

        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["ready"] is True and ready.json()["free_slots"] == SLOTS
        info = (await http.get("/v1/info")).json()
        assert info["slots"] == SLOTS and info["frame_bytes"] == FRAME_BYTES and info["sample_rate"] == 24_000
        assert {"tiny-low", "tiny-high"} <= set(info["voices"])
        assert info["ready"] is True and info["draining"] is False and session_id not in info["active_sessions"]
        assert info["worker_id"].endswith(f":{worker.rsplit(':', 1)[1]}")  # HOSTNAME:PORT by default

        response = await http.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        metrics = response.text
    assert _metric(metrics, "personagate_worker_slots_capacity") == float(SLOTS)
    assert f"personagate_worker_slots_capacity {float(SLOTS)}" in metrics
    assert _metric(metrics, "personagate_worker_draining") == 0.0
    assert _metric(metrics, "personagate_worker_tick_step_seconds_count") > 0
    assert "# TYPE personagate_worker_tick_step_seconds histogram" in metrics
    assert _metric(metrics, "personagate_worker_sessions_started_total") >= started_before + 1
    assert _metric(metrics, 'personagate_worker_sessions_ended_total{reason="client_end"}') >= 1
