"""An admin API to attack: a tenants folder with two tenants, a tokens file for the operator and each tenant's
admin, and the gateway app in-process (httpx over ASGI, with its lifespan) or as a real process on loopback.

    async with admin_gateway(tmp_path, clock=fake_clock) as gw:
        r = await gw.client.get("/v1/admin/tenants", headers=gw.auth("acme"))
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
from tests.helpers.admin_api import BANK
from tests.helpers.processes import free_port, serve

ADMIN = "/v1/admin"
TENANTS = {
    "acme": """\
tenant: acme
name: Acme Insurance
numbers:
  "+14155550100": claims
personas:
  claims:
    prompt: You are Sam, a claims agent at Acme Insurance.
    voice: {preset: NATF0}
""",
    "bank": BANK,
}
PERSONA = "prompt: You answer billing questions.\nvoice: {preset: NATM1}\n"


def speech_like_wav(seconds: float = 3.0, rate: int = 16_000) -> bytes:
    """A voiced, syllable-modulated signal: passes the clip checks the way a speech recording does."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.7 * t)) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    audio = (voiced + np.random.default_rng(0).normal(0, 0.05, t.size)) * 0.5 * (1 - np.cos(2 * np.pi * 4 * t))
    out = io.BytesIO()
    soundfile.write(out, 0.3 * audio / np.abs(audio).max(), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@dataclass
class AdminGateway:
    client: httpx.AsyncClient
    app: FastAPI
    root: Path  # the tenants folder
    tokens_file: Path
    tokens: dict[str, str]  # operator, acme, bank → token

    def auth(self, who: str) -> dict[str, str]:
        """The header for ``who``'s token (operator, acme, bank), or for ``who`` itself as a token."""
        return {"Authorization": f"Bearer {self.tokens.get(who, who)}"}

    def client_from(self, address: str) -> httpx.AsyncClient:
        """Another client of the same app, from ``address`` (close it, or use it in ``async with``)."""
        transport = httpx.ASGITransport(app=self.app, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://gateway")

    def sample(self, name: str, **labels: str) -> float:
        """A metric's value now (0 where it has no sample yet)."""
        return self.app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def make_tenants(root: Path) -> Path:
    for tenant, text in TENANTS.items():
        (root / tenant).mkdir(parents=True)
        (root / tenant / "tenant.yaml").write_text(text)
    return root


def write_tokens(path: Path) -> dict[str, str]:
    """A tokens file admitting an operator and the admins of acme and bank; their tokens."""
    made = {who: new_token() for who in ("operator", "acme", "bank")}
    path.write_text(f"operator:\n  - {made['operator'][1]}\ntenants:\n"
                    + "".join(f"  {t}:\n    - {made[t][1]}\n" for t in ("acme", "bank")))
    return {who: token for who, (token, _) in made.items()}


def settings_for(root: Path, tokens_file: Path, **overrides: Any) -> GatewaySettings:
    return GatewaySettings(tenants_dir=root, admin_tokens_file=tokens_file, tenants_poll_seconds=0.2,
                           max_clip_bytes=5_000_000, **overrides)


@contextlib.asynccontextmanager
async def admin_gateway(tmp_path: Path, *, client_address: str = "203.0.113.7",
                        clock: Callable[[], float] | None = None, **overrides: Any) -> AsyncIterator[AdminGateway]:
    """The gateway app in-process; requests come from ``client_address``; the failed-login throttle reads
    ``clock`` (monotonic seconds) where one is given."""
    root, tokens_file = make_tenants(tmp_path / "tenants"), tmp_path / "tokens.yaml"
    tokens = write_tokens(tokens_file)
    settings = settings_for(root, tokens_file, **overrides)
    app = create_app(settings)
    if clock is not None:
        admin = app.state.admin
        admin.sources, admin.prefixes = (
            FailureThrottle(burst=settings.admin_auth_failure_burst, per_minute=settings.admin_auth_failures_per_minute,
                            max_keys=settings.admin_auth_tracked_keys, clock=clock) for _ in range(2))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(client_address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield AdminGateway(client, app, root, tokens_file, tokens)


@contextlib.contextmanager
def gateway_process(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """A real ``personagate gateway`` on loopback (no SIP); yields its base URL and the tokens."""
    root, tokens_file = make_tenants(tmp_path / "tenants"), tmp_path / "tokens.yaml"
    tokens = write_tokens(tokens_file)
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PERSONAGATE_GATEWAY_")}
    environment.update({"PERSONAGATE_GATEWAY_TENANTS_POLL_SECONDS": "0.2", **(env or {})})
    command = [sys.executable, "-m", "personagate", "gateway", "--tenants", str(root), "--admin-tokens",
               str(tokens_file), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with serve(command, f"{base}/healthz", env=environment, timeout=60):
        yield base, tokens
