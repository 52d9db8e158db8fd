"""Call recording (a tenant's ``recording.enabled``): the consent announcement, and one stereo FLAC per call.

    recorder, announcement = await start_recording(tenant, recordings_dir, call_id)  # or None: no recording
    buffers.recorder = recorder            # the bridge's clock thread hands it each 20 ms tick
    buffers.announce(announcement, done)   # 20 ms frames at the bridge's rate, played first
    ...
    record = await finish_recording(recorder)   # the file finished off the loop; the call record's fields

Contract: the file holds the caller (left) and what the caller heard (right), 16 kHz, one frame of each per
20 ms tick, so the sides stay aligned; the clock thread only appends to a bounded queue
(``MAX_PENDING_FRAMES``: a stalled disk drops the oldest frames, counted) and a thread per call writes, so
neither the event loop nor the pjsua thread waits on the disk; ``<name>.flac.part`` becomes ``<name>.flac``
once complete. Browser calls use it too (``gateway/webrtc/media.py``: ``BrowserRecording``).

Details: docs/sip.md#recording-and-the-consent-announcement.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import logging
import re
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile

from personagate_common.protocol import SAMPLE_RATE

from ..audio import StreamResampler
from .line import BYTES_PER_FRAME, CLOCK_RATE, SAMPLES_PER_FRAME

if TYPE_CHECKING:
    from personagate_common.voices import PreparedClip

    from ..tenants.tenant import Tenant

log = logging.getLogger(__name__)

MAX_PENDING_FRAMES = 500  # 10 s of both sides (640 KB) waiting for the writer; older frames are dropped
WRITE_EVERY_SECONDS = 0.2
CLIP_RATE = SAMPLE_RATE  # PreparedClip.audio's rate: the worker protocol's
_SILENCE = bytes(BYTES_PER_FRAME)


def recording_path(root: Path, tenant: str, call_id: str, when: dt.datetime | None = None) -> Path:
    """``root/<tenant>/<YYYY-MM-DD>/<HHMMSS>-<call id>.flac`` (UTC), the call id made safe for a file name
    (a long or unusual one is shortened and kept unique by a hash)."""
    when = when or dt.datetime.now(dt.UTC)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", call_id).strip("._") or "call"
    if len(safe) > 80 or safe != call_id:
        safe = f"{safe[:60]}-{hashlib.sha256(call_id.encode()).hexdigest()[:12]}"
    return root / tenant / when.strftime("%Y-%m-%d") / f"{when.strftime('%H%M%S')}-{safe}.flac"


# ---------------------------------------------------------------------------------------------- announcement

_announcements: collections.OrderedDict[tuple[str, int], tuple[bytes, ...]] = collections.OrderedDict()
ANNOUNCEMENTS_CACHED = 32


def announcement_frames(clip: PreparedClip, rate: int = CLOCK_RATE) -> tuple[bytes, ...]:
    """The clip (24 kHz float) as 20 ms s16le frames at ``rate`` (the bridge's, or a browser's 48 kHz), the last
    one padded with silence."""
    frame = rate // 50
    resampler = StreamResampler(CLIP_RATE, rate, np.float32)
    audio = np.concatenate([resampler.process(np.asarray(clip.audio, dtype=np.float32)), resampler.flush()])
    pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2")
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % frame, dtype="<i2")])
    return tuple(pcm[i:i + frame].tobytes() for i in range(0, len(pcm), frame))


async def consent_frames(clip: PreparedClip, rate: int = CLOCK_RATE) -> tuple[bytes, ...]:
    """``announcement_frames``, computed off the event loop once per clip content and rate (a small cache)."""
    key = (clip.sha256, rate)
    frames = _announcements.get(key)
    if frames is None:
        frames = await asyncio.to_thread(announcement_frames, clip, rate)
        _announcements[key] = frames
        while len(_announcements) > ANNOUNCEMENTS_CACHED:
            _announcements.popitem(last=False)
    _announcements.move_to_end(key)
    return frames


# ---------------------------------------------------------------------------------------------- a call's recording


def check_recordings_dir(folder: Path) -> None:
    """The recordings folder exists (made if not) and the gateway can write there; else a clear error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise RuntimeError(f"recordings_dir {str(folder)!r}: call recordings cannot be written there "
                           f"({exc.strerror or exc})") from None



