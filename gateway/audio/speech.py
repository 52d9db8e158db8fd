"""When the caller starts to speak: a plain energy detector on line frames, for personas with
``speaks_first: false`` (the agent waits for the caller). Telephone line noise, comfort noise and a quiet
room sit well below -50 dBFS; speech at -30 to -15 dBFS.

    start = SpeechStart(frame_samples=320, pre_roll_samples=1280)   # 20 ms frames at 16 kHz, 80 ms kept
    heard = start.push(pcm)     # s16le bytes, any number of whole frames: None, or the caller's first audio
"""

from __future__ import annotations

import collections

import numpy as np

SPEECH_DBFS = -40.0  # a frame is loud above this RMS level
SPEECH_FRAMES = 3  # loud frames in a row that count as speech: 60 ms of 20 ms frames


class SpeechStart:
    """Fires once ``frames`` consecutive frames are above ``dbfs``; what it returns then is the last
    ``pre_roll_samples`` of audio (the frames that fired it, so the agent hears the first syllable) and any
    audio after them in the same push."""

    def __init__(self, frame_samples: int, pre_roll_samples: int, *, dbfs: float = SPEECH_DBFS,
                 frames: int = SPEECH_FRAMES) -> None:
        self.frame_bytes = frame_samples * 2
        self.pre_roll_bytes = pre_roll_samples * 2
        self.frames = frames
        self._threshold = (10 ** (dbfs / 20) * 32768) ** 2
        self._recent: collections.deque[bytes] = collections.deque(
            maxlen=max(1, -(-self.pre_roll_bytes // self.frame_bytes)))
        self._loud = 0

    def push(self, pcm: bytes) -> bytes | None:
        """Caller audio (s16le); None until speech starts, then the pre-roll and the rest of ``pcm``."""
        size = self.frame_bytes
        for at in range(0, len(pcm) - size + 1, size):
            frame = pcm[at:at + size]
            self._recent.append(frame)
            samples = np.frombuffer(frame, "<i2").astype(np.float32)
            self._loud = self._loud + 1 if float(np.mean(samples * samples)) > self._threshold else 0
            if self._loud >= self.frames:
                return (b"".join(self._recent) + pcm[at + size:])[-self.pre_roll_bytes:]
        return None
