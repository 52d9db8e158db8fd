"""The line's clock: 16 kHz mono s16le in 20 ms frames, shared by pjsua's conference bridge, human legs and call
recordings (a browser's 48 kHz audio is resampled to it to be recorded or bridged)."""

from __future__ import annotations

# pjsua's conference bridge runs at this clock, and so do our media ports. 16 kHz, deliberately: it is G.722's own
# rate, so wideband calls cross the bridge with no conversion at all, and PCMU/PCMA (8 kHz) are converted
# once by pjmedia's large-filter resampler (``quality`` 10) at the stream port; the one conversion to the
# model's 24 kHz happens outside the bridge, in a stateful resampler per direction (``gateway/audio``, via
# ``gateway/sip/media.py``).
# A 24 kHz bridge would make pjmedia do that conversion too, with its own filter, for every codec; an 8 kHz
# bridge would throw away G.722's upper band.

CLOCK_RATE = 16_000
PTIME_MS = 20
SAMPLES_PER_FRAME = CLOCK_RATE * PTIME_MS // 1000  # 320
BYTES_PER_FRAME = SAMPLES_PER_FRAME * 2  # 640