async def start_recording(tenant: Tenant, recordings_dir: Path | None, call_id: str, rate: int = CLOCK_RATE,
                          **log_extra: object) -> tuple[CallRecorder, tuple[bytes, ...]] | None:
    """For a tenant that records calls: the call's recorder, started, and its consent announcement as 20 ms frames
    at ``rate``. None if the tenant does not record calls, or if the gateway has no ``recordings_dir`` (a warning:
    the call is then neither announced nor recorded)."""
    clip = tenant.consent_announcement
    if not tenant.spec.recording.enabled or clip is None:
        return None
    if recordings_dir is None:
        log.warning("the tenant records calls but the gateway has no recordings_dir: this call is neither "
                    "announced nor recorded", extra={**log_extra, "tenant": tenant.id})
        return None
    frames = await consent_frames(clip, rate)
    recorder = CallRecorder(recording_path(recordings_dir, tenant.id, call_id))
    recorder.start()
    return recorder, frames


async def finish_recording(recorder: CallRecorder, **log_extra: object) -> dict[str, object]:
    """``recorder``'s file finished (off the event loop); what the call record says about it (``recording``: its
    path, None if it could not be written)."""
    complete = await asyncio.to_thread(recorder.close)
    if recorder.frames_dropped:
        log.warning("the recording lost %d frames: the disk did not keep up", recorder.frames_dropped,
                    extra={**log_extra, "path": str(recorder.path)})
    return {"recording": str(recorder.path) if complete else None,
            "recording_seconds": round(recorder.seconds, 2), "recording_frames_dropped": recorder.frames_dropped}


# ---------------------------------------------------------------------------------------------- the file


class CallRecorder:
    """One call's stereo FLAC, written by its own thread from frames the bridge's clock thread hands it."""

    def __init__(self, path: Path, *, max_pending_frames: int = MAX_PENDING_FRAMES) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".part")
        self._pending: collections.deque[tuple[bytes | bytearray | None, bytes]] = collections.deque(
            maxlen=max_pending_frames)
        self.frames_dropped = 0
        self.frames_written = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"recorder-{path.stem[:20]}", daemon=True)

    @property
    def seconds(self) -> float:
        return self.frames_written * SAMPLES_PER_FRAME / CLOCK_RATE

    # the bridge's clock thread: append only

    def put(self, caller: bytes | bytearray | None, heard: bytes) -> None:
        """One 20 ms tick at 16 kHz: the caller's frame (None: none arrived) and the frame sent to the caller."""
        if len(self._pending) == self._pending.maxlen:
            self.frames_dropped += 1
        self._pending.append((caller, heard))

    # any thread

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is left, finish the file and rename it into place (blocking: call it in a thread).
        True if the recording is complete on disk."""
        self._stop.set()
        self._thread.join(timeout)
        return self.error is None and not self._thread.is_alive()

    # the writer thread

    def _run(self) -> None:
        try:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            with soundfile.SoundFile(self.partial, "w", samplerate=CLOCK_RATE, channels=2, format="FLAC",
                                     subtype="PCM_16") as out:
                while not self._stop.wait(WRITE_EVERY_SECONDS):
                    self._write(out)
                self._write(out)
            self.partial.replace(self.path)
        except Exception as exc:  # noqa: BLE001 - a full or read-only disk must not end the call
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("call recording failed: %s", self.error, extra={"path": str(self.path)})
            self._pending.clear()

    def _write(self, out: soundfile.SoundFile) -> None:
        ticks = []
        while True:
            try:
                ticks.append(self._pending.popleft())
            except IndexError:
                break
        if not ticks:
            return
        block = np.empty((len(ticks), SAMPLES_PER_FRAME, 2), dtype="<i2")
        for i, (caller, heard) in enumerate(ticks):
            block[i, :, 0] = np.frombuffer(caller if caller is not None else _SILENCE, "<i2")
            block[i, :, 1] = np.frombuffer(heard, "<i2")
        out.write(block.reshape(-1, 2))
        self.frames_written += len(ticks)
