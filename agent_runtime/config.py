"""Worker settings: one model, read from a YAML file, then the environment, then the command line
(each overriding the one before), validated at start."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from personagate_common.plane import check_secret, check_server_tls, read_secrets
from personagate_common.routing.redis_store import RedisPrefixSetting, RedisUrlSetting
from personagate_common.settings_files import LayeredSettings, SettingsError, load_settings

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


WILDCARD_HOSTS = ("0.0.0.0", "::", "", "[::]")


class WorkerSettings(LayeredSettings):
    what: ClassVar[str] = "worker"
    model_config = SettingsConfigDict(
        env_prefix="PERSONAGATE_WORKER_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    model: Literal["tiny", "personaplex", "echo"] = "tiny"  # echo: no model, the caller's audio back (echo.py)
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
    # Shutdown: SIGTERM drains (no new sessions, calls in progress go on) for at most this long.
    drain_seconds: float = Field(3600.0, ge=0, description="how long a drain waits for calls in progress to end")
    pod_deletion_cost: bool = Field(
        False, description="keep controller.kubernetes.io/pod-deletion-cost on this worker's own pod equal to its "
                           "live sessions, so that a scale-in deletes the idlest worker first; needs the in-cluster "
                           "credentials, POD_NAME and POD_NAMESPACE (deploy/k8s/components/pod-deletion-cost)")
    # Routing (agent_runtime/registration.py): with a Redis URL the worker heartbeats its state there.
    redis_url: RedisUrlSetting = Field(
        None, description="the gateways' routing Redis: redis://, rediss://, unix:// or redis+sentinel:// URL; "
                          "unset: no registration (the single-machine gateway reads /v1/info)")
    redis_prefix: RedisPrefixSetting = Field("{pg}", description="key prefix in Redis, a hash tag; the same as the gateways'")
    advertise_url: str | None = Field(
        None, description="the ws:// URL gateways reach this worker's sessions at; "
                          "default ws://HOST:PORT/v1/sessions (set it when listening on 0.0.0.0)")
    worker_id: str | None = Field(None, description="this worker's id in the routing store; default HOSTNAME:PORT")
    heartbeat_seconds: float = Field(1.0, gt=0, le=60, description="how often the worker heartbeats to Redis")
    worker_ttl_seconds: float = Field(
        3.0, gt=0, le=600, description="how long a heartbeat keeps the worker alive in the routing store")
    # The internal plane (personagate_common/plane.py, docs/deploy.md): who may open sessions and read /v1/info,
    # and TLS.
    session_secret: SecretStr | None = Field(
        None, description="a shared secret gateways must send (Authorization: Bearer) to open sessions and read "
                          "/v1/info; at least 16 characters")
    session_secret_file: Path | None = Field(
        None, description="a file of accepted shared secrets, one per line (two during a rotation), e.g. a "
                          "Kubernetes Secret mounted as a file; accepted beside session_secret")
    insecure_open_sessions: bool = Field(
        False, description="serve sessions and /v1/info to anyone who can connect, with no secret: for a worker "
                           "only its own machine reaches. Without it, a worker with no secret refuses to start")
    tls_cert_file: Path | None = Field(
        None, description="the worker's TLS certificate, PEM (chain may follow); with tls_key_file the worker "
                          "serves https:// and wss:// only")
    tls_key_file: Path | None = Field(None, description="the certificate's private key, PEM, unencrypted")
    _accepted_secrets: tuple[str, ...] = PrivateAttr(())

    @field_validator("advertise_url")
    @classmethod
    def _advertise_url(cls, url: str | None) -> str | None:
        if url is None or url == "":
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"expected a ws:// or wss:// URL with a host, e.g. ws://10.0.0.7:8765/v1/sessions; got {url!r}")
        if parts.hostname in WILDCARD_HOSTS:
            raise ValueError(f"{parts.hostname} is a listen address, not one others can reach: {url!r}")
        return url

    @field_validator("worker_id")
    @classmethod
    def _worker_id(cls, worker_id: str | None) -> str | None:
        if worker_id is not None and (
            not 0 < len(worker_id) <= 200 or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in worker_id)
        ):
            raise ValueError("must be 1 to 200 characters, no control characters")
        return worker_id

    @field_validator("session_secret", "session_secret_file", "tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _plane(self) -> WorkerSettings:
        accepted: list[str] = []
        if self.session_secret is not None:
            accepted.append(check_secret("session_secret", self.session_secret.get_secret_value()))
        if self.session_secret_file is not None:
            accepted += read_secrets("session_secret_file", self.session_secret_file)
        if accepted and self.insecure_open_sessions:
            raise ValueError("insecure_open_sessions is set with a session secret: choose one (a worker with a "
                             "secret refuses sessions without it)")
        self._accepted_secrets = tuple(dict.fromkeys(accepted))
        check_server_tls("tls_cert_file", self.tls_cert_file, "tls_key_file", self.tls_key_file)
        return self

    @property
    def accepted_secrets(self) -> tuple[str, ...]:
        """The shared secrets a session or a /v1/info request may carry; empty: none needed."""
        return self._accepted_secrets

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    def open_plane_problem(self) -> str | None:
        """Why this worker must not serve as configured (no secret, and not opened on purpose), or None."""
        if self._accepted_secrets or self.insecure_open_sessions:
            return None
        return ("the worker has no session secret, so anyone who can reach it could take its slots and hear its "
                "calls: set session_secret_file (or PERSONAGATE_WORKER_SESSION_SECRET) to the gateways' "
                "worker_secret, or, for a worker nothing else can reach, insecure_open_sessions "
                "(--insecure-open-sessions). 'personagate up' sets one up by itself")

    @model_validator(mode="after")
    def _weights_for_personaplex(self) -> WorkerSettings:
        if self.model == "personaplex" and self.weights is None:
            raise ValueError("model 'personaplex' needs weights: the checkpoint folder (--weights DIR)")
        if self.model != "personaplex" and self.weights is not None:
            raise ValueError("weights are only used with model 'personaplex'")
        return self

    @model_validator(mode="after")
    def _registration(self) -> WorkerSettings:
        if self.worker_ttl_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(
                f"worker_ttl_seconds ({self.worker_ttl_seconds:g}) must be at least twice heartbeat_seconds "
                f"({self.heartbeat_seconds:g}), or one late heartbeat makes the worker look dead")
        if self.redis_url is not None and self.advertise_url is None:
            if self.host in WILDCARD_HOSTS:
                raise ValueError(
                    f"advertise_url is needed with redis_url when host is {self.host!r} (a listen address): "
                    "the ws:// URL gateways reach this worker at, e.g. ws://10.0.0.7:8765/v1/sessions")
            if self.port == 0:
                raise ValueError("advertise_url is needed with redis_url when port is 0 (chosen at start)")
        return self

    def resolved_advertise_url(self) -> str:
        """The ws URL of this worker's sessions as gateways reach it."""
        if self.advertise_url is not None:
            return self.advertise_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls_enabled else 'ws'}://{host}:{self.port}/v1/sessions"

    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}:{self.port}"

    def resolved_slots(self, device: str) -> int:
        """Slots per worker: 32 calls on a GPU (PersonaPlex on an H100); on a CPU, 8 tiny-model calls
        keep real time on 2 cores, while a CPU PersonaPlex cannot keep even one. The echo model costs
        nothing per step: 128, so that the gateway, not the worker, is what a benchmark finds the limit of."""
        if self.slots is not None:
            return self.slots
        if self.model == "echo":
            return 128
        if device.startswith("cuda"):
            return 32
        return 8 if self.model == "tiny" else 1


def load_worker_settings(config_file: Path | None = None, **overrides: Any) -> WorkerSettings:
    """Settings from ``config_file`` < environment < ``overrides``; SettingsError lists every problem."""
    return load_settings(WorkerSettings, "worker", config_file, **overrides)
