"""The system programs tests start, found in one place with one skip reason each.

    @needs("sipp")                      # a marker: the test skips, saying which Debian package installs sipp
    exe = require("redis-server")       # in a fixture or test: the program's path, or the same skip

tests/system-deps.sh (run by ``make test``, and so by ``.ci/run``) installs these programs or says how to; where a
developer runs pytest without them, the tests that need them skip with the reason below (``pytest -rs``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

BARESIP_MODULES = Path("/usr/lib/baresip/modules")  # Debian's baresip package puts its modules here


@dataclass(frozen=True)
class Program:
    """A program the tests start: where it is looked for, and what installs it."""

    name: str
    package: str | None  # the Debian package; None where there is none (kubectl)
    fixed_path: Path | None = None  # looked for only here (Playwright drives Debian's chromium by this path)
    also_at: Path | None = None  # looked for here too where it is not on PATH (a PATH without /usr/sbin, say)
    needs_file: Path | None = None  # a file the program needs besides itself (a module)
    what_for: str = ""

    def path(self) -> str | None:
        """The program's path, or None where it (or a file it needs) is missing."""
        if self.fixed_path is not None:
            found = str(self.fixed_path) if os.access(self.fixed_path, os.X_OK) else None
        else:
            found = shutil.which(self.name)
            if found is None and self.also_at is not None and os.access(self.also_at, os.X_OK):
                found = str(self.also_at)
        if found is not None and self.needs_file is not None and not self.needs_file.exists():
            return None
        return found

    def missing_reason(self) -> str:
        """Why a test that needs this program skips where it is missing."""
        what = (str(self.fixed_path) if self.fixed_path is not None
                else f"{self.name} with {self.needs_file}" if self.needs_file is not None else self.name)
        install = (f"Debian package {self.package}; tests/system-deps.sh installs it" if self.package is not None
                   else "not a Debian package here; CI machines have it preinstalled")
        return f"{what} is not installed ({install}){': ' + self.what_for if self.what_for else ''}"


PROGRAMS = {program.name: program for program in (
    Program("redis-server", "redis-server", also_at=Path("/usr/bin/redis-server"),
            what_for="routing and call admission need a real Redis"),
    Program("sipp", "sip-tester", what_for="these SIP calls are sipp scenarios (tests/sipp/)"),
    Program("promtool", "prometheus", what_for="it checks the alert rules"),
    Program("chromium", "chromium", fixed_path=Path("/usr/bin/chromium"),
            what_for="the browser tests drive it through Playwright"),
    Program("baresip", "baresip", needs_file=BARESIP_MODULES / "srtp.so", what_for="the caller over TLS with SRTP"),
    Program("kubectl", None, what_for="kubectl kustomize renders deploy/k8s"),
)}


def path_of(name: str) -> str | None:
    """The path of the program ``name`` (a key of PROGRAMS), or None where it is missing."""
    return PROGRAMS[name].path()


def needs(name: str) -> pytest.MarkDecorator:
    """A marker that skips the test where the program ``name`` is missing, saying what installs it."""
    program = PROGRAMS[name]
    return pytest.mark.skipif(program.path() is None, reason=program.missing_reason())


def require(name: str) -> str:
    """The path of the program ``name``; skips the calling test (or fixture's users) where it is missing."""
    program = PROGRAMS[name]
    found = program.path()
    if found is None:
        pytest.skip(program.missing_reason())
    return found
