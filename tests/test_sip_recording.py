"""What the caller hears first, over SIP, end to end: the consent announcement of a recorded call, and the
persona's ``speaks_first``.

Recording: an echo worker, a gateway with ``recordings_dir``, and two tenants written for the test:
``recorded`` (``recording.enabled`` with a consent announcement) and ``unrecorded``; the caller is
`personagate call`, and the recording is read back from the folder. ``speaks_first``: the tiny model, which
makes sound from its first step, so when the agent starts is plain to hear."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.helpers.caller import CALL_TIMEOUT, call
from tests.helpers.processes import free_port, udp_free_port
from tests.helpers.recording import NOTICE_SECONDS, RATE, best_match, consent_notice, tone_level
from tests.helpers.stack import echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")

RECORDED_NUMBER = "+15550001001"
UNRECORDED_NUMBER = "+15550002001"
TONE_HZ = 1000.0


def _tenant(folder: Path, tenant: str, number: str, recording: str) -> None:
    (folder / tenant / "voices").mkdir(parents=True)
    (folder / tenant / "tenant.yaml").write_text(textwrap.dedent(f"""\
        tenant: {tenant}
        name: {tenant}
        numbers:
          "{number}": agent
        personas:
          agent:
            prompt: You are a test agent.
            voice: {{preset: NATF0}}
        """) + recording)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tenants = tmp_path_factory.mktemp("tenants")
    recordings = tmp_path_factory.mktemp("recordings")
    _tenant(tenants, "recorded", RECORDED_NUMBER,
            "recording:\n  enabled: true\n  consent_announcement: voices/notice.wav\n")
    soundfile.write(tenants / "recorded" / "voices" / "notice.wav", consent_notice(), RATE, subtype="PCM_16")
    _tenant(tenants, "unrecorded", UNRECORDED_NUMBER, "")
    with echo_stack(tenants, {"PERSONAGATE_GATEWAY_RECORDINGS_DIR": str(recordings)}) as (addresses, _, _):
        yield addresses | {"recordings": str(recordings)}


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return 0.25 * np.sin(2 * np.pi * TONE_HZ * t)


def _onset(audio: np.ndarray, frequency: float) -> float:
    """When ``frequency`` first reaches half its peak level (seconds), in 20 ms steps."""
    window = RATE // 50
    levels = [tone_level(audio, frequency, i / RATE, (i + window) / RATE)
              for i in range(0, len(audio) - window, window)]
    peak = max(levels)
    return next(i for i, level in enumerate(levels) if level > peak - 6) * window / RATE


def _recordings(stack: dict[str, str], tenant: str) -> list[Path]:
    return sorted((Path(stack["recordings"]) / tenant).glob("*/*.flac"))


def test_a_recorded_call_hears_the_notice_first_and_is_recorded_in_stereo(stack: dict[str, str],
                                                                          tmp_path: Path) -> None:
    """A tenant that records calls: the caller hears the consent announcement right after the answer, before
    any agent audio; the agent does not hear the caller during it (so it cannot talk over it) and starts
    after it; the call is written to recordings_dir/<tenant>/<date>/ as a stereo FLAC with the caller on the
    left and what the caller heard (notice, then agent) on the right."""
    seconds = NOTICE_SECONDS + 1.5
    soundfile.write(tmp_path / "in.wav", _tone(seconds), RATE, subtype="PCM_16")
    report = call(stack, RECORDED_NUMBER, "--play", str(tmp_path / "in.wav"), "--record", str(tmp_path / "out.wav"),
                  "--seconds", str(seconds + 0.3))
    assert report["status"] == 200 and report["answered"], report
    heard, _ = soundfile.read(tmp_path / "out.wav")
    notice = consent_notice()
    # the notice, whole, from the answer on (the gateway's resampling to 24 kHz and back, and G.711, keep
    # the waveform: a normalised correlation near 1)
    at, match = best_match(heard, notice, within=0.3)
    assert match > 0.9, (at, match, report)
    # the caller's tone played from the answer on was not echoed during the notice: the agent did not hear it
    assert tone_level(heard, TONE_HZ, 0.0, at + NOTICE_SECONDS) < -50, report
    # ... and the agent (the echo) starts right after the notice: one round trip after its end
    onset = _onset(heard, TONE_HZ)
    assert at + NOTICE_SECONDS + 0.05 <= onset <= at + NOTICE_SECONDS + 0.6, (onset, at, report)
    assert tone_level(heard, TONE_HZ, onset + 0.1, onset + 1.0) > -16, report
    print(f"notice heard {at * 1000:.0f} ms after 200 OK (match {match:.3f}), agent from {onset:.2f} s")

    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    until(lambda: len(_recordings(stack, "recorded")) == 1, "the recording is written", timeout=5)
    path = _recordings(stack, "recorded")[0]
    assert path.parent.name == time.strftime("%Y-%m-%d", time.gmtime()), path
    assert not list(path.parent.glob("*.part")), "a finished recording has no partial file left"
    audio, rate = soundfile.read(path)
    info = soundfile.info(path)
    assert rate == RATE and info.channels == 2 and info.format == "FLAC", info
    caller, agent = audio[:, 0], audio[:, 1]
    assert seconds - 0.2 <= len(audio) / RATE <= seconds + 2.0, len(audio) / RATE
    # left: the caller's tone from the answer on
    assert tone_level(caller, TONE_HZ, 0.3, seconds - 0.3) > -16
    # right: the notice first (from the recording's start), then the agent's echo of the caller
    rec_at, rec_match = best_match(agent, notice, within=0.3)
    assert rec_match > 0.95 and rec_at < 0.1, (rec_at, rec_match)
    print(f"recording {path.name}: {len(audio) / RATE:.2f} s, notice at {rec_at * 1000:.0f} ms (match {rec_match:.3f})")
    assert tone_level(agent, TONE_HZ, 0.0, rec_at + NOTICE_SECONDS) < -50
    assert tone_level(agent, TONE_HZ, rec_at + NOTICE_SECONDS + 0.6, seconds - 0.2) > -16
    assert scrape_metrics(stack["http"])['personagate_gateway_front_end_recordings_total{front_end="sip",result="written"}'] == 1


def test_without_recording_nothing_is_played_or_written(stack: dict[str, str], tmp_path: Path) -> None:
    """A tenant that does not record: no announcement (the agent is heard from the answer: the echo of the
    caller's tone after one round trip) and no file."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    soundfile.write(tmp_path / "in.wav", _tone(1.5), RATE, subtype="PCM_16")
    report = call(stack, UNRECORDED_NUMBER, "--play", str(tmp_path / "in.wav"), "--record",
                  str(tmp_path / "out.wav"), "--seconds", "1.8")
    assert report["status"] == 200, report
    heard, _ = soundfile.read(tmp_path / "out.wav")
    assert _onset(heard, TONE_HZ) <= 0.6, report
    assert best_match(heard, consent_notice(), within=0.3)[1] < 0.3
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    time.sleep(0.5)
    assert not (Path(stack["recordings"]) / "unrecorded").exists()


@pytest.mark.e2e  # starts a process
def test_an_unwritable_recordings_dir_stops_the_gateway_with_a_clear_message(tmp_path: Path) -> None:
    """A recordings_dir the gateway cannot write to is found at start, not on the first recorded call."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    done = subprocess.run(
        [sys.executable, "-m", "personagate", "gateway", "--tenants", str(tmp_path), "--port", str(free_port()),
         "--sip-port", str(udp_free_port())],
        env=os.environ | {"PERSONAGATE_GATEWAY_RECORDINGS_DIR": str(blocker / "recordings")},
        capture_output=True, text=True, timeout=CALL_TIMEOUT, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "recordings_dir" in done.stderr and "cannot be written" in done.stderr, done.stderr[-2000:]


def test_recording_path_is_tenant_date_call_id() -> None:
    import datetime as dt

    from gateway.call.recording import recording_path

    when = dt.datetime(2026, 11, 25, 13, 4, 5, tzinfo=dt.UTC)
    path = recording_path(Path("/r"), "acme", "a84b4c76e66710@pc33.example.com", when)
    assert path.parent == Path("/r/acme/2026-11-25") and path.name.startswith("130405-a84b4c76e66710_pc33")
    assert path.suffix == ".flac"
    hostile = recording_path(Path("/r"), "acme", "../../etc/passwd", when)
    assert hostile.parent == Path("/r/acme/2026-11-25") and "/" not in hostile.name, hostile
    assert recording_path(Path("/r"), "acme", "x" * 500, when).name != recording_path(
        Path("/r"), "acme", "x" * 499, when).name


# ---------------------------------------------------------------------------------------------- speaks_first

GREETER_NUMBER = "+15550003001"
LISTENER_NUMBER = "+15550003002"
CALLER_FIRST_WAIT = 2.5


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The tiny model (seeded random weights: it makes sound, at about -23 dBFS, from its first step,
    whatever it hears), so whether the caller hears the agent before speaking is plain to measure; a
    speaks_first: false agent waits at most 2.5 s for the caller."""
    tenants = tmp_path_factory.mktemp("tenants")
    (tenants / "speakers").mkdir()
    (tenants / "speakers" / "tenant.yaml").write_text(textwrap.dedent(f"""\
        tenant: speakers
        name: speakers
        numbers:
          "{GREETER_NUMBER}": greeter
          "{LISTENER_NUMBER}": listener
        personas:
          greeter:
            prompt: You are a test agent. Greet the caller.
            voice: {{preset: NATF0}}
            speaks_first: true
          listener:
            prompt: You are a test agent. Let the caller speak first.
            voice: {{preset: NATF0}}
            speaks_first: false
        """))
    env = {"PERSONAGATE_GATEWAY_SIP_CALLER_FIRST_WAIT_SECONDS": str(CALLER_FIRST_WAIT)}
    with echo_stack(tenants, env, worker_args=("--greedy",)) as (addresses, _, _):  # the tiny model
        yield addresses


def _loud_from(audio: np.ndarray, dbfs: float = -35.0) -> float | None:
    """When ``audio`` first has 100 ms above ``dbfs`` (RMS, 20 ms windows), in seconds; None if never."""
    window = RATE // 50
    levels = 20 * np.log10(np.sqrt(np.mean(audio[:len(audio) // window * window].reshape(-1, window) ** 2,
                                           axis=1)) + 1e-9)
    loud = levels > dbfs
    for i in range(len(loud) - 4):
        if loud[i:i + 5].all():
            return i * window / RATE
    return None


def test_speaks_first_true_the_agent_is_heard_at_once(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    """``speaks_first: true`` (the default): a caller who says nothing hears the agent right after the answer."""
    report = call(tiny_stack, GREETER_NUMBER, "--record", str(tmp_path / "out.wav"), "--seconds", "2")
    assert report["status"] == 200, report
    heard, _ = soundfile.read(tmp_path / "out.wav")
    start = _loud_from(heard)
    assert start is not None and start < 0.6, (start, report)


def _agent_silent_until(heard: np.ndarray, seconds: float) -> None:
    from gateway.sip.caller import is_ringback

    window = RATE // 50
    before = heard[:int(seconds * RATE) // window * window].reshape(-1, window)
    # (the last ringback packet in flight as 200 OK left may open the recording: it is not the agent)
    agent = [frame for frame in before if not is_ringback(frame)]
    assert len(agent) >= len(before) - 2
    assert max(np.sqrt(np.mean(frame**2)) for frame in agent) < 10 ** (-50 / 20), "the agent spoke too early"


def test_speaks_first_false_the_agent_waits_for_the_caller(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    """``speaks_first: false``: the caller hears nothing while silent (1.5 s here), and the agent starts only
    once the caller speaks; the model was not run meanwhile, so it starts by hearing the caller."""
    until(lambda: readyz(tiny_stack["http"])["slots_free"] == 1, "the slot is free")
    silence, speech = 1.5, 1.0
    t = np.arange(int(speech * RATE)) / RATE
    played = np.concatenate([np.zeros(int(silence * RATE)), 0.25 * np.sin(2 * np.pi * 300 * t)])
    soundfile.write(tmp_path / "in.wav", played, RATE, subtype="PCM_16")
    report = call(tiny_stack, LISTENER_NUMBER, "--play", str(tmp_path / "in.wav"), "--record",
                  str(tmp_path / "out.wav"), "--seconds", str(silence + speech + 0.5))
    assert report["status"] == 200, report
    heard, _ = soundfile.read(tmp_path / "out.wav")
    _agent_silent_until(heard, silence)
    start = _loud_from(heard)
    assert start is not None and silence < start <= silence + 0.6, (start, report)


def test_speaks_first_false_a_silent_caller_is_not_left_in_silence(tiny_stack: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """``speaks_first: false`` and a caller who says nothing, waiting for a greeting: after
    sip_caller_first_wait_seconds (2.5 s here) the agent speaks first after all."""
    until(lambda: readyz(tiny_stack["http"])["slots_free"] == 1, "the slot is free")
    report = call(tiny_stack, LISTENER_NUMBER, "--record", str(tmp_path / "out.wav"), "--seconds", "4")
    assert report["status"] == 200, report
    heard, _ = soundfile.read(tmp_path / "out.wav")
    _agent_silent_until(heard, CALLER_FIRST_WAIT - 0.2)
    start = _loud_from(heard)
    assert start is not None and CALLER_FIRST_WAIT - 0.2 < start <= CALLER_FIRST_WAIT + 0.6, (start, report)


def test_a_recorder_that_cannot_write_fails_alone_and_never_grows(tmp_path: Path) -> None:
    """A disk that refuses the file ends the recording, not the call: ``put`` (the media clock's side) keeps
    returning at once, memory stays bounded (the oldest frames are dropped and counted), and ``close`` says
    the recording is incomplete."""
    from gateway.call.recording import CallRecorder

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    recorder = CallRecorder(blocker / "acme" / "call.flac", max_pending_frames=10)
    recorder.start()
    frame = bytes(640)
    for _ in range(25):
        recorder.put(frame, frame)
    assert recorder.close(timeout=5) is False
    assert recorder.error is not None and recorder.frames_written == 0
    good = CallRecorder(tmp_path / "ok" / "call.flac", max_pending_frames=10)
    for _ in range(25):  # before the writer runs: only the newest 10 are kept
        good.put(frame, frame)
    assert good.frames_dropped == 15
    good.start()
    assert good.close(timeout=5) is True
    assert soundfile.info(tmp_path / "ok" / "call.flac").frames == 10 * 320
