"""sipp as a SIP caller: the scenarios of tests/sipp/ and the command that runs one against a gateway."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile

from tests.helpers.processes import udp_free_port

SCENARIOS = Path(__file__).resolve().parent.parent / "sipp"  # tests/sipp: every sipp scenario the tests run


def sipp_caller(scenario: Path, sip: str, number: str, *, sipp_timeout: float = 20, extra: Sequence[str] = ()
                ) -> list[str]:
    """The command for sipp as one caller running ``scenario`` against the gateway at ``sip``, dialing ``number``,
    on free loopback ports; the scenario fails after ``sipp_timeout`` seconds."""
    return ["sipp", "-sf", str(scenario), "-s", number, sip, "-i", "127.0.0.1", "-p", str(udp_free_port()),
            "-mp", str(udp_free_port()), "-m", "1", "-timeout", str(int(sipp_timeout)), "-timeout_error", "-nostdin",
            "-trace_err", *extra]


def caller_tone_wav(folder: Path) -> None:
    """``caller-pcmu.wav`` in ``folder``: the 1.5 s 600 Hz mu-law tone sipp scenarios play as the caller's RTP."""
    t = np.arange(int(1.5 * 8000)) / 8000
    soundfile.write(folder / "caller-pcmu.wav", 0.3 * np.sin(2 * np.pi * 600 * t), 8000, subtype="ULAW")
