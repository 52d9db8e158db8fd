"""Voices a persona can speak with: the named presets every worker offers, and (below) how an audio
clip is checked and prepared for priming.

This module imports no torch: the gateway validates tenant voices with it without loading a model.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyloudnorm
import soundfile
import soxr
from scipy.ndimage import minimum_filter1d, uniform_filter1d

from .protocol import SAMPLE_RATE

# PersonaPlex's published voices (`voices.tgz` of nvidia/personaplex-7b-v1): natural and varied,
# female and male. The tiny model offers the same names, so a tenant file runs on either model.
PRESET_VOICES: tuple[str, ...] = (
    *(f"NATF{i}" for i in range(4)),
    *(f"NATM{i}" for i in range(4)),
    *(f"VARF{i}" for i in range(5)),
    *(f"VARM{i}" for i in range(5)),
)

"""``SAMPLE_RATE`` (from ``protocol``) is the rate a prepared clip has: Mimi's, the worker protocol's."""
MIN_CLIP_SECONDS = 2.0
MAX_CLIP_SECONDS = 10.0
MIN_SOURCE_RATE = 8_000
MAX_SOURCE_RATE = 192_000
TARGET_LUFS = -24.0
"""PersonaPlex hears its voice prompts at this loudness."""
SILENT_BELOW_LUFS = -60.0
PEAK_CEILING = 10 ** (-1 / 20)
"""Where a prepared clip's peaks are limited: -1 dBFS (EBU R128's true-peak ceiling), so that the
16-bit FLAC sent to the worker, and the worker's own preparation of it, never touch full scale."""

# Clipping rule. Hard clipping flattens the waveform against full scale, so a clipped take has a
# *mass* of samples sitting there: speech amplified 10x and clipped has tens of percent of its samples
# at full scale, and a take with only a few overloaded syllables still has about 1%. An unclipped take
# only touches full scale at its single loudest peaks: even peak-normalised to exactly 0 dBFS, just
# the samples within one 16-bit step of the maximum count, a handful among the 16 000 to 1.9 million
# of a 2-10 s clip. So: a channel is clipped when more than 0.1% of its samples are within one 16-bit
# step (1/32768) of full scale. A fraction, unlike a "run of N equal samples" rule, means the same at
# 8 kHz (where a clipped flat top may be one sample wide) as at 192 kHz (where an unclipped
# low-pitched peak may span several samples within one step of the maximum).
CLIPPED_FRACTION = 0.001
_STEP_16_BIT = 1 / 32768
# "Full scale" is what the file's encoding can hold: telephone mu-law and A-law top out below 1.0
# (their largest codes decode to 32124 and 32256 of 32768), and 8-bit PCM's step is 1/128.
_FULL_SCALE: dict[str, tuple[float, float]] = {  # subtype -> (full scale, tolerance)
    "ULAW": (32124 / 32768, _STEP_16_BIT),
    "ALAW": (32256 / 32768, _STEP_16_BIT),
    "PCM_U8": (1.0, 1 / 128),
    "PCM_S8": (1.0, 1 / 128),
}
_FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")
# A file's bytes beyond the audio its header declares (headers, metadata chunks, FLAC's frame headers): at
# most this much plus 1/32 of the audio. More is a file whose header lies about what it holds (5 s declared,
# megabytes stored): refused, so that what is stored is what was checked.
NOT_AUDIO_ALLOWANCE = 64 * 1024
_BYTES_PER_SAMPLE = {"PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4,
                     "FLOAT": 4, "DOUBLE": 8}  # others (ADPCM, ...) are compressed: 4 is more than enough

_ACCEPTED_FORMATS = ("WAV", "WAVEX", "RF64", "FLAC")  # RIFF WAVE in its three headers, and FLAC
_BLOCK_SAMPLES = 1 << 20  # decoded per read, over all channels: bounds memory for many-channel files
_LIMITER_WINDOW_SECONDS = 0.005
_LOUDNESS_TOLERANCE_DB = 0.05


