"""The browser call's audio tracks on their own (aiortc's real track classes, no network): what a caller hears
stays in real time after the gateway stalls, and audio that waited too long is dropped, not played late."""

from __future__ import annotations

import asyncio
import fractions

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc.rtp import RtpPacket
from av import AudioFrame

from gateway.audio import OutboundPacer
from gateway.webrtc.media import (
    INBOUND_BACKLOG_FRAMES,
    PACKET_SAMPLES,
    AgentTrack,
    CallerAudio,
    set_jitter_buffer,
)


async def test_the_agent_track_is_paced_and_skips_a_stall_instead_of_bursting() -> None:
    """Packets leave every 20 ms with timestamps 960 apart; after the event loop stalled 300 ms, the next packet
    goes out at once with its timestamp moved past the gap, and the clock carries on from there: the browser hears
    a gap, not a burst of stale audio that would grow its jitter buffer for the rest of the call."""
    pacer = OutboundPacer(PACKET_SAMPLES)
    track = AgentTrack(pacer)
    loop = asyncio.get_running_loop()
    began = loop.time()
    stamps = [(await track.recv()).pts for _ in range(10)]
    assert stamps == [i * PACKET_SAMPLES for i in range(10)]
    assert loop.time() - began >= 9 * 0.02 - 0.005  # ten packets take nine intervals: never faster
    await asyncio.sleep(0.3)  # a stall
    late = await track.recv()
    assert track.stalls == 1
    skipped = late.pts // PACKET_SAMPLES - 10
    assert 13 <= skipped <= 20, skipped  # ~300 ms of timestamps skipped, not squeezed
    after = [(await track.recv()).pts for _ in range(5)]
    assert np.diff([late.pts, *after]).tolist() == [PACKET_SAMPLES] * 5
    frame = await track.recv()
    assert (frame.sample_rate, frame.layout.name, frame.samples) == (48_000, "stereo", PACKET_SAMPLES)


def _frame(n: int) -> AudioFrame:
    pcm = np.full((1, 2 * PACKET_SAMPLES), n, dtype=np.int16)
    frame = AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
    frame.sample_rate, frame.pts, frame.time_base = 48_000, n * PACKET_SAMPLES, fractions.Fraction(1, 48_000)
    return frame


async def test_browser_audio_that_waited_too_long_is_dropped() -> None:
    """If the gateway fell behind and a second of the browser's audio piled up in aiortc's (unbounded) queue, only
    the last 100 ms of it is read: the agent hears the caller now, not a second ago for the rest of the call."""
    track = RemoteStreamTrack(kind="audio")
    for n in range(50):
        track._queue.put_nowait(_frame(n))
    track._queue.put_nowait(None)  # the track ends
    caller = CallerAudio(track)
    await asyncio.wait_for(caller.run(), 5)
    assert caller.dropped == 50 - 1 - (INBOUND_BACKLOG_FRAMES - 1)
    assert caller.frames == 50 - caller.dropped


async def test_the_inbound_jitter_buffer_is_the_gateways() -> None:
    """The caller's voice waits in the gateway's jitter buffer for webrtc_jitter_buffer_packets (2), not aiortc's 4:
    40 ms less before the agent hears each word. If a new aiortc moves its buffer, this fails here first."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        receiver = pc.addTransceiver("audio").receiver
        assert set_jitter_buffer(receiver, 2)
        buffer = receiver._RTCRtpReceiver__jitter_buffer
        assert buffer._prefetch == 2
    finally:
        await pc.close()
    # A lost packet, then two, then packets out of order: the buffer goes on holding 2 (3 after a reordering),
    # not 14, for the rest of the call.
    order = [seq for seq in range(400) if seq not in (50, 120, 121, 200)]
    for at in range(250, 390, 40):
        order[at], order[at + 1] = order[at + 1], order[at]
    released = []
    for seq in order:
        packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * PACKET_SAMPLES)
        packet._data = b"opus"
        _, frame = buffer.add(packet)
        if frame is not None:
            released.append((seq, frame.timestamp // PACKET_SAMPLES))
    lags = [arrived - out for arrived, out in released]
    assert max(lags[60:240]) == 2, lags  # after the losses, before any reordering
    assert max(lags[-20:]) <= 3
