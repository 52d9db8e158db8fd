"""``CallCore``: what every caller's call has, whichever front end it came through, written once.

A front end (``gateway.sip.inbound.InboundCall``, ``gateway.webrtc.call.BrowserCall``) subclasses it and adds only its
transport: signalling, its media's frames, what its own metrics count. The core holds the lifecycle, the agent
session, the speaks-first gate, recording and its consent announcement, escalation, key presses, the media
watch, the call's limit, the shared metrics and the call record (one JSON log line per answered call).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from .audio import CallerGate
from .escalation import Escalation
from .metrics import CallMetrics, FrontEnd
from .recording import CallRecorder, finish_recording, start_recording
from .state import CallState, Lifecycle

if TYPE_CHECKING:
    from ..calls import AgentCall, Calls
    from ..tenants.tenant import PersonaConfig, Tenant

log = logging.getLogger(__name__)

MEDIA_CHECK_SECONDS = 1.0  # how often the media watch looks


class CallCore:
    """One caller's call, from its arrival to its record."""

    front_end: ClassVar[FrontEnd]
    ended_message: ClassVar[str]  # the call record's log message

    def __init__(self, *, call_id: str, tenant: Tenant, persona: PersonaConfig, calls: Calls, metrics: CallMetrics,
                 recordings_dir: Path | None, media_timeout: float, caller_first_wait: float | None,
                 max_call_seconds: float | None, log_extra: dict[str, object]) -> None:
        self.call_id = call_id
        self.tenant = tenant
        self.persona = persona
        self.calls = calls
        self.call_metrics = metrics
        self.recordings_dir = recordings_dir  # tenants with recording.enabled are announced and recorded here
        self.media_timeout = media_timeout
        self.caller_first_wait = caller_first_wait  # speaks_first: false; None: as long as the call lasts
        self.max_call_seconds = max_call_seconds  # the gateway's cap; the tenant's limits.max_call_seconds too
        self.log_extra = log_extra  # how this front end's logs name the call
        self.lifecycle = Lifecycle(f"{self.front_end} call {call_id}")
        self.agent: AgentCall | None = None
        self.end_reason: str | None = None
        self.answered_at: float | None = None
        self.first_agent_audio: float | None = None
        self.dtmf: list[str] = []
        self.recorder: CallRecorder | None = None
        self.announced_at: float | None = None  # when the consent announcement's last frame went out
        self.gate: CallerGate | None = None
        self.escalation = Escalation(metrics, log_extra)
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> CallState:
        return self.lifecycle.state

    @property
    def history(self) -> list[tuple[CallState, float]]:
        return self.lifecycle.history

    @property
    def done(self) -> bool:
        return self.lifecycle.done

    def _to(self, state: CallState) -> None:
        self.lifecycle.to(state)

    @property
    def limit_seconds(self) -> float:
        """How long the call may last: the tenant's ``limits.max_call_seconds``, capped by the gateway's."""
        return min(self.tenant.spec.limits.max_call_seconds, self.max_call_seconds or math.inf)

    @property
    def wait_for_caller(self) -> float | None:
        """For the gate: None if the agent speaks first, else how long it waits for the caller."""
        return None if self.persona.speaks_first else self.caller_first_wait or math.inf

    def answered(self) -> None:
        """The call was answered (SIP 200 OK, WebRTC ready): setup time counted from its arrival."""
        self.answered_at = time.monotonic()
        self.call_metrics.setup_seconds.observe(self.answered_at - self.lifecycle.began)

    def agent_audio(self) -> None:
        """The agent's first audio was queued for the caller."""
        if self.first_agent_audio is None:
            self.first_agent_audio = time.monotonic()
            if self.answered_at is not None:
                self.call_metrics.first_agent_audio_seconds.observe(self.first_agent_audio - self.answered_at)

    # ------------------------------------------------------------------ keys and escalation

    def key_pressed(self, digit: str, method: str, *, may_escalate: bool) -> str | None:
        """A key the caller pressed, counted and kept; the escalation target to dial if it is the tenant's
        escalation digit and ``may_escalate`` (the call's state allows it) and no escalation is under way."""
        self.dtmf.append(digit)
        self.call_metrics.dtmf(method)
        escalation = self.tenant.spec.escalation
        if escalation is None or digit != escalation.dtmf_digit or not may_escalate or not self.escalation.idle:
            return None
        return escalation.transfer_to

    def open_gate(self, line_rate: int, *, announcing: bool) -> CallerGate:
        """The call's speaks-first gate, for its line's rate; ``announcing``: closed until the consent announcement
        has played (if it has not already)."""
        self.gate = CallerGate(line_rate, announcing=announcing and self.announced_at is None,
                               wait_for_caller=self.wait_for_caller)
        return self.gate

    # ------------------------------------------------------------------ recording

    async def start_recording(self, rate: int) -> tuple[bytes, ...] | None:
        """With the tenant's recording on (and the gateway's ``recordings_dir``): the recorder started
        (``self.recorder``, for the front end to tap) and the consent announcement as 20 ms frames at ``rate``, to
        play first; None: the call is neither announced nor recorded."""
        started = await start_recording(self.tenant, self.recordings_dir, self.call_id, rate, **self.log_extra)
        if started is None:
            return None
        self.recorder, frames = started
        return frames

    def announcement_played(self) -> None:
        """The announcement's last frame went out: the agent may hear the caller."""
        self.announced_at = time.monotonic()
        if self.gate is not None:
            self.gate.announcement_played()

    async def stop_recording(self) -> dict[str, object]:
        """The recorder's file finished (the front end has detached it); the call record's fields about it."""
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return {}
        record = await finish_recording(recorder, **self.log_extra)
        self.call_metrics.recording("written" if record["recording"] else "failed")
        return record

    # ------------------------------------------------------------------ media watch

    async def media_watch(self, received: Callable[[], Awaitable[int | None]],
                          paused: Callable[[], bool] = lambda: False) -> None:
        """Returns once the count ``received()`` gives (caller packets or frames; None: unknown this time) has
        not moved for ``media_timeout`` seconds; while ``paused()`` (the caller holds the call) the time counts
        afresh."""
        last, since = -1, time.monotonic()
        while True:
            await asyncio.sleep(min(MEDIA_CHECK_SECONDS, self.media_timeout / 2))
            if paused():
                since = time.monotonic()
                continue
            count = await received()
            if count is None:
                continue
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since >= self.media_timeout:
                return

    # ------------------------------------------------------------------ the record

    def count_media(self, *, underruns: int, shed: int, caller_frames_dropped: int) -> None:
        self.call_metrics.outbound_underruns.inc(underruns)
        self.call_metrics.outbound_shed.inc(shed)
        self.call_metrics.caller_frames_dropped.inc(caller_frames_dropped)

    def record(self, **fields: object) -> None:
        """Log the call record: the core's fields, then the front end's ``fields``."""
        began = self.lifecycle.began
        agent = self.agent
        gate = self.gate
        answered = self.answered_at
        log.info(self.ended_message, extra={
            **self.log_extra, "tenant": self.tenant.id, "persona": agent.persona_name if agent else self.persona.name,
            "worker_id": agent.worker_id if agent else None, "reason": self.end_reason,
            "setup_seconds": round(answered - began, 3) if answered else None,
            "first_agent_audio_seconds": round(self.first_agent_audio - answered, 3)
            if self.first_agent_audio and answered else None,
            "seconds": round(time.monotonic() - began, 2), "dtmf": "".join(self.dtmf),
            **self.escalation.record(),
            "consent_announced": round(self.announced_at - answered, 3) if self.announced_at and answered else None,
            "agent_released_seconds": round(gate.released_at - answered, 3)
            if gate is not None and gate.released_at and answered else None,
            "agent_released_by": gate.released_by if gate is not None else None,
            **fields})
