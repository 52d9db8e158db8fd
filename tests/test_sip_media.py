"""The call's media tap (gateway/sip/media.py): caller audio reaches the agent as soon as it makes a frame."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pjsua2 as pj

from gateway.call.audio import CallerGate
from gateway.call.line import BYTES_PER_FRAME, CLOCK_RATE
from gateway.sip.media import MediaBridge, MediaBuffers


class FrameSink:
    """Stands in for the agent call's sending side only: records the 80 ms frames the bridge hands over."""

    call_id = "media-test"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    async def frames(self) -> AsyncIterator[object]:  # the agent's side: silent here
        await asyncio.Event().wait()
        yield None


def _line_frame() -> pj.MediaFrame:
    frame = pj.MediaFrame()
    frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
    frame.buf = pj.ByteVector(bytes(BYTES_PER_FRAME))
    frame.size = BYTES_PER_FRAME
    return frame


async def test_caller_audio_reaches_the_agent_the_moment_its_80ms_frame_is_complete() -> None:
    """Whatever phase the call was answered in, the 4th 20 ms packet of a model frame sends that frame at once
    (a fixed count of received packets would hold it back up to 60 ms, added to what the caller hears). The very
    first packet after the answer completes a frame with silence in front of it, so an agent that speaks first
    starts 60 ms sooner; the frames after it keep the 80 ms cadence (none waits behind another at the worker)."""
    buffers = MediaBuffers()
    for _ in range(2):  # ringing: packets the bridge saw before the call was live, which are not the agent's
        buffers.frame_received(_line_frame())
    sink = FrameSink()
    gate = CallerGate(CLOCK_RATE, announcing=False, wait_for_caller=None)  # the agent speaks first
    bridge = MediaBridge(buffers, sink, gate, on_agent_audio=lambda: None)
    bridge.start()
    await asyncio.sleep(0)

    async def packets(n: int) -> None:
        for _ in range(n):
            buffers.frame_received(_line_frame())
        for _ in range(5):
            await asyncio.sleep(0)

    try:
        assert len(sink.sent) == 0
        await packets(1)
        assert len(sink.sent) == 1, "the first packet after the answer completes a frame, led by silence"
        await packets(3)
        assert len(sink.sent) == 1
        await packets(1)
        assert len(sink.sent) == 2, "the next frame was complete with its 4th packet: 80 ms after the first"
        await packets(6)  # a burst: one frame and half of the next
        assert len(sink.sent) == 3
        await packets(1)
        assert len(sink.sent) == 3
        await packets(1)
        assert len(sink.sent) == 4, "the frame completed by the burst's tail went at once"
        assert all(len(frame) == 3840 for frame in sink.sent)
    finally:
        await bridge.stop()
