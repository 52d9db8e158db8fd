"""The admin API's tests' set-ups: tenants, a tokens file, and the gateway serving them, in-process (httpx over
ASGI, with its lifespan: the registry loads and watches the folder) or as a real `personagate gateway` process.

- ``ACME``, a commented tenant.yaml whose comments and layout the admin API's edits must keep; ``PLAIN_ACME``, its
  claims line alone, for tests that add, remove and fuzz personas freely; ``BANK``; ``write_tenants``.
- ``write_tokens``: a tokens file for the operator and each tenant's admin (``Tokens``).
- ``in_process_gateway``: the app serving a tenants folder, as the ``gw`` fixture (tests/conftest.py) wraps it in a
  ``Gateway``; ``admin_gateway``: the whole set-up in one step (PLAIN_ACME and BANK, tokens, a fake throttle clock).
- ``gateway_process``: a real gateway on loopback; ``speech_like_wav``: a clip that passes the clip checks.

    async with admin_gateway(tmp_path, clock=fake_clock) as gw:
        r = await gw.client.get(f"{ADMIN}/tenants", headers=gw.as_("acme"))
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile
from fastapi import FastAPI

from gateway.admin.throttle import FailureThrottle
from gateway.admin.tokens import new_token
from gateway.app import create_app
from gateway.config import GatewaySettings
from tests.helpers.processes import free_port, serve
from tests.helpers.tenant_files import write_tenant_file

ADMIN = "/v1/admin"
ACME = """\
# Acme Insurance: the claims line and the billing line.
tenant: acme
name: Acme Insurance

numbers:
  "+14155550100": claims   # main line
  "+14155550101": billing

personas:
  # First notice of loss.
  claims:   # the busiest persona
    prompt: >-
      You are Sam, a claims agent at Acme Insurance. Take down the details of the
      caller's claim, calmly and precisely.
    voice: {preset: NATF0}   # warm, unhurried
    sampling:
      temperature: 0.7
    speaks_first: true

  # Billing questions.
  billing:
    prompt: You answer billing questions for Acme Insurance.
    voice:
      preset: NATM1

limits:
  max_concurrent_calls: 5   # the contract's cap
"""
# No number routes to billing here, so a test may add it and remove it again.
PLAIN_ACME = """\
tenant: acme
name: Acme Insurance
numbers:
  "+14155550100": claims
personas:
  claims:
    prompt: You are Sam, a claims agent at Acme Insurance.
    voice: {preset: NATF0}
"""
BANK = """\
tenant: bank
name: Example Bank
numbers:
  "+442071234567": cards
personas:
  cards:
    prompt: You help customers with their bank cards.
    voice: {preset: VARF1}
