"""Trusted proxies (``forwarded_allow_ips``) as browsers behind an Ingress live them: a real `personagate gateway`
whose setting trusts one loopback address (127.0.0.2, standing for the Ingress controller), spoken to from that
address and from another (127.0.0.3, a peer that is not a proxy). Linux routes all of 127.0.0.0/8 to loopback, so a
client can pick its source address there.

What it protects: behind a trusted proxy each browser is its own client (the anonymous offer rate limit counts it
alone, and the gateway's log names it), instead of every browser sharing the proxy's one limit; a peer that is not a
trusted proxy cannot escape its limit by writing X-Forwarded-For itself. No worker is needed: the offer rate limit is
the first check an offer meets, so a body that is not SDP shows it (415 when let through, 429 when limited).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.logs import read_log
from tests.helpers.processes import free_port, serve
from tests.helpers.webrtc import PUBLIC, tenant_copy

pytestmark = pytest.mark.e2e  # a gateway process of its own

PROXY = "127.0.0.2"  # trusted: forwarded_allow_ips
STRANGER = "127.0.0.3"  # any other peer


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    """A gateway trusting X-Forwarded-For from PROXY only, one offer per client per minute; its URL and process."""
    folder = tmp_path_factory.mktemp("proxies")
    tenants = tenant_copy(folder / "tenants")
    port = free_port()
    env = os.environ | {"PERSONAGATE_GATEWAY_FORWARDED_ALLOW_IPS": json.dumps([PROXY]),
                        "PERSONAGATE_GATEWAY_WEBRTC_OFFERS_PER_MINUTE": "1",
                        "PERSONAGATE_GATEWAY_WORKERS": json.dumps([f"http://127.0.0.1:{free_port()}"])}  # none there
    with serve([sys.executable, "-m", "personagate", "gateway", "--port", str(port), "--tenants", str(tenants)],
               f"http://127.0.0.1:{port}/readyz", env=env) as proc:
        yield f"http://127.0.0.1:{port}", proc


def offer(base: str, source: str, forwarded_for: str | None) -> httpx.Response:
    """An anonymous browser offer (not SDP: only the rate limit's verdict matters) sent from ``source``."""
    headers = {"Content-Type": "text/plain"} | ({"X-Forwarded-For": forwarded_for} if forwarded_for else {})
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=base, transport=transport, timeout=10) as client:
        return client.post(f"/v1/webrtc/calls/{PUBLIC[0]}/{PUBLIC[1]}", content=b"not sdp", headers=headers)


def access_log_clients(proc: object) -> set[str]:
    """The client addresses of the gateway's access log lines for offers (its JSON log: ``"msg": "HOST:PORT - ..."``)."""
    clients = set()
    for line in read_log(proc).splitlines():  # type: ignore[arg-type]
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("logger") == "uvicorn.access" and "/v1/webrtc/calls/" in entry.get("msg", ""):
                clients.add(entry["msg"].split(" ", 1)[0].rsplit(":", 1)[0])
    return clients


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_offer_limit(gateway):
    base, proc = gateway
    assert offer(base, PROXY, "203.0.113.7").status_code == 415  # let through: this client's one offer
    limited = offer(base, PROXY, "203.0.113.7")
    assert limited.status_code == 429 and "203.0.113.7" in limited.json()["detail"], limited.text
    assert "retry-after" in limited.headers
    # another browser behind the same proxy is not held back by the first one's limit
    assert offer(base, PROXY, "203.0.113.8").status_code == 415
    # a proxy chain: the client is the last address no trusted proxy added
    assert offer(base, PROXY, "198.51.100.99, 203.0.113.9").status_code == 415
    clients = access_log_clients(proc)
    assert {"203.0.113.7", "203.0.113.8", "203.0.113.9"} <= clients and PROXY not in clients, clients


def test_an_untrusted_peer_is_its_own_client_whatever_x_forwarded_for_says(gateway):
    base, proc = gateway
    assert offer(base, STRANGER, "192.0.2.1").status_code == 415
    limited = offer(base, STRANGER, "192.0.2.2")  # a new forwarded address does not buy a new limit
    assert limited.status_code == 429 and STRANGER in limited.json()["detail"], limited.text
    clients = access_log_clients(proc)
    assert STRANGER in clients and not any(c.startswith("192.0.2.") for c in clients), clients

