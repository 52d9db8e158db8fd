"""sipp as a SIP caller: the scenarios of tests/sipp/ and the command that runs one against a gateway."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile

from tests.helpers.processes import udp_free_port
from tests.helpers.wait import scaled

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


class Human:
    """sipp as the human an escalation reaches (at ``stack["target_port"]``, see stack.escalating_tenant), running
    tests/sipp/human_``scenario``.xml for one call: answers, hangs_up (``pause_ms`` after answering), refuses
    (with ``status``, e.g. "486 Busy Here") or no_answer. ``params`` fill the scenario's ``{name}`` placeholders."""

    def __init__(self, stack: dict[str, str], folder: Path, scenario: str, **params: object) -> None:
        path = folder / f"human-{scenario}.xml"
        text = (SCENARIOS / f"human_{scenario}.xml").read_text()
        for name, value in params.items():
            text = text.replace(f"{{{name}}}", str(value))
        path.write_text(text)
        self.proc = subprocess.Popen(
            ["sipp", "-sf", str(path), "-i", "127.0.0.1", "-p", stack["target_port"], "-mp", str(udp_free_port()),
             "-rtp_echo", "-m", "1", "-timeout", "25", "-timeout_error", "-nostdin", "-trace_err"],
            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.folder = folder

    def finished(self, timeout: float = 10.0) -> int:
        """sipp's exit status (0: its whole scenario ran, e.g. the BYE it expects came), waited for ``timeout``
        seconds (scaled)."""
        try:
            self.proc.wait(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        return self.proc.returncode

    def errors(self) -> str:
        """The end of sipp's error logs and output: what a failed assertion shows."""
        logs = [p.read_text(errors="replace")[-2000:] for p in self.folder.glob("*errors.log")]
        out = self.proc.stdout.read()[-2000:] if self.proc.stdout else ""
        return "\n".join(logs) + out
