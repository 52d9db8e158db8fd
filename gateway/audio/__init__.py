"""The call audio path, independent of any SIP or WebRTC library: line PCM (8 kHz PCMU/PCMA, 16 kHz G.722,
48 kHz WebRTC) to the model's 24 kHz 80 ms frames and back, and the shallow outbound buffer a 20 ms media
clock drains.

    inbound = LineToModel(8000)                 # one per call: 20 ms line packets -> 80 ms model frames
    for frame in inbound.push(packet):          # int16 samples at 8 kHz, any count
        call.send(frame)                        # 3840 bytes, s16le 24 kHz

    outbound = ModelToLine(8000)                # 80 ms model frames -> 20 ms line packets
    pacer = OutboundPacer(160)                  # drained by the media clock thread
    for packet in outbound.push(agent.pcm):     # (asyncio side)
        pacer.put(packet, filler=agent.filler)
    pacer.get(out)                              # (clock thread, every 20 ms): audio, or silence on underrun
    pacer.flush()                               # barge-in / hold: drop what is queued at once

Details: docs/audio.md.
"""

from .framing import LineToModel, ModelToLine, Rechunker, Repacketizer
from .pacing import OutboundPacer, PacerStats
from .resample import LINE_RATES, MODEL_RATE, StreamResampler

__all__ = [
    "LINE_RATES",
    "MODEL_RATE",
    "LineToModel",
    "ModelToLine",
    "OutboundPacer",
    "PacerStats",
    "Rechunker",
    "Repacketizer",
    "StreamResampler",
]
