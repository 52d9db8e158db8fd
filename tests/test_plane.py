"""The internal plane (personagate_common/plane.py): a worker serves sessions and ``/v1/info`` only to gateways
holding its shared secret, over TLS when it has a certificate; the gateway's HTTP listener can serve TLS, and the
admin API can listen on a port of its own so that the public port never carries it."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from agent_runtime.config import SettingsError, load_worker_settings
from gateway.admin.tokens import new_token
from gateway.calls import Calls
from gateway.config import GatewaySettings, load_gateway_settings
from gateway.worker_client import UNAUTHORIZED, AgentAudio, WorkerRefused, WorkerSession, persona_message
from personagate_common.plane import SecretChecker, WorkerAuth, bearer, new_secret
from tests.helpers.calls import ACME, Caller, route, running
from tests.helpers.processes import free_port, serve
from tests.helpers.tls import ServerCertificate, make_server_certificate
from tests.helpers.worker import TEST_WORKER_SECRET, WORKER_AUTH, WORKER_AUTH_HEADERS

REPO = Path(__file__).resolve().parents[1]
FRAME_BYTES = 3840
PERSONA = persona_message("You are a claims agent.", voice="tiny-low")


def _sample(metrics: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text page (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in metrics.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[1])
    return 0.0


def _env_without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "SECRET" not in k and "OPEN_SESSIONS" not in k}


# ------------------------------------------------------------------ credentials (the tests' shared tiny worker)


async def _refused_upgrades(worker: str) -> None:
    """Upgrades with no credential, no bearer scheme and a wrong secret, then a gateway's with none: each 401."""
    for headers in ({}, bearer("not-the-secret-but-long-enough"), {"Authorization": TEST_WORKER_SECRET}):
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://{worker}/v1/sessions", additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 401
        assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(WorkerRefused) as refused_session:  # what a gateway without the secret sees
        await WorkerSession.open(f"ws://{worker}/v1/sessions", PERSONA)
    assert refused_session.value.code == UNAUTHORIZED and "none was sent" in refused_session.value.reason


async def test_a_session_without_the_secret_or_with_a_wrong_one_is_refused_before_it_takes_a_slot(worker):
    """Anything on the network that reaches a worker without the gateways' secret gets 401 on the upgrade: it
    cannot take a slot (free slots unchanged), and each refusal is counted by reason."""
    async with httpx.AsyncClient(base_url=f"http://{worker}", timeout=10) as http:
        before = (await http.get("/metrics")).text
        free = (await http.get("/readyz")).json()["free_slots"]
        await _refused_upgrades(worker)
        assert (await http.get("/readyz")).json()["free_slots"] == free
        after = (await http.get("/metrics")).text
    name = "personagate_worker_unauthorized_requests_total"
    assert _sample(after, name, endpoint="sessions", reason="missing") \
        - _sample(before, name, endpoint="sessions", reason="missing") == 3  # no header, no scheme, the session
    assert _sample(after, name, endpoint="sessions", reason="wrong") \
        - _sample(before, name, endpoint="sessions", reason="wrong") == 1
    refused_total = "personagate_worker_sessions_refused_total"
    assert _sample(after, refused_total, reason="unauthorized") \
        - _sample(before, refused_total, reason="unauthorized") == 4
    # With the secret, the same worker serves the session.
    async with await WorkerSession.open(f"ws://{worker}/v1/sessions", PERSONA, auth=WORKER_AUTH) as session:
        await session.end()


def test_info_needs_the_secret_while_the_probes_and_metrics_stay_open(worker):
    """/v1/info names the calls in progress: 401 without the secret or with a wrong one. Kubernetes' probes
    and Prometheus need none, and the readiness probe tells nothing about calls."""
    base = f"http://{worker}"
    assert httpx.get(f"{base}/v1/info").status_code == 401
    wrong = httpx.get(f"{base}/v1/info", headers=bearer("x" * 40))
    assert wrong.status_code == 401 and "active_sessions" not in wrong.text
    assert "slots" in httpx.get(f"{base}/v1/info", headers=WORKER_AUTH_HEADERS).json()
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and set(ready.json()) <= {"ready", "free_slots", "reason"}
    assert httpx.get(f"{base}/healthz").status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    assert _sample(metrics, "personagate_worker_unauthorized_requests_total", endpoint="info", reason="wrong") >= 1


