"""The two test tiers (docs/testing.md): ``e2e`` tests start real processes (workers, gateways, redis-server,
sipp, chromium, `personagate` commands); every other test runs in this process and belongs to the fast tier
(``make test-fast``, ``pytest -m "not e2e"``).

A test is ``e2e`` when it uses a fixture named in ``PROCESS_FIXTURES`` (marked here, at collection), when its
module says ``pytestmark = pytest.mark.e2e``, or when it is marked itself. The classification keeps itself honest:
a test not marked ``e2e`` that starts a process (``subprocess``, ``os.fork``, ``os.posix_spawn``: Python's audit
events) fails, naming the mark it needs, so the fast tier never quietly grows processes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

E2E = "e2e"

# Fixtures that start a process (or stand on one that does): a test that asks for one is e2e. The module-scoped
# stacks of the SIP and WebRTC modules are all named here too, though their modules are marked e2e as a whole.
PROCESS_FIXTURES = frozenset({
    "worker",  # tests/conftest.py: the session's `personagate worker`
    "redis_server",  # tests/helpers/redis_server.py
    "tenants",  # tests/conftest.py: the SIP tests' tenants, only ever used beside a stack
    "stack", "stuck_stack", "auth_stack", "churn_stack", "strict_stack", "tiny_stack", "edge", "echo", "crowd",
    "gateway", "browser", "fleet", "echo_worker", "tls_worker",
    "rendered",  # tests/test_k8s*.py: kubectl kustomize
    "certs",  # tests/test_sip_transports.py: openssl
})

_PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system"})
# Programs libraries run on their own to look something up (ctypes.util.find_library runs ldconfig,
# platform.uname runs uname): not the test's.
_LIBRARY_PROBES = frozenset({"ldconfig", "gcc", "cc", "objdump", "ld", "uname"})
_running: dict[str, Any] = {"item": None, "started": None}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in _PROCESS_EVENTS and _running["item"] is not None and _running["started"] is None:
        program = os.fsdecode(args[0]) if args and isinstance(args[0], str | bytes | os.PathLike) else "?"
        if os.path.basename(program) not in _LIBRARY_PROBES:
            _running["started"] = f"{event}({program!r})"


def pytest_configure() -> None:
    if not getattr(sys, "_personagate_tiers_hooked", False):  # an audit hook cannot be removed: add it once
        sys.addaudithook(_audit)
        sys._personagate_tiers_hooked = True  # type: ignore[attr-defined]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())) and item.get_closest_marker(E2E) is None:
            item.add_marker(E2E)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running["item"] = None if item.get_closest_marker(E2E) else item.nodeid
    _running["started"] = None


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    started, _running["item"], _running["started"] = _running["started"], None, None
    if started is not None:
        pytest.fail(f"{item.nodeid} started a process ({started}) but is not marked e2e: mark it (or its module) "
                    f"with pytest.mark.e2e, or add its fixture to PROCESS_FIXTURES in tests/helpers/tiers.py",
                    pytrace=False)
