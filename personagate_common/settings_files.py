"""Settings read from a YAML file, then the environment, then explicit values (command-line flags),
each overriding the one before, with every problem reported on a line of its own.

Shared by the worker (``agent_runtime.config``) and the gateway (``gateway.config``): a settings class
derives from ``LayeredSettings`` (naming itself in ``what``) and is loaded with ``load_settings``.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from .bounded_yaml import describe, load_yaml

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file", default=None)

S = TypeVar("S", bound=BaseSettings)


class SettingsError(ValueError):
    """Settings that cannot start a process, with one line per problem."""


class YamlFileSource(PydanticBaseSettingsSource):
    """The settings file ``load_settings`` was given (none: no values). ``what`` names the settings in
    messages ("worker", "gateway")."""

    def __init__(self, settings_cls: type[BaseSettings], what: str) -> None:
        super().__init__(settings_cls)
        self.what = what

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        if path is None:
            return {}
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{path}: cannot read the settings file ({exc})") from exc
        data = load_yaml(text)  # a yaml.YAMLError is reported, positioned, by load_settings
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: expected a mapping of {self.what} settings, got {type(data).__name__}")
        return data


class LayeredSettings(BaseSettings):
    """Explicit values, then the environment, then the settings file."""

    what: ClassVar[str] = "settings"  # how messages name these settings: "worker", "gateway"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, YamlFileSource(settings_cls, cls.what)


def load_settings(cls: type[S], what: str, config_file: Path | None = None, **overrides: Any) -> S:
    """``cls`` from ``config_file`` < environment < ``overrides`` (None values are not overrides);
    SettingsError lists every problem, one line each, as ``field.path: message``."""
    token = _config_file.set(config_file)
    try:
        if config_file is not None and not config_file.is_file():
            raise SettingsError(f"{config_file}: no such settings file")
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except yaml.YAMLError as exc:
        line, column, message = describe(exc)
        raise SettingsError(f"{config_file}:{line}:{column}: {message}") from exc
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            lines.append(f"{where}: {err['msg']}")
        raise SettingsError(f"invalid {what} settings:\n  " + "\n  ".join(lines)) from exc
    finally:
        _config_file.reset(token)
