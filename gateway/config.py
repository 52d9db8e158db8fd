"""Gateway settings: read from a YAML file, then the environment (``PERSONAGATE_GATEWAY_*``), then the
command line (each overriding the one before), validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agent_runtime.settings_files import LayeredSettings, SettingsError, load_settings

from .tenants.loader import MAX_CLIP_BYTES

__all__ = ["GatewaySettings", "SettingsError", "load_gateway_settings"]


class GatewaySettings(LayeredSettings):
    what: ClassVar[str] = "gateway"
    model_config = SettingsConfigDict(env_prefix="PERSONAGATE_GATEWAY_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535, description="the HTTP port: admin API, probes, metrics")
    tenants_dir: Path = Field(Path("tenants"), description="the folder of tenant folders (<id>/tenant.yaml)")
    # The promise is that a change applies within 5 s; the poll is one part of that.
    tenants_poll_seconds: float = Field(1.0, gt=0, le=4, description="how often the tenants folder is checked")
    admin_tokens_file: Path | None = Field(
        None, description="YAML file of SHA-256 hashes of admin API tokens; without it the admin API is off")
    max_clip_bytes: int = Field(5_000_000, ge=1024, le=MAX_CLIP_BYTES, description="largest voice clip upload")
    history_versions: int = Field(50, ge=1, le=10_000, description="versions kept per file in a tenant's history")


def load_gateway_settings(config_file: Path | None = None, **overrides: Any) -> GatewaySettings:
    """Settings from ``config_file`` < environment < ``overrides``; SettingsError lists every problem."""
    return load_settings(GatewaySettings, "gateway", config_file, **overrides)
