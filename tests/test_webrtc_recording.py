"""Recorded browser calls: a tenant with recording.enabled announces and records its browser calls exactly as its
phone calls. Real processes on loopback: an echo worker, a gateway with a recordings_dir, an aiortc browser."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import soundfile

from tests.helpers.recording import NOTICE_SECONDS, RATE, best_match, consent_notice, tone_level
from tests.helpers.webrtc import Stack, browser, hang_up, metrics, place, webrtc_stack

TONE_HZ = 440.0  # the browser's voice (tests.test_webrtc.CallerVoice): bursts of half a second, every second


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    """The gateway (in front of the echo model) and its recordings_dir."""
    folder = tmp_path_factory.mktemp("recorded")
    voices = folder / "tenants" / "recorded" / "voices"
    voices.mkdir(parents=True)
    soundfile.write(voices / "notice.wav", consent_notice(), RATE, subtype="PCM_16")
    (voices.parent / "tenant.yaml").write_text(textwrap.dedent("""\
        tenant: recorded
        name: Recorded Ltd
        personas:
          agent:
            prompt: You are a test agent.
            voice: {preset: NATF0}
            public_link: true
        recording:
          enabled: true
          consent_announcement: voices/notice.wav
        """))
    recordings = folder / "recordings"
    with webrtc_stack(folder, {"PERSONAGATE_GATEWAY_RECORDINGS_DIR": str(recordings)},
                      worker_args=("--model", "echo")) as addresses:
        yield addresses, recordings


@pytest.fixture
async def http(stack: tuple[Stack, Path]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack[0].http, timeout=30) as client:
        yield client


async def test_a_recorded_browser_call_hears_the_notice_first_and_is_recorded(stack: tuple[Stack, Path],
                                                                             http: httpx.AsyncClient) -> None:
    """The browser caller hears the consent announcement as soon as the call is ready, before any agent audio; the
    agent does not hear the caller during it and starts after it; the call is written to recordings_dir as a 16 kHz
    stereo FLAC: the caller on the left, what the caller heard (notice, then agent) on the right."""
    seconds = NOTICE_SECONDS + 2.5
    async with browser() as call:
        assert (await place(http, call, "recorded", "agent")).status_code == 201
        await call.until(lambda: "ready" in call.kinds(), "the call is ready")
        await asyncio.sleep(seconds)
        await hang_up(http, call)
        await call.until(lambda: "ended" in call.kinds(), "the call ends")
    found: list[Path] = []
    deadline = time.monotonic() + 5
    while not found and time.monotonic() < deadline:
        found = list(stack[1].glob("recorded/*/*.flac"))
        await asyncio.sleep(0.1)
    assert len(found) == 1, found
    path = found[0]
    assert path.parent.name == time.strftime("%Y-%m-%d", time.gmtime())
    assert not list(path.parent.glob("*.part"))
    info = soundfile.info(path)
    assert (info.samplerate, info.channels, info.format) == (RATE, 2, "FLAC"), info
    audio, _ = soundfile.read(path)
    caller, heard = audio[:, 0], audio[:, 1]
    assert seconds - 0.5 <= len(audio) / RATE <= seconds + 2.0, len(audio) / RATE
    at, match = best_match(heard, consent_notice(), within=0.3)
    print(f"recording {path.name}: {len(audio) / RATE:.2f} s, notice at {at * 1000:.0f} ms (match {match:.3f})")
    assert match > 0.95 and at < 0.1, (at, match)
    assert tone_level(caller, TONE_HZ, 0.2, seconds - 0.5) > -30  # the caller's bursts, from the start
    assert tone_level(heard, TONE_HZ, 0.0, at + NOTICE_SECONDS) < -50  # the agent was not heard during the notice
    assert tone_level(heard, TONE_HZ, at + NOTICE_SECONDS + 0.5, seconds - 0.2) > -30  # ... and echoes after it
    samples = await metrics(http)
    assert samples['personagate_gateway_front_end_recordings_total{front_end="webrtc",result="written"}'] == 1
