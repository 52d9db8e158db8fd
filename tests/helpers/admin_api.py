"""The admin API tests' tenants and the gateway app serving them in-process (the ``gw`` fixture, tests/conftest.py):
acme, a commented tenant.yaml whose comments and layout the admin API's edits must keep, and bank; a tokens file for
the operator and each tenant's admin."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.admin.tokens import new_token
from gateway.app import create_app
from gateway.config import GatewaySettings

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
MAX_CLIP_BYTES = 200_000  # the gateway's clip size limit in these tests


@dataclass
class Tokens:
    """The tokens file and each admin's token."""

    path: Path
    operator: str
    acme: str
    bank: str

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


def write_tokens(path: Path) -> Tokens:
    """A tokens file at ``path`` for the operator and the admins of acme and bank."""
    (op, op_hash), (acme, acme_hash), (bank, bank_hash) = new_token(), new_token(), new_token()
    path.write_text(f"operator:\n  - {op_hash}\ntenants:\n  acme:\n    - {acme_hash}\n  bank:\n    - {bank_hash}\n")
    return Tokens(path, op, acme, bank)


def write_tenants(root: Path) -> Path:
    """acme and bank under ``root``; ``root``."""
    for tenant, text in (("acme", ACME), ("bank", BANK)):
        (root / tenant).mkdir(parents=True)
        (root / tenant / "tenant.yaml").write_text(text)
    return root


@dataclass
class Gateway:
    """The in-process gateway of the ``gw`` fixture: its client, tenants folder, tokens and app."""

    client: httpx.AsyncClient
    root: Path
    tokens: Tokens
    app: object

    @property
    def acme_file(self) -> Path:
        return self.root / "acme" / "tenant.yaml"

    def as_(self, who: str) -> dict[str, str]:
        return self.tokens.auth(getattr(self.tokens, who))


@contextlib.asynccontextmanager
async def in_process_gateway(root: Path, tokens: Path | None) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The gateway app serving ``root`` (with its lifespan), and an httpx client calling it over ASGI."""
    settings = GatewaySettings(tenants_dir=root, admin_tokens_file=tokens, max_clip_bytes=MAX_CLIP_BYTES,
                               tenants_poll_seconds=0.2)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app