async def test_a_gateway_without_the_secret_finds_no_worker_and_says_why(worker, registry,
                                                                         caplog: pytest.LogCaptureFixture):
    """A gateway started without the workers' secret (a deployment mistake) routes no call to them, and its log
    says what to set instead of leaving the operator with 'no capacity'."""
    settings = GatewaySettings(tenants_dir=Path(registry.root), workers=[f"http://{worker}"], worker_secret="")
    assert settings.worker_auth().secret is None
    with caplog.at_level(logging.WARNING, logger="gateway.calls"):
        async with Calls.from_settings(settings, registry) as calls:
            assert not [w for w in await calls.router.workers() if w.alive]
    assert any("needs a shared secret (401)" in r.getMessage() and "worker_secret" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.e2e  # starts a process
def test_a_worker_with_no_secret_refuses_to_start_unless_opened_on_purpose(monkeypatch: pytest.MonkeyPatch):
    """A production worker cannot be open by accident: with no secret it exits 2 saying what to set."""
    done = subprocess.run([sys.executable, "-m", "personagate", "worker", "--port", "0"], env=_env_without_secrets(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "session_secret_file" in done.stderr and "--insecure-open-sessions" in done.stderr
    monkeypatch.delenv("PERSONAGATE_WORKER_SESSION_SECRET")
    assert load_worker_settings().open_plane_problem() is not None
    assert load_worker_settings(insecure_open_sessions=True).open_plane_problem() is None


def test_secret_settings_are_checked_at_start(tmp_path: Path):
    """Secrets too short to be one, a secrets file with none, two secrets for one gateway, and half a TLS pair
    are settings errors; a worker's secrets file may hold several (a rotation) and all of them are accepted."""
    rotation = tmp_path / "secrets"
    old, new = new_secret(), new_secret()
    rotation.write_text(f"# the new secret first, the old one until every gateway has the new\n{new}\n\n{old}\n")
    settings = load_worker_settings(session_secret_file=rotation)
    assert set(settings.accepted_secrets) == {TEST_WORKER_SECRET, new, old}  # beside the environment's
    checker = SecretChecker(settings.accepted_secrets)
    assert checker.check({"authorization": f"Bearer {old}"}) == "ok"
    assert checker.check({"authorization": f"bearer {new}"}) == "ok"
    assert checker.check({"authorization": f"Bearer {old[:-1]}"}) == "wrong"
    assert checker.check({"authorization": f"Basic {old}"}) == "missing"
    assert checker.check({}) == "missing"
    assert load_gateway_settings(worker_secret="", worker_secret_file=rotation).worker_auth().secret == new
    assert new not in repr(load_gateway_settings(worker_secret="", worker_secret_file=rotation).worker_auth())
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    for bad, message in (
        ({"session_secret": "short"}, "at least 16 characters"),
        ({"session_secret_file": empty}, "no secret in it"),
        ({"session_secret_file": tmp_path / "missing"}, "no such file"),
        ({"insecure_open_sessions": True}, "choose one"),
        ({"tls_cert_file": rotation}, "tls_key_file is not"),
    ):
        with pytest.raises(SettingsError, match=message):
            load_worker_settings(**bad)
    with pytest.raises(SettingsError, match="both set"):
        load_gateway_settings(worker_secret_file=rotation)  # beside the environment's worker_secret
    with pytest.raises(SettingsError, match="admin_port .* is http_port"):
        load_gateway_settings(http_port=8080, admin_port=8080)


# ------------------------------------------------------------------ TLS: an echo worker with its own certificate


@dataclass(frozen=True)
class TlsWorker:
    address: str  # 127.0.0.1:PORT
    certificate: ServerCertificate
    secrets: tuple[str, str]  # the worker accepts both (a rotation in progress)


@pytest.fixture(scope="module")
def tls_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsWorker]:
    """An echo worker serving only https:// and wss:// with a certificate from a CA of the test's own, accepting
    two secrets from a file (and none from the environment)."""
    folder = tmp_path_factory.mktemp("tls-worker")
    certificate = make_server_certificate(folder, "worker")
    secrets = (new_secret(), new_secret())
    (folder / "secrets").write_text("\n".join(secrets) + "\n")
    port = free_port()
    env = _env_without_secrets() | {
        "NO_TORCH_COMPILE": "1", "PERSONAGATE_WORKER_SESSION_SECRET_FILE": str(folder / "secrets"),
        "PERSONAGATE_WORKER_TLS_CERT_FILE": str(certificate.cert_file),
        "PERSONAGATE_WORKER_TLS_KEY_FILE": str(certificate.key_file)}
    command = [sys.executable, "-m", "personagate", "worker", "--model", "echo", "--port", str(port)]
    verify = ssl.create_default_context(cafile=certificate.ca_file)
    with serve(command, f"https://127.0.0.1:{port}/readyz", env=env, verify=verify):
        yield TlsWorker(f"127.0.0.1:{port}", certificate, secrets)


async def test_a_session_over_wss_with_the_gateways_ca_echoes_end_to_end(tls_worker: TlsWorker):
    """A gateway that trusts the worker's CA and holds either secret of a rotation talks to it over wss://; one
    that does not trust the CA, or speaks plain ws://, does not get a session."""
    url = f"wss://{tls_worker.address}/v1/sessions"
    frames = [bytes([n]) * FRAME_BYTES for n in range(1, 6)]
    for secret in tls_worker.secrets:
        auth = WorkerAuth(secret=secret, ca_file=tls_worker.certificate.ca_file)
        async with await WorkerSession.open(url, PERSONA, auth=auth) as session:
            for frame in frames:  # in real time: the worker sheds a backlog of stale frames
                await session.send(frame)
                await asyncio.sleep(0.08)
            await asyncio.sleep(0.5)
            await session.end()
            echoed = [e.pcm for e in [e async for e in session.events()] if isinstance(e, AgentAudio)]
        ours = [pcm for pcm in echoed if pcm in frames]
        assert ours and ours == sorted(ours), "the caller's audio did not come back, in order"
    with pytest.raises(ssl.SSLCertVerificationError):  # the system's CAs do not vouch for it
        await WorkerSession.open(url, PERSONA, auth=WorkerAuth(secret=tls_worker.secrets[0]))
    with pytest.raises(Exception):  # noqa: B017 - plain ws:// to a TLS port fails, however the server says it
        await WorkerSession.open(f"ws://{tls_worker.address}/v1/sessions", PERSONA, auth=WORKER_AUTH)


async def test_the_gateway_polls_an_https_worker_and_a_call_runs_over_wss(tls_worker: TlsWorker, registry):
    """Embedded routing against a TLS worker: the gateway reads /v1/info over https with its CA file and its
    secret, and a call's session runs over wss:// with the caller's audio coming back."""
    settings = GatewaySettings(tenants_dir=Path(registry.root), workers=[f"https://{tls_worker.address}"],
                               worker_secret=tls_worker.secrets[1],
                               worker_tls_ca_file=tls_worker.certificate.ca_file)
    calls = Calls.from_settings(settings, registry)
    async with running(calls, 1):
        (worker,) = [w for w in await calls.router.workers() if w.alive]
        assert worker.url == f"wss://{tls_worker.address}/v1/sessions"
        call = await calls.start("call-over-wss", *route(registry, ACME))
        caller = Caller(call)
        deadline = asyncio.get_running_loop().time() + 20
        while caller.frames_since(0, filler=False) < 5:
            assert asyncio.get_running_loop().time() < deadline, "no agent audio over wss"
            await asyncio.sleep(0.1)
        assert await caller.hang_up() == "hangup"


# ------------------------------------------------------------------ the gateway's listeners


def test_the_gateway_serves_https_and_the_admin_api_only_on_its_own_port(tmp_path: Path, tls_worker: TlsWorker):
    """With a certificate the gateway's HTTP listener speaks TLS (probes included); with admin_port the admin API
    and its docs are served there and are 404 on the public port, where browser signalling stays."""
    certificate = make_server_certificate(tmp_path / "certs", "gateway")
    token, line = new_token()
    tokens = tmp_path / "admin-tokens.yaml"
    tokens.write_text(f"operator:\n  - {line}\n")
    http_port, admin_port = free_port(), free_port()
    env = _env_without_secrets() | {
        "PERSONAGATE_GATEWAY_HTTP_TLS_CERT_FILE": str(certificate.cert_file),
        "PERSONAGATE_GATEWAY_HTTP_TLS_KEY_FILE": str(certificate.key_file),
        "PERSONAGATE_GATEWAY_WORKER_SECRET": tls_worker.secrets[0],
        "PERSONAGATE_GATEWAY_WORKER_TLS_CA_FILE": str(tls_worker.certificate.ca_file)}
    command = [sys.executable, "-m", "personagate", "gateway", "--port", str(http_port), "--admin-port",
               str(admin_port), "--tenants", str(REPO / "tenants"), "--admin-tokens", str(tokens),
               "--worker", f"https://{tls_worker.address}"]
    verify = ssl.create_default_context(cafile=certificate.ca_file)
    public, admin = f"https://127.0.0.1:{http_port}", f"https://127.0.0.1:{admin_port}"
    with serve(command, f"{public}/healthz", env=env, verify=verify):
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(verify=verify, timeout=10) as http:
            assert http.get(f"{admin}/v1/admin/tenants", headers=auth).status_code == 200
            assert http.get(f"{admin}/docs").status_code == 200
            assert http.get(f"{admin}/healthz").status_code == 200
            for path in ("/v1/admin/tenants", "/docs", "/openapi.json"):
                assert http.get(f"{public}{path}", headers=auth).status_code == 404, path
            personas = http.get(f"{public}/v1/webrtc/personas")
            assert personas.status_code == 200, personas.text  # browser signalling stays on the public port
            # The gateway reads the https worker's /v1/info with its CA file and its secret.
            deadline = time.monotonic() + 30
            while (ready := http.get(f"{public}/readyz").json()).get("workers_alive") != 1:
                assert time.monotonic() < deadline, ready
                time.sleep(0.2)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5)  # no plain HTTP beside TLS
