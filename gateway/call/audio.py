"""A call's audio between its line (a front end's PCM at the line rate, 20 ms) and its agent session, written once
for both front ends: who speaks first (``CallerGate``), caller audio to the agent (``CallerToAgent``) and agent
audio to the line's pacer (``AgentToLine``). A front end only feeds them its transport's frames.

Contract: the agent is kept silent, its state untouched, simply by not sending it caller audio (the worker steps
a session only on caller frames): while the consent announcement plays, and with ``speaks_first: false`` until
the caller speaks (the 80 ms that fired the detector go too, so the agent hears the first syllable) or
``wait_for_caller`` seconds pass.

Details: docs/calls.md#who-speaks-first.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import numpy as np

from ..audio import MODEL_RATE, LineToModel, ModelToLine
from ..audio.speech import SpeechStart
from ..worker_client import AgentAudio, AgentText

PRE_ROLL_MS = 80  # one model frame: no more, or every word after it would reach the agent that much later
LINE_FRAMES_PER_MODEL_FRAME = 4  # 20 ms line frames in an 80 ms model frame
LINE_FRAME_MODEL_SAMPLES = MODEL_RATE // 50  # a 20 ms line frame, at the model's rate


class AgentStream(Protocol):
    """The agent session as the call's audio sees it (``calls.AgentCall``, or a front end's wrapper of it)."""

    call_id: str

    def send(self, frame: bytes) -> None: ...

    def frames(self) -> AsyncIterator[AgentAudio | AgentText]: ...


class LinePacer(Protocol):
    """The producer side of a line's outbound pacer (``audio.OutboundPacer``, or one running in C++)."""

    def put(self, packet: np.ndarray, filler: bool = False) -> None: ...


class CallerGate:
    """When the agent first hears the caller. Closed while the consent announcement plays (``announcing``);
    then, with ``wait_for_caller`` (seconds, ``math.inf``: however long), until the caller speaks or that time
    passes; then open for the rest of the call. ``released_by``: answer (open at once), announcement (its end),
    caller (the caller's voice), wait (the caller said nothing in time)."""

    def __init__(self, line_rate: int, *, announcing: bool, wait_for_caller: float | None) -> None:
        self._speech = SpeechStart(line_rate // 50, line_rate * PRE_ROLL_MS // 1000) \
            if wait_for_caller is not None else None
        self._wait_for_caller = wait_for_caller
        self._wait_until = math.inf
        self._announcing = announcing
        self.released_at: float | None = None
        self.released_by: str | None = None
        if not announcing:
            self._announcement_over("answer")

    def announcement_played(self) -> None:
        if self._announcing:
            self._announcing = False
            self._announcement_over("announcement")

    def _announcement_over(self, why: str) -> None:
        if self._speech is None:
            self._open(why)
        else:
            assert self._wait_for_caller is not None
            self._wait_until = time.monotonic() + self._wait_for_caller

    @property
    def is_open(self) -> bool:
        return self.released_by is not None

    def push(self, pcm: bytes) -> bytes | None:
        """Caller audio (s16le at the line rate); what the agent hears of it (None: nothing)."""
        if self.released_by is not None:
            return pcm
        if self._announcing or self._speech is None:
            return None  # the caller talking over the announcement: not for the agent
        heard = self._speech.push(pcm)
        if heard is not None:
            self._open("caller")
            return heard
        if time.monotonic() >= self._wait_until:
            self._open("wait")
            return pcm
        return None

    def _open(self, why: str) -> None:
        self._speech = None
        self.released_at = time.monotonic()
        self.released_by = why


class CallerToAgent:
    """The caller's line audio, through the gate, as 80 ms model frames to the agent. Released to speak first, the
    caller's first packet completes a frame at once, led by silence (``LineToModel.complete_with_silence``), so the
    agent starts 60 ms sooner, on the same 80 ms cadence."""

    def __init__(self, line_rate: int, agent: AgentStream, gate: CallerGate) -> None:
        self.line = LineToModel(line_rate)
        self.agent = agent
        self.gate = gate
        self._first = True

    def push(self, pcm: bytes) -> None:
        heard = self.gate.push(pcm)
        if not heard:
            return
        frames = self.line.push(heard)
        if self.starting and not frames:
            frames = [frame for frame in (self.line.complete_with_silence(),) if frame is not None]
        self._first = False
        for frame in frames:
            self.agent.send(frame)

    @property
    def starting(self) -> bool:
        """The next caller packet is the first the agent hears: it completes a frame by itself."""
        return self._first and self.gate.is_open and self.gate.released_by != "caller"

    def frames_short(self) -> int:
        """20 ms line frames still missing from the model frame being filled (1 to 4)."""
        if self.starting:
            return 1
        return max(1, LINE_FRAMES_PER_MODEL_FRAME - round(self.line.pending_samples / LINE_FRAME_MODEL_SAMPLES))


class AgentToLine:
    """The agent's frames to a line's pacer (resampled and cut into 20 ms packets), its text to ``on_text``;
    ``on_first_audio`` once, at the agent's first audio (not filler)."""

    def __init__(self, line_rate: int, pacer: LinePacer, *, on_first_audio: Callable[[], None],
                 on_text: Callable[[str], None] | None = None) -> None:
        self.line = ModelToLine(line_rate)
        self.pacer = pacer
        self._on_first_audio = on_first_audio
        self._on_text = on_text
        self._heard = False

    async def run(self, agent: AgentStream) -> None:
        """Until the agent's frames end (or cancelled)."""
        async for event in agent.frames():
            if isinstance(event, AgentText):
                if self._on_text is not None:
                    self._on_text(event.text)
                continue
            for packet in self.line.push(event.pcm):
                self.pacer.put(packet, filler=event.filler)
            if not self._heard and not event.filler:
                self._heard = True
                self._on_first_audio()
