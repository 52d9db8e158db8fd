"""Worker settings: one model, read from a YAML file, then the environment, then the command line
(each overriding the one before), validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from .settings_files import LayeredSettings, SettingsError, load_settings

__all__ = ["Sampling", "SessionSampling", "SettingsError", "WorkerSettings", "load_worker_settings"]


class SessionSampling(BaseModel):
    """How one session samples its tokens: ``temperature`` and ``top_k`` for the agent's audio
    codebooks, ``text_temperature`` and ``text_top_k`` for its text stream. The defaults are
    PersonaPlex's server's; the bounds are what a worker accepts from a session (``persona.sampling``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a misspelt key must not leave a default in place

    temperature: float = Field(0.8, gt=0, le=2)
    top_k: int = Field(250, ge=1, le=2048)
    text_temperature: float = Field(0.7, gt=0, le=2)
    text_top_k: int = Field(25, ge=1, le=32000)

    @classmethod
    def bounds(cls, name: str) -> tuple[float, float, bool]:
        """(lowest, highest, lowest excluded) of one field, from its declared constraints."""
        low, high, open_low = float("-inf"), float("inf"), False
        for rule in cls.model_fields[name].metadata:
            if isinstance(rule, annotated_types.Gt):
                low, open_low = float(rule.gt), True
            elif isinstance(rule, annotated_types.Ge):
                low = float(rule.ge)
            elif isinstance(rule, annotated_types.Le):
                high = float(rule.le)
        return low, high, open_low

    @classmethod
    def bounds_text(cls, name: str) -> str:
        low, high, open_low = cls.bounds(name)
        return f"{'(' if open_low else '['}{low:g}, {high:g}]"


class Sampling(SessionSampling):
    """The worker's sampling: the values sessions get when they give none of their own, and
    ``greedy`` (tests and benchmarks), which makes every session greedy whatever it asks for."""

    greedy: bool = False

    def session_defaults(self) -> SessionSampling:
        return SessionSampling(**self.model_dump(exclude={"greedy"}))

    def lm_gen_kwargs(self) -> dict[str, Any]:
        """moshi ``LMGen`` keyword arguments (its own names) for one worker-wide setting."""
        return {
            "use_sampling": not self.greedy,
            "temp": self.temperature,
            "temp_text": self.text_temperature,
            "top_k": self.top_k,
            "top_k_text": self.text_top_k,
        }


class WorkerSettings(LayeredSettings):
    what: ClassVar[str] = "worker"
    model_config = SettingsConfigDict(
        env_prefix="PERSONAGATE_WORKER_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    model: Literal["tiny", "personaplex"] = "tiny"
    weights: Path | None = Field(None, description="PersonaPlex checkpoint folder (--model personaplex)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ...; default: cuda if present")
    slots: int | None = Field(None, ge=1, le=256, description="sessions stepped together; default by device")
    seed: int = 1234
    sampling: Sampling = Sampling()
    input_backlog_frames: int = Field(3, ge=1, le=50)
    output_backlog_frames: int = Field(6, ge=1, le=50)
    prime_cache_size: int = Field(32, ge=1, le=4096)
    start_timeout_seconds: float = Field(10.0, gt=0)
    max_voice_bytes: int = Field(4_000_000, ge=1024)

    @model_validator(mode="after")
    def _weights_for_personaplex(self) -> WorkerSettings:
        if self.model == "personaplex" and self.weights is None:
            raise ValueError("model 'personaplex' needs weights: the checkpoint folder (--weights DIR)")
        if self.model == "tiny" and self.weights is not None:
            raise ValueError("weights are only used with model 'personaplex'")
        return self

    def resolved_slots(self, device: str) -> int:
        """Slots per worker: 32 calls on a GPU (PersonaPlex on an H100); on a CPU, 8 tiny-model calls
        keep real time on 2 cores, while a CPU PersonaPlex cannot keep even one."""
        if self.slots is not None:
            return self.slots
        if device.startswith("cuda"):
            return 32
        return 8 if self.model == "tiny" else 1


def load_worker_settings(config_file: Path | None = None, **overrides: Any) -> WorkerSettings:
    """Settings from ``config_file`` < environment < ``overrides``; SettingsError lists every problem."""
    return load_settings(WorkerSettings, "worker", config_file, **overrides)
