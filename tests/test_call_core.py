"""The call core (``gateway.call``), in this process: what both front ends rely on for every call, without pjsua2,
aiortc or a worker process, so that it runs in the fast tier (docs/testing.md).

The line side is in memory (an ``OutboundPacer`` the test drains, caller packets the test pushes) and the agent
either a stand-in stream or a real ``Calls`` call to a fake worker (tests/helpers/fake_worker.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.audio import OutboundPacer
from gateway.call.audio import AgentToLine, CallerGate, CallerToAgent
from gateway.call.escalation import Escalation
from gateway.call.line import CLOCK_RATE, SAMPLES_PER_FRAME
from gateway.call.metrics import call_metrics
from gateway.call.state import CallState, Lifecycle
from gateway.worker_client import AgentAudio, AgentText
from personagate_common.protocol import FRAME_BYTES
from tests.helpers.calls import ACME, route
from tests.helpers.fake_worker import FakeWorker, in_process_calls
from tests.helpers.wait import scaled, until_async

QUIET = np.zeros(SAMPLES_PER_FRAME, dtype="<i2").tobytes()
LOUD = (np.sin(2 * np.pi * 300 * np.arange(SAMPLES_PER_FRAME) / CLOCK_RATE) * 8000).astype("<i2").tobytes()


class Agent:
    """The agent session as the core sees it: records what it is sent, plays ``events`` back."""

    call_id = "core-test"

    def __init__(self, events: list[AgentAudio | AgentText] | None = None) -> None:
        self.sent: list[bytes] = []
        self.events = events or []

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    async def frames(self) -> AsyncIterator[AgentAudio | AgentText]:
        for event in self.events:
            yield event


# ------------------------------------------------------------------------------------ who speaks first


def test_an_agent_that_speaks_first_hears_the_caller_from_the_answer() -> None:
    """speaks_first and no recording: the caller's first packet reaches the agent, released by the answer."""
    gate = CallerGate(CLOCK_RATE, announcing=False, wait_for_caller=None)
    assert gate.is_open and gate.released_by == "answer"
    assert gate.push(QUIET) == QUIET


def test_nothing_reaches_the_agent_while_the_consent_announcement_plays() -> None:
    """A recorded call: the caller talking over the announcement is not heard by the agent (it would answer the
    announcement); from its end the agent hears the caller."""
    gate = CallerGate(CLOCK_RATE, announcing=True, wait_for_caller=None)
    assert gate.push(LOUD * 10) is None and not gate.is_open
    gate.announcement_played()
    assert gate.released_by == "announcement" and gate.push(QUIET) == QUIET


def test_an_agent_that_waits_hears_the_callers_first_syllable_and_not_the_silence_before() -> None:
    """speaks_first: false: line silence is not passed on; once the caller speaks, the agent hears the 80 ms that
    fired the detector (not only what follows), so the first syllable is not cut."""
    gate = CallerGate(CLOCK_RATE, announcing=False, wait_for_caller=float("inf"))
    for _ in range(20):
        assert gate.push(QUIET) is None
    heard = gate.push(LOUD * 3)
    assert gate.released_by == "caller"
    assert heard is not None and len(heard) == CLOCK_RATE * 80 // 1000 * 2
    assert heard.endswith(LOUD * 3)


def test_an_agent_that_waits_speaks_anyway_once_the_wait_is_over() -> None:
    """A silent caller (a dead line, someone waiting to be greeted): after wait_for_caller the agent is released."""
    gate = CallerGate(CLOCK_RATE, announcing=False, wait_for_caller=0.0)
    assert gate.push(QUIET) == QUIET and gate.released_by == "wait"


def test_released_to_speak_first_the_agent_gets_a_whole_frame_from_the_first_packet() -> None:
    """Released without the caller's voice, the first packet completes an 80 ms frame led by silence (the agent
    starts 60 ms sooner); then frames go on the 80 ms cadence, one per four 20 ms packets."""
    agent = Agent()
    to_agent = CallerToAgent(CLOCK_RATE, agent, CallerGate(CLOCK_RATE, announcing=False, wait_for_caller=None))
    assert to_agent.frames_short() == 1
    to_agent.push(QUIET)
    assert [len(frame) for frame in agent.sent] == [FRAME_BYTES]
    assert to_agent.frames_short() == 4
    for _ in range(4):
        to_agent.push(QUIET)
    assert len(agent.sent) == 2


def test_released_by_the_callers_voice_the_agent_gets_no_padding() -> None:
    """The caller spoke: the pre-roll is real audio, nothing is padded with silence ahead of it."""
    agent = Agent()
    to_agent = CallerToAgent(CLOCK_RATE, agent, CallerGate(CLOCK_RATE, announcing=False,
                                                           wait_for_caller=float("inf")))
    to_agent.push(QUIET * 4)
    assert agent.sent == []
    to_agent.push(LOUD * 4)
    assert len(agent.sent) == 1 and agent.sent[0] != bytes(FRAME_BYTES)


# ------------------------------------------------------------------------------------ agent to the line