class VoiceClipError(ValueError):
    """A voice clip that cannot be used, with a message meant for a tenant admin: what is wrong, what
    was measured and what is expected."""


@dataclass(frozen=True, eq=False)
class PreparedClip:
    """A voice clip ready for priming, and what was measured on the upload it came from.

    ``audio``: float32 mono at 24 kHz (``SAMPLE_RATE``), integrated loudness -24 LUFS (``TARGET_LUFS``),
    read-only. Its peaks never exceed -1 dBFS (``PEAK_CEILING``): when the gain that reaches -24 LUFS
    would push a peak past that (a clip whose peaks stand more than 23 dB above its loudness, e.g. a
    click or a plosive in quiet speech), a look-ahead limiter lowers the gain smoothly around that peak
    alone, over about 10 ms, and the rest of the clip is then brought back to -24 LUFS. Hard clipping
    would instead hand the model a distorted voice to imitate, and lowering the whole clip's gain
    would miss the loudness PersonaPlex expects; the limiter changes only the few milliseconds
    around such peaks.

    ``source_rate``, ``source_channels``: of the upload. ``seconds``: its duration.
    ``loudness_lufs``: integrated loudness (ITU-R BS.1770) of the upload's mono downmix.

    Compared by identity (``audio`` is an array); compare ``sha256`` for equal content.
    """

    audio: np.ndarray
    source_rate: int
    source_channels: int
    seconds: float
    loudness_lufs: float

    def flac_bytes(self) -> bytes:
        """The clip as 24 kHz mono 16-bit FLAC (what the gateway sends the worker); the same clip
        always gives the same bytes."""
        return self._flac

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of ``flac_bytes()``: a cache key for the prepared voice."""
        return hashlib.sha256(self._flac).hexdigest()

    @cached_property
    def _flac(self) -> bytes:
        # Quantised here rather than by libsndfile so that reading the file back (int / 32768) gives
        # each sample to within half a 16-bit step. Peaks are at most -1 dBFS: nothing overflows.
        pcm = np.clip(np.round(self.audio.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
        out = io.BytesIO()
        soundfile.write(out, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return out.getvalue()


def prepare_clip(data: bytes, *, min_seconds: float = MIN_CLIP_SECONDS,
                 max_seconds: float = MAX_CLIP_SECONDS) -> PreparedClip:
    """Check an uploaded voice clip and prepare it for priming, or raise ``VoiceClipError``.

    Accepted: wav or flac (recognised by content, not by name) at 8 to 192 kHz, any channel count
    (downmixed by averaging the channels), ``min_seconds`` to ``max_seconds`` long (judged to the
    millisecond). Refused: other formats, NaN or infinite samples, clipped recordings (see
    ``CLIPPED_FRACTION``), silent ones (downmix quieter than -60 LUFS). The clip is resampled to
    24 kHz with soxr's high quality and normalised to -24 LUFS (see ``PreparedClip``).
    """
    if not 0.4 <= min_seconds <= max_seconds:  # BS.1770 loudness needs at least one 400 ms block
        raise ValueError(f"need 0.4 <= min_seconds <= max_seconds, got {min_seconds} and {max_seconds}")
    if not data:
        raise VoiceClipError("not a wav or flac file (the upload is empty: 0 bytes)")
    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise VoiceClipError(f"not a wav or flac file ({_sniff(data)})") from exc
    with sound:
        if sound.format not in _ACCEPTED_FORMATS:
            name = soundfile.available_formats().get(sound.format, sound.format)
            found = name if name.upper().startswith(sound.format) else f"{sound.format}: {name}"
            raise VoiceClipError(f"not a wav or flac file (found {found}, {sound.subtype}); export it as wav or flac")
        rate, channels = int(sound.samplerate), int(sound.channels)
        if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
            raise VoiceClipError(f"sample rate is {rate} Hz; expected {MIN_SOURCE_RATE // 1000} to "
                                 f"{MAX_SOURCE_RATE // 1000} kHz")
        if sound.frames > 0:  # the header's length: refuse a long file before decoding it
            _check_length(sound.frames, rate, min_seconds, max_seconds, too_long_only=True)
            _check_holds_only_audio(len(data), sound)
        mono, clipped = _decode(sound)
    if len(mono) == 0:
        raise VoiceClipError(f"clip has 0 samples; expected {min_seconds:g} to {max_seconds:g} s of speech")
    seconds = _check_length(len(mono), rate, min_seconds, max_seconds)
    if clipped > CLIPPED_FRACTION:
        raise VoiceClipError(f"clip is clipped: {100 * clipped:.1f}% of samples at full scale; "
                             f"re-record it at a lower level")
    loudness = _loudness(mono, rate)
    if not loudness >= SILENT_BELOW_LUFS:
        if np.isfinite(loudness):
            measured = f"loudness {loudness:.1f} LUFS"
        else:  # BS.1770 ignores 400 ms blocks below -70 LUFS; with none left, loudness is -inf
            measured = "loudness below -70 LUFS" if mono.any() else "all samples are zero"
        raise VoiceClipError(f"clip is silent ({measured}); expected speech louder than {SILENT_BELOW_LUFS:g} LUFS")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
        resampled = _loudness(mono, SAMPLE_RATE)
        if not resampled >= SILENT_BELOW_LUFS:  # all its sound was above 12 kHz, which 24 kHz cannot hold
            measured = f"{resampled:.1f} LUFS" if np.isfinite(resampled) else "below -70 LUFS"
            raise VoiceClipError(f"clip has no sound below 12 kHz ({measured} at 24 kHz); expected speech")
    audio = _normalise(mono).astype(np.float32)
    audio.flags.writeable = False
    return PreparedClip(audio, rate, channels, seconds, float(loudness))


def _decode(sound: soundfile.SoundFile) -> tuple[np.ndarray, float]:
    """The mono downmix (float64) and the largest fraction of clipped samples in any channel."""
    full_scale, tolerance = _FULL_SCALE.get(sound.subtype, (1.0, _STEP_16_BIT))
    channels = sound.channels
    block_frames = max(1, _BLOCK_SAMPLES // channels)
    parts: list[np.ndarray] = []
    peaks = np.zeros(channels)
    at_full_scale = np.zeros(channels, dtype=np.int64)
    try:
        while len(block := sound.read(block_frames, dtype="float64", always_2d=True)):
            if not np.isfinite(block).all():
                raise VoiceClipError("clip contains NaN or infinite samples (a damaged float file); export it again")
            magnitude = np.abs(block)
            peaks = np.maximum(peaks, magnitude.max(axis=0))
            at_full_scale += np.count_nonzero(magnitude >= full_scale - tolerance, axis=0)
            parts.append(block.mean(axis=1))
        if sound.subtype in _FLOAT_SUBTYPES and (peaks > full_scale).any():
            # A float file may go past 1.0 without being clipped (it is only scaled oddly); its
            # "full scale" is then its own peak, and clipping shows as a mass of samples there.
            thresholds = np.maximum(peaks, full_scale) * (1 - tolerance)
            at_full_scale[:] = 0
            sound.seek(0)
            while len(block := sound.read(block_frames, dtype="float64", always_2d=True)):
                at_full_scale += np.count_nonzero(np.abs(block) >= thresholds, axis=0)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise VoiceClipError(f"not a readable {sound.format.lower()} file: it is damaged ({exc})") from exc
    mono = np.concatenate(parts) if parts else np.zeros(0)
    clipped = float(at_full_scale.max()) / len(mono) if len(mono) else 0.0
    return mono, clipped


def _check_holds_only_audio(size: int, sound: soundfile.SoundFile) -> None:
    audio = sound.frames * sound.channels * _BYTES_PER_SAMPLE.get(sound.subtype, 4)
    if size > audio + audio // 32 + NOT_AUDIO_ALLOWANCE:
        raise VoiceClipError(
            f"the file holds {size} bytes but its header declares {sound.frames / sound.samplerate:.2f} s of audio "
            f"({audio} bytes as {sound.subtype}): {size - audio} bytes are something else; expected at most "
            f"{NOT_AUDIO_ALLOWANCE} bytes besides the audio (export it again, without embedded pictures)")


def _check_length(frames: int, rate: int, min_seconds: float, max_seconds: float, *,
                  too_long_only: bool = False) -> float:
    seconds = frames / rate
    judged = round(seconds, 3)
    if judged > max_seconds or (not too_long_only and judged < min_seconds):
        shown = f"{seconds:.2f}"
        if float(shown) in (min_seconds, max_seconds):  # 1.9994 s would read as a puzzling "2.00 s"
            shown = f"{seconds:.3f}"
        raise VoiceClipError(f"clip is {shown} s long; expected {min_seconds:g} to {max_seconds:g} s")
    return seconds


def _loudness(audio: np.ndarray, rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770, gated) in LUFS; -inf for digital silence."""
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore")
        return float(pyloudnorm.Meter(rate).integrated_loudness(audio))


