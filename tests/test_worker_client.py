"""`personagate session`: the worker client a gateway (or a person) uses to talk to a worker."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from tests.helpers.worker import WORKER_AUTH


def _session(worker: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "personagate", "session", f"ws://{worker}/v1/sessions", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_a_file_is_played_and_the_agent_recorded(worker, tmp_path):
    """Playing a wav into a persona records one agent frame per caller frame, paced at 80 ms, and
    reports the session's start and first-audio times as JSON."""
    t = np.arange(2 * 16_000) / 16_000
    soundfile.write(tmp_path / "in.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16_000)
    done = _session(worker, "--play", str(tmp_path / "in.wav"), "--record", str(tmp_path / "out.wav"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["frames_sent"] == 25
    assert report["frames_received"] >= 23
    assert 60 <= report["agent_frame_interval_p50_ms"] <= 100
    assert report["close"] == [1000, "session ended: client_end"]
    agent, rate = soundfile.read(tmp_path / "out.wav")
    assert rate == 24_000 and len(agent) == report["frames_received"] * 1920


def test_a_refusal_is_reported_with_its_close_code(worker):
    """A refused session exits non-zero with the worker's close code and reason."""
    done = _session(worker, "--voice", "nobody", "--seconds", "1")
    assert done.returncode == 1
    assert "4422" in done.stderr and "unknown voice preset 'nobody'" in done.stderr


@pytest.mark.e2e  # starts a process
def test_an_unreachable_worker_is_reported(tmp_path):
    """Pointing the client at nothing says so, without a traceback."""
    done = _session("127.0.0.1:9", "--voice", "tiny-low", "--seconds", "1")
    assert done.returncode == 1
    assert "cannot reach the worker" in done.stderr and "Traceback" not in done.stderr


async def test_a_gateway_can_set_a_personas_sampling(worker):
    """The client passes a persona's sampling settings to the worker: valid ones start the session,
    and one out of the worker's bounds comes back as a refusal with 4422 and the reason."""
    from gateway.worker_client import WorkerRefused, WorkerSession, persona_message

    url = f"ws://{worker}/v1/sessions"
    persona = persona_message("You are a claims agent.", voice="tiny-low", sampling={"temperature": 0.5,
                                                                                       "text_top_k": 5})
    session = await WorkerSession.open(url, persona, auth=WORKER_AUTH)
    async with session:
        await session.end()
    with pytest.raises(WorkerRefused) as refused:
        await WorkerSession.open(url, persona_message("You are a claims agent.", voice="tiny-low",
                                                      sampling={"top_k": 0}), auth=WORKER_AUTH)
    assert refused.value.code == 4422 and "persona.sampling.top_k" in refused.value.reason


def test_a_shipped_tenant_persona_primes_on_the_worker_from_its_prepared_clip(worker):
    """What an admin writes is what calls get: the harbor-mutual claims persona (a flac voice clip,
    its own sampling) is prepared by the gateway's loader and primes on a real worker; the prepared
    clip is byte-identical each time, so the second call starts from the worker's primed cache."""
    first = _session(worker, "--persona", "harbor-mutual/claims", "--seconds", "0.5")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["close"] == [1000, "session ended: client_end"]
    again = _session(worker, "--persona", "harbor-mutual/claims", "--seconds", "0.5")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["persona_cached"] is True


def test_an_unknown_tenant_persona_is_named_without_a_traceback(worker):
    done = _session(worker, "--persona", "harbor-mutual/nobody", "--seconds", "0.5")
    assert done.returncode == 2
    assert "tenant 'harbor-mutual' has no persona 'nobody'; it has: after-hours, claims" in done.stderr
    assert "Traceback" not in done.stderr