async def test_agent_audio_goes_to_the_line_in_20ms_packets_and_its_first_audio_is_noted_once() -> None:
    """Each 80 ms agent frame becomes four line packets; comfort noise does not count as the agent's first audio;
    the agent's text goes to the front end."""
    noted: list[str] = []
    pacer = OutboundPacer(SAMPLES_PER_FRAME, cushion_packets=0)
    tone = (np.sin(np.arange(FRAME_BYTES // 2) / 5) * 5000).astype("<i2").tobytes()
    agent = Agent([AgentAudio(bytes(FRAME_BYTES), filler=True), AgentText(" Hi"), AgentAudio(tone),
                   AgentAudio(tone)])
    pump = AgentToLine(CLOCK_RATE, pacer, on_first_audio=lambda: noted.append("audio"),
                       on_text=lambda text: noted.append(text))
    await pump.run(agent)
    assert noted == [" Hi", "audio"]
    stats = pacer.stats()
    assert stats.depth + stats.shed == 3 * 4  # the shallow pacer keeps the newest, sheds the rest


# ------------------------------------------------------------------------------------ lifecycle, metrics


def test_a_call_moves_only_along_its_lifecycle() -> None:
    """A front end's bug (say, answering a refused call) raises instead of leaving a call in an impossible state."""
    call = Lifecycle("sip call x")
    for state in (CallState.CONNECTING, CallState.ANSWERED, CallState.LIVE, CallState.BRIDGED, CallState.ENDING,
                  CallState.ENDED):
        call.to(state)
    assert call.done and call.reached(CallState.ANSWERED)
    refused = Lifecycle("webrtc call y")
    refused.to(CallState.REFUSED)
    with pytest.raises(RuntimeError, match="no transition refused -> live"):
        refused.to(CallState.LIVE)


def test_both_front_ends_count_into_the_same_families_told_apart_by_front_end() -> None:
    """One family per measure on /metrics, labelled sip or webrtc, whichever front end registers first."""
    registry = CollectorRegistry()
    sip, webrtc = call_metrics(registry, "sip"), call_metrics(registry, "webrtc")
    sip.setup_seconds.observe(0.2)
    webrtc.setup_seconds.observe(0.4)
    webrtc.transfer("bridge", "busy")
    assert registry.get_sample_value("personagate_gateway_front_end_setup_seconds_count", {"front_end": "sip"}) == 1
    assert registry.get_sample_value("personagate_gateway_front_end_setup_seconds_sum", {"front_end": "webrtc"}) == 0.4
    assert registry.get_sample_value("personagate_gateway_front_end_transfers_total",
                                     {"front_end": "webrtc", "method": "bridge", "result": "busy"}) == 1
    assert registry.get_sample_value("personagate_gateway_front_end_calls_ended_total",
                                     {"front_end": "sip", "reason": "hangup"}) == 0  # every reason shown from 0


async def test_an_escalation_without_sip_keeps_the_caller_and_says_why() -> None:
    """A browser caller pressing the escalation key on a gateway without SIP: no human can be called, the attempt
    is counted as unavailable, the front end told (the page shows it), and the caller stays with the agent."""
    registry = CollectorRegistry()
    told: list[str] = []
    escalation = Escalation(call_metrics(registry, "webrtc"), {"call": "c1"})
    escalation.on_attempt = told.append
    assert escalation.idle
    assert await escalation.bridge(None, "sip:human@pbx", caller_serial=None, ring_timeout=1, call_id="c1") \
        == "unavailable"
    assert told == ["unavailable"] and escalation.idle and not escalation.transferred.is_set()
    assert escalation.record()["transfer_attempts"] == [{"method": "bridge", "result": "unavailable", "status": None}]
    assert registry.get_sample_value("personagate_gateway_front_end_transfers_total",
                                     {"front_end": "webrtc", "method": "bridge", "result": "unavailable"}) == 1


# ------------------------------------------------------------------------------------ a whole call, in memory


async def test_a_callers_line_audio_reaches_a_worker_and_the_agents_comes_back_to_the_line(registry) -> None:
    """The core's audio path end to end in memory: 16 kHz line packets through the gate and 80 ms framing to a
    (fake) worker's session, and its echo back through the 20 ms packetizer into the line's pacer; the agent's
    first audio is noted once it arrives."""
    async with FakeWorker() as worker, in_process_calls(registry, worker) as calls:
        call = await calls.start("core-line", *route(registry, ACME))
        noted: list[str] = []
        pacer = OutboundPacer(SAMPLES_PER_FRAME, cushion_packets=0)
        to_agent = CallerToAgent(CLOCK_RATE, call, CallerGate(CLOCK_RATE, announcing=False, wait_for_caller=None))
        pump = asyncio.create_task(AgentToLine(CLOCK_RATE, pacer, on_first_audio=lambda: noted.append("audio"))
                                   .run(call))
        try:
            for packet in range(40):  # 800 ms of the caller, handed over as each 80 ms frame fills
                to_agent.push(LOUD)
                if packet % 4 == 0:
                    await until_async(lambda: not call._caller, "the frame went to the worker", timeout=scaled(5))
            await until_async(lambda: worker.sessions["core-line"].frames_in == 10, "the worker heard the caller",
                              timeout=scaled(5))
            await until_async(lambda: noted == ["audio"] and pacer.depth >= 4, "the agent's audio is on the line",
                              timeout=scaled(5))
        finally:
            pump.cancel()
            await call.end()
        assert await call.wait_ended() == "hangup"