def _normalise(audio: np.ndarray) -> np.ndarray:
    """``audio`` (24 kHz) at ``TARGET_LUFS`` with peaks limited to ``PEAK_CEILING``: gain, then limit
    and make up the loudness the limiter took, until within 0.05 dB (one round unless limited)."""
    loudness = _loudness(audio, SAMPLE_RATE)
    for _ in range(4):
        audio = _limit(audio * 10 ** ((TARGET_LUFS - loudness) / 20))
        loudness = _loudness(audio, SAMPLE_RATE)
        if abs(loudness - TARGET_LUFS) <= _LOUDNESS_TOLERANCE_DB:
            break
    return audio


def _limit(audio: np.ndarray) -> np.ndarray:
    """A look-ahead peak limiter: no sample ends above ``PEAK_CEILING``.

    ``needed`` is the gain each sample may have; its minimum over +-W (5 ms), averaged over +-W,
    is at most ``needed`` at every sample (each average only includes minima taken over windows that
    contain that sample), so the smoothed gain never lets a peak through, and it ramps down and
    back up over 2W instead of jumping.
    """
    magnitude = np.abs(audio)
    if magnitude.max(initial=0.0) <= PEAK_CEILING:
        return audio
    needed = np.minimum(1.0, PEAK_CEILING / np.maximum(magnitude, 1e-12))
    size = 2 * round(_LIMITER_WINDOW_SECONDS * SAMPLE_RATE) + 1
    gain = uniform_filter1d(minimum_filter1d(needed, size, mode="nearest"), size, mode="nearest")
    return audio * np.minimum(gain, needed)  # the minimum only absorbs rounding in the average


_MAGIC: tuple[tuple[int, bytes, str], ...] = (  # offset, bytes, what it is
    (0, b"ID3", "an mp3 file"),
    (0, b"OggS", "an ogg file"),
    (4, b"ftyp", "an mp4/m4a file"),
    (0, b"\x1a\x45\xdf\xa3", "a webm/mkv file"),
    (0, b"#!AMR", "an amr file"),
    (0, b"fLaC", "a damaged flac file"),
    (0, b"RIFF", "a damaged or unsupported RIFF/wav file"),
    (0, b"FORM", "an aiff file"),
    (0, b"%PDF", "a pdf document"),
    (0, b"\x89PNG", "a png image"),
    (0, b"\xff\xd8\xff", "a jpeg image"),
    (0, b"GIF8", "a gif image"),
    (0, b"PK\x03\x04", "a zip archive"),
)


def _sniff(data: bytes) -> str:
    """What an unreadable upload looks like, for the error message."""
    for offset, magic, what in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return f"the content looks like {what}"
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "the content looks like an mp3 or aac file"
    if data[:5].lstrip().startswith((b"<", b"{")):
        return "the content looks like text (html, xml or json)"
    return f"unrecognised content, {len(data)} bytes"
