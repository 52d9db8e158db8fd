"""PCMA and G.722 end to end: a pjsua2 caller offering one codec (or a trunk's list) calls the echo stack,
plays tones, and checks what comes back: the codec negotiated, and the tones' frequency and level after
two encodes, two resamplings and the model's 24 kHz frames. (PCMU is covered in tests/test_sip.py.)"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.helpers.caller import call
from tests.helpers.programs import needs
from tests.helpers.sipp import SCENARIOS, sipp_caller
from tests.helpers.stack import OPEN_NUMBER, echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")

RATE = 16_000
TONE_SECONDS = 1.0
TONE_DBFS = -12.0


@pytest.fixture(scope="module")
def stack(tenants: Path) -> Iterator[dict[str, str]]:
    with echo_stack(tenants) as (addresses, _, _):
        yield addresses


def _tones(*frequencies: float) -> np.ndarray:
    """Each tone for TONE_SECONDS at TONE_DBFS (RMS), with 10 ms ramps, then half a second of silence."""
    n = int(TONE_SECONDS * RATE)
    t = np.arange(n) / RATE
    ramp = np.minimum(1.0, np.minimum(np.arange(n), n - 1 - np.arange(n)) / (0.01 * RATE))
    amplitude = np.sqrt(2) * 10 ** (TONE_DBFS / 20)
    pieces = [amplitude * ramp * np.sin(2 * np.pi * f * t) for f in frequencies]
    return np.concatenate([*pieces, np.zeros(RATE // 2)])


def _tone_at(audio: np.ndarray, frequency: float) -> tuple[float, float]:
    """When the tone ``frequency`` starts in ``audio`` (seconds) and its level over the next 0.6 s (dBFS
    RMS, the median of 20 ms windows)."""
    window = int(0.02 * RATE)
    t = np.arange(len(audio)) / RATE
    # demodulated: the tone's own envelope, whatever else is in the signal
    baseband = audio * np.exp(-2j * np.pi * frequency * t)
    envelope = np.abs(np.convolve(baseband, np.ones(window) / window, mode="valid")) * np.sqrt(2)
    onset = int(np.argmax(envelope > 0.5 * envelope.max()))
    level = float(np.median(envelope[onset + window:onset + int(0.6 * RATE)]))
    return (onset + window / 2) / RATE, 20 * np.log10(max(level, 1e-9))


def _dominant(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / RATE)[int(np.argmax(spectrum))])


def _call_with_tones(stack: dict[str, str], tmp_path: Path, frequencies: tuple[float, ...], *codecs: str
                     ) -> tuple[dict, np.ndarray]:
    played = _tones(*frequencies)
    soundfile.write(tmp_path / "in.wav", played, RATE, subtype="PCM_16")
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    args = [arg for codec in codecs for arg in ("--codec", codec)]
    report = call(stack, OPEN_NUMBER, *args, "--play", str(tmp_path / "in.wav"), "--record",
                  str(tmp_path / "out.wav"), "--seconds", str(len(played) / RATE + 0.6))
    assert report["status"] == 200 and report["answered"], report
    recorded, rate = soundfile.read(tmp_path / "out.wav")
    assert rate == RATE
    return report, recorded


def _assert_tone_back(recorded: np.ndarray, frequency: float, expected_at: float, report: dict) -> float:
    """The tone comes back at its own frequency, within 1.5 dB of its level, one round trip later."""
    at, level = _tone_at(recorded, frequency)
    middle = recorded[int((at + 0.1) * RATE):int((at + 0.3) * RATE)]
    assert abs(_dominant(middle) - frequency) <= 10, (frequency, _dominant(middle), report)
    assert abs(level - TONE_DBFS) <= 1.5, (frequency, level, report)
    delay = at - expected_at
    assert 0.05 <= delay <= 0.8, (frequency, delay, report)
    return level


def test_pcma_only_caller_gets_pcma_and_a_clean_tone_back(stack: dict[str, str], tmp_path: Path) -> None:
    """A caller (or trunk) that offers only G.711 A-law, as European carriers do, is answered with PCMA, and
    the agent hears and returns its audio at the right pitch and level; a 6 kHz tone, which an 8 kHz codec
    cannot carry, does not come through."""
    report, recorded = _call_with_tones(stack, tmp_path, (1000.0, 6000.0), "PCMA")
    assert report["codec"] == "PCMA/8000", report
    level = _assert_tone_back(recorded, 1000.0, 0.0, report)
    _, high = _tone_at(recorded, 6000.0)
    assert high < TONE_DBFS - 30, (high, report)
    print(f"PCMA: 1 kHz back at {level:.1f} dBFS (sent {TONE_DBFS}), 6 kHz at {high:.1f} dBFS")


def test_g722_only_caller_gets_wideband_audio_end_to_end(stack: dict[str, str], tmp_path: Path) -> None:
    """A G.722 caller gets G.722 (16 kHz wideband): a 1 kHz tone and a 6 kHz tone, above what PCMU/PCMA can
    carry, both come back at their pitch and level, so the agent hears wideband speech and answers in it."""
    report, recorded = _call_with_tones(stack, tmp_path, (1000.0, 6000.0), "G722")
    assert report["codec"] == "G722/16000", report
    low = _assert_tone_back(recorded, 1000.0, 0.0, report)
    high = _assert_tone_back(recorded, 6000.0, 1.0, report)
    print(f"G.722: 1 kHz back at {low:.1f} dBFS, 6 kHz at {high:.1f} dBFS (sent {TONE_DBFS})")


def test_a_trunk_offering_g722_first_gets_g722(stack: dict[str, str], tmp_path: Path) -> None:
    """A trunk offering G722, PCMA and PCMU, in that order, gets wideband G.722: the gateway accepts the
    offerer's order among its codecs (pjmedia's answerer rule), so a trunk that lists G.722 first wants it."""
    report, recorded = _call_with_tones(stack, tmp_path, (6000.0,), "G722", "PCMA", "PCMU")
    assert report["codec"] == "G722/16000", report
    _assert_tone_back(recorded, 6000.0, 0.0, report)


def test_a_trunk_offering_pcmu_first_gets_pcmu(stack: dict[str, str], tmp_path: Path) -> None:
    """The other order: a trunk that lists PCMU before G722 (many do, to avoid wideband transcoding) gets PCMU."""
    report, recorded = _call_with_tones(stack, tmp_path, (1000.0,), "PCMU", "G722")
    assert report["codec"] == "PCMU/8000", report
    _assert_tone_back(recorded, 1000.0, 0.0, report)


# ---------------------------------------------------------------------------------------------- sipp as the trunk

# The scenario (tests/sipp/) of a trunk offering these payload types in this order; each checks that the 200's SDP
# answers with the first of them the gateway has.
OFFER_SCENARIOS = {(8,): "codec_offer_pcma_with_rtp.xml", (9, 8, 0): "codec_offer_g722_pcma_pcmu.xml",
                   (8, 0, 9): "codec_offer_pcma_pcmu_g722.xml", (0, 9): "codec_offer_pcmu_g722.xml"}


def _sipp_call(stack: dict[str, str], tmp_path: Path, scenario: str) -> subprocess.CompletedProcess[str]:
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    return subprocess.run(sipp_caller(SCENARIOS / scenario, stack["sip"], OPEN_NUMBER), cwd=tmp_path,
                          capture_output=True, text=True, timeout=40, check=False)


@needs("sipp")
def test_sipp_trunk_sending_pcma_rtp(stack: dict[str, str], tmp_path: Path) -> None:
    """A third-party UA (sipp) offering PCMA only is answered with PCMA, and its A-law RTP reaches the gateway."""
    before = scrape_metrics(stack["http"])
    t = np.arange(int(1.5 * 8000)) / 8000
    soundfile.write(tmp_path / "caller-pcma.wav", 0.3 * np.sin(2 * np.pi * 600 * t), 8000, subtype="ALAW")
    done = _sipp_call(stack, tmp_path, OFFER_SCENARIOS[(8,)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    received = "personagate_gateway_sip_rtp_packets_received_total"
    assert scrape_metrics(stack["http"])[received] - before[received] >= 60  # 1.5 s at 50 packets/s


@needs("sipp")
@pytest.mark.parametrize(("offer", "answer"), [((9, 8, 0), 9), ((8, 0, 9), 8), ((0, 9), 0)])
def test_sipp_trunk_offer_order_decides_the_codec(stack: dict[str, str], tmp_path: Path, offer: tuple[int, ...],
                                                  answer: int) -> None:
    """The gateway answers a third-party trunk's SDP with the first codec of its offer that it has."""
    scenario = OFFER_SCENARIOS[offer]
    assert f"RTP/AVP {answer}[" in (SCENARIOS / scenario).read_text()  # the answer the scenario requires
    done = _sipp_call(stack, tmp_path, scenario)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
