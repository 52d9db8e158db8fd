"""Tenant folders written the way an editor or the admin API saves them, and which persona a number reaches."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.tenants.registry import TenantRegistry
from gateway.tenants.tenant import PersonaConfig

TEMPLATE = """\
tenant: {tenant}
name: {tenant} line
numbers:
  "{number}": agent
personas:
  agent:
    prompt: {prompt}
    voice: {{preset: NATF0}}
"""


def write_tenant_file(root: Path, tenant: str, text: str) -> Path:
    """``root``/``tenant``/tenant.yaml holding ``text`` (the folders made as needed), replaced in one step; its
    path."""
    folder = root / tenant
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tenant.yaml"
    tmp = folder / ".tenant.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)  # as an editor or the admin API saves: never a half-written file
    return path


def write_tenant(root: Path, tenant: str, number: str = "+14155550100", prompt: str = "You are agent one.") -> Path:
    """``root``/``tenant``/tenant.yaml from TEMPLATE, replaced in one step; its path."""
    return write_tenant_file(root, tenant, TEMPLATE.format(tenant=tenant, number=number, prompt=prompt))


def routed_persona(registry: TenantRegistry, number: str) -> PersonaConfig | None:
    """The persona ``number`` reaches now, or None where it reaches none."""
    routed = registry.route(number)
    if routed is None:
        return None
    answer = routed[1]
    assert isinstance(answer, PersonaConfig)
    return answer
