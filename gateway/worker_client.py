"""Client side of the worker protocol (docs/worker-protocol.md): one duplex session on a worker.

    async with await WorkerSession.open(url, persona_message("You are ...", voice="NATF0")) as session:
        await session.send(frame)            # 3840 bytes: 80 ms of 24 kHz s16le caller audio
        async for event in session.events(): # AgentAudio / AgentText until the session ends
            ...
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

FRAME_BYTES = 3840


class WorkerRefused(Exception):
    """The worker closed the session before it was ready; ``code`` is the protocol's close code."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"worker refused the session ({code}): {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class AgentAudio:
    pcm: bytes


@dataclass(frozen=True)
class AgentText:
    text: str


def persona_message(
    prompt: str,
    *,
    voice: str | None = None,
    voice_audio: bytes | None = None,
    sampling: Mapping[str, float | int] | None = None,
) -> dict[str, object]:
    """The start message's ``persona`` object: a preset ``voice`` or a wav/flac clip
    (``voice_audio``), and optionally the persona's own ``sampling`` (any of ``temperature``,
    ``top_k``, ``text_temperature``, ``text_top_k``; the worker's defaults for the others)."""
    persona: dict[str, object] = {"prompt": prompt}
    if voice_audio is not None:
        persona["voice_audio_base64"] = base64.b64encode(voice_audio).decode()
    elif voice is not None:
        persona["voice"] = voice
    if sampling is not None:
        persona["sampling"] = dict(sampling)
    return persona


class WorkerSession:
    def __init__(self, ws: ClientConnection, ready: dict) -> None:
        self._ws = ws
        self.ready = ready
        self.id: str = ready["session_id"]
        self.start_ms: float = ready["start_ms"]
        self.persona_cached: bool = ready["persona_cached"]

    @classmethod
    async def open(cls, url: str, persona: Mapping[str, object], *, session_id: str | None = None) -> WorkerSession:
        """Start a session with ``persona`` (see ``persona_message``); raises WorkerRefused with the
        worker's close code and reason if it does not start."""
        start: dict[str, object] = {"type": "start", "persona": dict(persona)}
        if session_id is not None:
            start["session_id"] = session_id
        ws = await connect(url, max_size=2**22)
        try:
            await ws.send(json.dumps(start))
            ready = json.loads(await ws.recv())
        except ConnectionClosed as exc:
            raise WorkerRefused(ws.close_code, ws.close_reason or "") from exc
        if ready.get("type") != "ready":
            await ws.close()
            raise WorkerRefused(None, f"unexpected first message {ready!r}")
        return cls(ws, ready)

    async def send(self, frame: bytes) -> None:
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"a frame is {FRAME_BYTES} bytes, got {len(frame)}")
        await self._ws.send(frame)

    async def events(self) -> AsyncIterator[AgentAudio | AgentText]:
        """Agent audio and text as they come, until the worker closes the session."""
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    yield AgentAudio(message)
                else:
                    event = json.loads(message)
                    if event.get("type") == "text":
                        yield AgentText(event["text"])
        except ConnectionClosed:
            return

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self._ws.close_reason

    async def end(self) -> None:
        """Ask the worker to end the session; it closes the socket (1000) when done."""
        try:
            await self._ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass

    async def close(self) -> None:
        await self._ws.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def talk(
    url: str,
    persona: Mapping[str, object],
    *,
    caller_audio: np.ndarray,
    seconds: float,
) -> tuple[dict[str, object], np.ndarray]:
    """Play ``caller_audio`` (24 kHz mono float32; silence after it ends) into a session in real
    time for ``seconds``; return a report and the agent's audio (24 kHz mono float32)."""
    frames = max(1, int(seconds / 0.08))
    padded = np.zeros(frames * FRAME_BYTES // 2, dtype=np.float32)
    padded[: min(len(caller_audio), len(padded))] = caller_audio[: len(padded)]
    pcm = (np.clip(padded, -1, 1) * 32767).astype("<i2")
    received: list[bytes] = []
    arrivals: list[float] = []
    texts: list[str] = []
    first_voiced: float | None = None
    async with await WorkerSession.open(url, persona) as session:
        ready_at = time.monotonic()

        async def play() -> None:
            next_send = time.monotonic()
            for i in range(frames):
                await session.send(pcm[i * 1920 : (i + 1) * 1920].tobytes())
                next_send += 0.08
                await asyncio.sleep(max(0.0, next_send - time.monotonic()))
            await asyncio.sleep(0.3)  # let the last frames come back
            await session.end()

        player = asyncio.create_task(play())
        async for event in session.events():
            if isinstance(event, AgentAudio):
                now = time.monotonic()
                arrivals.append(now)
                received.append(event.pcm)
                if first_voiced is None and np.abs(np.frombuffer(event.pcm, "<i2")).max() > 300:
                    first_voiced = now
            else:
                texts.append(event.text)
        await player
        intervals = np.diff(arrivals) * 1000 if len(arrivals) > 1 else np.zeros(1)
        report: dict[str, object] = {
            "session_id": session.id,
            "start_ms": session.start_ms,
            "persona_cached": session.persona_cached,
            "frames_sent": frames,
            "frames_received": len(received),
            "first_agent_audio_ms": None if first_voiced is None else round((first_voiced - ready_at) * 1000, 1),
            "agent_frame_interval_p50_ms": round(float(np.percentile(intervals, 50)), 1),
            "agent_frame_interval_p99_ms": round(float(np.percentile(intervals, 99)), 1),
            "text": "".join(texts),
            "close": [session.close_code, session.close_reason],
        }
    agent = np.frombuffer(b"".join(received), "<i2").astype(np.float32) / 32768
    return report, agent
