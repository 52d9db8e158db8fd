"""Reading what a recorded call sounded like: the consent notice the tests' tenants play, a tone's level, and where
a clip is heard in a recording. Shared by the SIP and the WebRTC recording tests."""

from __future__ import annotations

import numpy as np

RATE = 16_000  # the sample rate the tests write their audio at and read recordings at
NOTICE_SECONDS = 1.5  # the length of consent_notice()


def consent_notice() -> np.ndarray:
    """The consent announcement: three syllable-like tone bursts (300, 500, 700 Hz), clear of the caller's
    1 kHz tone, 1.5 s."""
    t = np.arange(int(NOTICE_SECONDS * RATE)) / RATE
    pitch = np.where(t < 0.5, 300.0, np.where(t < 1.0, 500.0, 700.0))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    syllables = 0.5 - 0.5 * np.cos(2 * np.pi * 2.0 * t)  # 2 Hz: four "syllables"
    return 0.3 * syllables * np.sin(phase)


def tone_level(audio: np.ndarray, frequency: float, start: float, end: float) -> float:
    """The RMS level (dBFS) of ``frequency`` alone in ``audio[start:end]`` (seconds)."""
    piece = audio[int(start * RATE):int(end * RATE)]
    t = np.arange(len(piece)) / RATE
    amplitude = 2 * np.abs(np.mean(piece * np.exp(-2j * np.pi * frequency * t)))
    return 20 * np.log10(max(amplitude / np.sqrt(2), 1e-9))


def best_match(audio: np.ndarray, clip: np.ndarray, within: float) -> tuple[float, float]:
    """Where ``clip`` best matches in the first ``within`` seconds of ``audio``, and how well (normalised
    correlation: 1 is the same waveform at any level)."""
    best, at = 0.0, 0
    for lag in range(int(within * RATE)):
        piece = audio[lag:lag + len(clip)]
        if len(piece) < len(clip):
            break
        score = float(np.dot(piece, clip) / (np.linalg.norm(piece) * np.linalg.norm(clip) + 1e-12))
        if score > best:
            best, at = score, lag
    return at / RATE, best
