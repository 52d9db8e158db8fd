"""A server process's log, as ``tests.helpers.processes.serve`` keeps it, and the check every robustness test ends
with: the process still running (a crash is a dead process: the tests run ``personagate gateway`` directly, with no
supervisor to restart it) and nothing in its log that only a bug prints."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# What only a bug prints: a Python traceback (an exception escaping a callback or a task), the AttributeError of a
# half-destroyed media port, Python's unraisable-exception and fatal-error reports, and a C assertion (pjlib's, or
# libc's "Assertion `...' failed" before an abort).
PROBLEM = re.compile(r"Traceback|AttributeError|Assertion|Fatal Python error|Exception ignored|Segmentation fault|"
                     r"core dumped|SystemError|pj_assert", re.IGNORECASE)


def log_path(proc: subprocess.Popen) -> Path:
    path = getattr(proc, "log_path", None)
    assert path is not None, "the process was not started by tests.helpers.processes.serve (it has no log_path)"
    return path


def read_log(proc: subprocess.Popen, since: int = 0) -> str:
    """The process's log (stderr) from byte ``since`` on."""
    with log_path(proc).open("rb") as log:
        log.seek(since)
        return log.read().decode(errors="replace")


def log_size(proc: subprocess.Popen) -> int:
    """Where the log ends now: pass it to ``read_log``/``assert_alive_and_clean`` to look at what comes after."""
    return log_path(proc).stat().st_size


def problems(text: str, context: int = 2) -> list[str]:
    """Each line matching ``PROBLEM``, with ``context`` lines after it."""
    lines, found, shown = text.splitlines(), [], -1
    for i, line in enumerate(lines):
        if i > shown and PROBLEM.search(line):
            found.append("\n".join(lines[i:i + 1 + context]))
            shown = i + context
    return found


def assert_alive_and_clean(proc: subprocess.Popen, what: str = "", since: int = 0) -> None:
    """``proc`` still runs (the same process: no restart) and its log since ``since`` shows no traceback, no
    AttributeError, no assertion."""
    text = read_log(proc, since)
    assert proc.poll() is None, f"{what}: the process died (exit status {proc.returncode}); its log ends:\n{text[-4000:]}"
    found = problems(text)
    assert not found, f"{what}: {len(found)} problem(s) in the log, the first:\n" + "\n---\n".join(found[:5])
