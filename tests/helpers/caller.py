"""`personagate call` (a pjsua2 endpoint) as a SIP caller of a test stack, and its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.wait import scaled

CALL_TIMEOUT = round(scaled(30))  # seconds a call may take to be answered (the caller's --timeout)


def call_command(stack: dict[str, str], number: str, *args: str) -> list[str]:
    """The command for `personagate call` dialing ``number`` at the stack's SIP address, with ``args`` added."""
    return [sys.executable, "-m", "personagate", "call", f"sip:{number}@{stack['sip']}", "--timeout",
            str(CALL_TIMEOUT), *args]


def call(stack: dict[str, str], number: str, *args: str) -> dict:
    """Place one call (see call_command) and return its report; fails if the caller itself failed."""
    done = subprocess.run(call_command(stack, number, *args), check=False, capture_output=True, text=True,
                          timeout=CALL_TIMEOUT + scaled(15))
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return json.loads(done.stdout)
