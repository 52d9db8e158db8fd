"""Shared test set-up: environment, and the fixtures every test module may ask for without importing them."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers.processes import free_port, serve
from tests.helpers.stack import sip_tenants
from tests.helpers.worker import TEST_WORKER_SECRET, WORKER_SLOTS

if TYPE_CHECKING:
    from gateway.tenants.registry import TenantRegistry
    from tests.helpers.admin_api import Gateway

# Fixtures defined in helper modules, available to every test module without an import.
# tiers: the e2e mark from process-starting fixtures, and the check that unmarked tests start no process.
pytest_plugins = ["tests.helpers.redis_server", "tests.helpers.tiers"]

# moshi reads this when its modules are imported: without it every test would pay torch.compile's
# start-up on CPU for nothing.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

# The internal plane's shared secret (tests/helpers/worker.py): every worker the tests start accepts it and every
# gateway they start sends it, through the environment both inherit.
os.environ["PERSONAGATE_WORKER_SESSION_SECRET"] = TEST_WORKER_SECRET
os.environ["PERSONAGATE_GATEWAY_WORKER_SECRET"] = TEST_WORKER_SECRET


@pytest.fixture(scope="session")
def worker() -> Iterator[str]:
    """A `personagate worker` subprocess (tiny model, greedy); yields "127.0.0.1:PORT"."""
    port = free_port()
    env = os.environ | {"NO_TORCH_COMPILE": "1", "PERSONAGATE_WORKER_START_TIMEOUT_SECONDS": "2"}
    command = [sys.executable, "-m", "personagate", "worker", "--port", str(port), "--slots", str(WORKER_SLOTS),
               "--greedy"]
    with serve(command, f"http://127.0.0.1:{port}/readyz", env=env):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SIP tests' tenants (tests.helpers.stack.sip_tenants), copied once per module."""
    return sip_tenants(tmp_path_factory.mktemp("tenants"))


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    """The admin API's gateway in-process (tests.helpers.admin_api), serving acme and bank from ``tmp_path``."""
    # imported here: the gateway app takes seconds to import, which runs that need no gateway should not pay
    from tests.helpers.admin_api import Gateway, in_process_gateway, write_tenants, write_tokens

    root = write_tenants(tmp_path / "tenants")
    tokens = write_tokens(tmp_path / "tokens.yaml")
    async with in_process_gateway(root, tokens.path) as (client, app):
        yield Gateway(client, root, tokens, app)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> TenantRegistry:
    """The calls tests' tenants (tests.helpers.calls: acme, and tight with a one-call limit), loaded once per module."""
    from tests.helpers.calls import write_call_tenants  # imported here, as for gw

    return write_call_tenants(tmp_path_factory.mktemp("tenants"))
