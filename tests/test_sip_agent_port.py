"""An agent call's media port (``pj.AgentPort``, deploy/pjsua2/ext/agent_port.hpp): what the bridge's clock thread
plays to the caller and takes from them, driven directly (``nextFrame``, ``receiveFrame``), without a bridge.

Protects what callers hear now that this runs in C++: the same outbound rules as ``gateway/audio/pacing.py``'s
``OutboundPacer`` (the one the WebRTC calls use), step for step over a long random mix of agent packets, ticks
and barge-in flushes; the consent announcement played whole and first, then announced as done; ringback only
while no agent audio waits; a bounded inbound ring that keeps the newest caller audio; the recording tap."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest

from gateway.audio import OutboundPacer

pj = pytest.importorskip("pjsua2")

SAMPLES = 320  # 20 ms at the bridge's 16 kHz
BYTES = 2 * SAMPLES


def packet(value: int) -> np.ndarray:
    return np.full(SAMPLES, value, dtype=np.int16)


@pytest.fixture
def port() -> Iterator[pj.AgentPort]:
    port = pj.AgentPort()
    port.reset(25, 1, 4, 25)
    pj.agentPortEvents()  # nothing of another test's
    yield port


def events_of(port: pj.AgentPort) -> list[int]:
    return [code & 7 for code in pj.agentPortEvents() if code >> 3 == port.getId()]


def test_the_caller_hears_exactly_what_the_python_pacer_would_play(port: pj.AgentPort) -> None:
    """Over 20,000 random steps (agent packets, some of them comfort noise, in bursts; clock ticks; flushes), every
    frame played and every counter (depth, underruns, shed, played, flushed) match ``OutboundPacer``'s."""
    reference = OutboundPacer(SAMPLES, cushion_packets=1)
    rng = random.Random(7)
    out = np.empty(SAMPLES, dtype=np.int16)
    for step in range(20_000):
        action = rng.random()
        if action < 0.45:
            for _ in range(rng.choice((1, 1, 1, 4, 4, 9))):  # single packets, frames of four, bursts
                value, filler = rng.randrange(-30000, 30000), rng.random() < 0.1
                reference.put(packet(value), filler=filler)
                assert port.putPacket(packet(value), filler)
        elif action < 0.98:
            played = np.frombuffer(port.nextFrame(), dtype=np.int16)
            assert np.array_equal(played, reference.get(out)), step
        else:
            assert port.flush() == reference.flush(), step
        stats, expected = port.pacerStats(), reference.stats()
        assert (stats.depth, stats.underruns, stats.shed, stats.played, stats.flushed) == \
            (expected.depth, expected.underruns, expected.shed, expected.played, expected.flushed), step
    assert expected.underruns and expected.shed and expected.flushed  # every rule was exercised


def test_a_packet_of_the_wrong_size_is_refused(port: pj.AgentPort) -> None:
    assert not port.putPacket(np.zeros(SAMPLES + 1, dtype=np.int16), False)
    assert not port.putPacket(b"\x00" * 3, False)
    assert port.pacerStats().depth == 0


def test_the_announcement_plays_whole_and_first_then_says_it_is_done(port: pj.AgentPort) -> None:
    """The notice (here three frames) comes before agent audio already queued, frame by frame, and its end is
    posted once, after its last frame went out."""
    port.putPacket(packet(99), False)
    notice = b"".join(packet(i + 1).tobytes() for i in range(3))
    port.announce(notice)
    heard = [np.frombuffer(port.nextFrame(), dtype=np.int16)[0] for _ in range(2)]
    assert heard == [1, 2] and events_of(port) == []
    assert np.frombuffer(port.nextFrame(), dtype=np.int16)[0] == 3
    assert events_of(port) == [pj.AGENT_PORT_ANNOUNCED]
    assert np.frombuffer(port.nextFrame(), dtype=np.int16)[0] == 99


def test_ringback_plays_only_while_no_agent_audio_waits(port: pj.AgentPort) -> None:
    ring = b"".join(packet(1000 + i).tobytes() for i in range(5))
    pj.agentPortSetRingback(ring)
    assert np.frombuffer(port.nextFrame(), dtype=np.int16)[0] == 0  # ringback off: silence
    port.setRingback(True)
    assert [np.frombuffer(port.nextFrame(), dtype=np.int16)[0] for _ in range(6)] == [1000, 1001, 1002, 1003, 1004,
                                                                                      1000]
    port.putPacket(packet(5), False)
    assert np.frombuffer(port.nextFrame(), dtype=np.int16)[0] == 5  # the agent, not the ringback
    port.setRingback(False)
    assert np.frombuffer(port.nextFrame(), dtype=np.int16)[0] == 0


def test_the_newest_caller_audio_is_kept_and_the_asyncio_side_is_woken_once(port: pj.AgentPort) -> None:
    """A bounded ring (25 frames): a stalled reader loses the oldest, counted; one inbound event per wake, once
    ``setWakeFrames`` frames wait, and again only after the frames were taken."""
    port.setWakeFrames(4)
    for i in range(3):
        port.receiveFrame(packet(i).tobytes())
    assert events_of(port) == []
    port.receiveFrame(packet(3).tobytes())
    assert events_of(port) == [pj.AGENT_PORT_INBOUND]
    for i in range(4, 30):
        port.receiveFrame(packet(i).tobytes())
    assert events_of(port) == []  # not again before the frames are taken
    assert port.inboundWaiting() == 25 and port.getInboundDropped() == 5 and port.getReceived() == 30
    taken = np.frombuffer(port.takeInbound(), dtype=np.int16).reshape(-1, SAMPLES)[:, 0]
    assert list(taken) == list(range(5, 30))
    assert port.takeInbound() == b""
    port.receiveFrame(b"\x00" * (BYTES - 2))  # not a 20 ms frame: ignored
    assert port.inboundWaiting() == 0


def test_the_recording_tap_pairs_each_tick_with_the_caller_frame_of_that_tick(port: pj.AgentPort) -> None:
    port.setRecording(True)
    port.putPacket(packet(7), False)
    port.receiveFrame(packet(3).tobytes())
    port.nextFrame()  # the caller's 3, the agent's 7
    port.nextFrame()  # no caller frame this tick: silence; the pacer's silence
    ticks = np.frombuffer(port.takeRecorded(), dtype=np.int16).reshape(-1, 2, SAMPLES)[:, :, 0]
    assert ticks.tolist() == [[3, 7], [0, 0]]
    for _ in range(4):
        port.nextFrame()
    assert events_of(port) == [pj.AGENT_PORT_RECORDED]  # every 4 ticks not taken