"""
PERSONA = "prompt: You answer billing questions.\nvoice: {preset: NATM1}\n"  # a valid persona body
MAX_CLIP_BYTES = 200_000  # the in-process gateway's clip size limit, unless a test sets another
GATEWAY_CLIP_BYTES = 5_000_000  # the gateway's default: room for a 3.8 MB clip whose header lies about its length


def speech_like_wav(seconds: float = 3.0, rate: int = 16_000) -> bytes:
    """A voiced, syllable-modulated signal: passes the clip checks the way a speech recording does."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = 0.5 * (1 - np.cos(2 * np.pi * 4 * t))
    noise = np.random.default_rng(0).normal(0, 0.05, t.size)
    audio = (voiced + noise) * syllables
    out = io.BytesIO()
    soundfile.write(out, 0.3 * audio / np.abs(audio).max(), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@dataclass
class Tokens:
    """The tokens file and each admin's token."""

    path: Path
    operator: str
    acme: str
    bank: str

    def auth(self, token: str) -> dict[str, str]:
        """The Authorization header carrying ``token`` (any text: a test's guess too)."""
        return {"Authorization": f"Bearer {token}"}


def write_tokens(path: Path) -> Tokens:
    """A tokens file at ``path`` for the operator and the admins of acme and bank."""
    (op, op_hash), (acme, acme_hash), (bank, bank_hash) = new_token(), new_token(), new_token()
    path.write_text(f"operator:\n  - {op_hash}\ntenants:\n  acme:\n    - {acme_hash}\n  bank:\n    - {bank_hash}\n")
    return Tokens(path, op, acme, bank)


def write_tenants(root: Path, *, acme: str = ACME) -> Path:
    """acme (``acme``'s text) and bank under ``root``; ``root``."""
    for tenant, text in (("acme", acme), ("bank", BANK)):
        write_tenant_file(root, tenant, text)
    return root


@dataclass
class Gateway:
    """An in-process gateway: its client, tenants folder, tokens and app."""

    client: httpx.AsyncClient
    root: Path  # the tenants folder
    tokens: Tokens
    app: FastAPI

    @property
    def acme_file(self) -> Path:
        return self.root / "acme" / "tenant.yaml"

    def as_(self, who: str) -> dict[str, str]:
        """The Authorization header of ``who``: operator, acme or bank."""
        return self.tokens.auth(getattr(self.tokens, who))

    def client_from(self, address: str) -> httpx.AsyncClient:
        """Another client of the same app, from ``address`` (close it, or use it in ``async with``)."""
        return _client(self.app, address)

    def sample(self, name: str, **labels: str) -> float:
        """A metric's value now (0 where it has no sample yet)."""
        return self.app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def _client(app: FastAPI, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway")


@contextlib.asynccontextmanager
async def in_process_gateway(root: Path, tokens: Path | None, *, client_address: str = "127.0.0.1",
                             clock: Callable[[], float] | None = None, **overrides: Any
                             ) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The gateway app serving ``root`` with the tokens file ``tokens`` (None: the admin API off), with its
    lifespan, and an httpx client calling it over ASGI from ``client_address``. ``overrides`` are settings
    (max_clip_bytes is MAX_CLIP_BYTES unless given); the failed-login throttles read ``clock`` (monotonic
    seconds) where one is given."""
    settings = GatewaySettings(**{"tenants_dir": root, "admin_tokens_file": tokens, "tenants_poll_seconds": 0.2,
                                  "max_clip_bytes": MAX_CLIP_BYTES, **overrides})
    app = create_app(settings)
    if clock is not None:
        admin = app.state.admin
        admin.sources, admin.prefixes = (
            FailureThrottle(burst=settings.admin_auth_failure_burst, per_minute=settings.admin_auth_failures_per_minute,
                            max_keys=settings.admin_auth_tracked_keys, clock=clock) for _ in range(2))
    async with app.router.lifespan_context(app), _client(app, client_address) as client:
        yield client, app


@contextlib.asynccontextmanager
async def admin_gateway(tmp_path: Path, *, client_address: str = "203.0.113.7",
                        clock: Callable[[], float] | None = None, **overrides: Any) -> AsyncIterator[Gateway]:
    """PLAIN_ACME and BANK under ``tmp_path``/tenants, a tokens file, and the gateway serving them in-process
    (``in_process_gateway``, with the gateway's own clip size limit unless ``overrides`` set one)."""
    root = write_tenants(tmp_path / "tenants", acme=PLAIN_ACME)
    tokens = write_tokens(tmp_path / "tokens.yaml")
    overrides.setdefault("max_clip_bytes", GATEWAY_CLIP_BYTES)
    async with in_process_gateway(root, tokens.path, client_address=client_address, clock=clock,
                                  **overrides) as (client, app):
        yield Gateway(client, root, tokens, app)


@contextlib.contextmanager
def gateway_process(root: Path, tokens: Path, *, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    """A real `personagate gateway` (no SIP) on loopback serving ``root`` with the tokens file ``tokens``, started
    under ``prefix`` (a command that runs it, e.g. in a namespace); yields its base URL. None of this process's
    PERSONAGATE_GATEWAY_* settings reach it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONAGATE_GATEWAY_")}
    env["PERSONAGATE_GATEWAY_TENANTS_POLL_SECONDS"] = "0.2"
    command = [*prefix, sys.executable, "-m", "personagate", "gateway", "--tenants", str(root),
               "--admin-tokens", str(tokens), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with serve(command, f"{base}/healthz", env=env, timeout=60):
        yield base
