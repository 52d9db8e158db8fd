"""A gateway's or worker's pod carries its calls in progress as controller.kubernetes.io/pod-deletion-cost, so that a
scale-in deletes the idlest pod first (``personagate_common.kube``). The API server here is a small HTTP server in
this process that records the requests (no cluster is available to the tests): it checks what is sent and how
often, and that a failing API server never stops the process."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from personagate_common.kube import ANNOTATION, PodDeletionCost, PodDeletionCostError, PodRef
from tests.helpers.wait import scaled, until_async


class ApiServer(http.server.ThreadingHTTPServer):
    """Records each PATCH (path, headers, body); answers ``status``."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, str], dict[str, object]]] = []
        self.status = 200
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.patches.append((self.path, dict(self.headers), body))
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def values(self) -> list[str]:
        return [body["metadata"]["annotations"][ANNOTATION] for _, _, body in self.patches]  # type: ignore[index]


@pytest.fixture
def api() -> Iterator[ApiServer]:
    server = ApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def pod(api: ApiServer, tmp_path: Path) -> PodRef:
    token = tmp_path / "token"
    token.write_text("token-1\n")
    return PodRef(api=f"http://127.0.0.1:{api.server_address[1]}", namespace="personagate", name="worker-abc",
                  token_file=token, ca_file=None)


@contextlib.asynccontextmanager
async def running(updater: PodDeletionCost):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(updater.run())
    try:
        yield updater
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_pod_carries_its_calls_as_its_deletion_cost_written_at_start_and_on_change(api, tmp_path):
    """At start the pod says 0; when calls come and go it says how many, as a merge patch of that one annotation on
    its own pod, with the service account's token (re-read each time: projected tokens rotate)."""
    calls = [0]
    registry = CollectorRegistry()
    ref = pod(api, tmp_path)
    updater = PodDeletionCost(ref, lambda: calls[0], registry, min_interval=0.0, check_every=0.02)
    async with running(updater):
        await until_async(lambda: api.values() == ["0"], "the start value", timeout=scaled(5))
        calls[0] = 3
        ref.token_file.write_text("token-2\n")
        await until_async(lambda: api.values() == ["0", "3"], "the new value", timeout=scaled(5))
    path, headers, body = api.patches[-1]
    assert path == "/api/v1/namespaces/personagate/pods/worker-abc"
    assert headers["Content-Type"] == "application/merge-patch+json"
    assert headers["Authorization"] == "Bearer token-2"
    assert body == {"metadata": {"annotations": {ANNOTATION: "3"}}}
    assert registry.get_sample_value("personagate_pod_deletion_cost_updates_total", {"result": "ok"}) == 2


async def test_a_busy_pod_writes_at_most_once_per_interval_and_ends_on_the_latest_value(api, tmp_path):
    """Calls starting and ending every moment do not turn into an API-server write each: one per interval, and the
    last one written is the count when it settles."""
    calls = [0]
    updater = PodDeletionCost(pod(api, tmp_path), lambda: calls[0], CollectorRegistry(), min_interval=0.3,
                              check_every=0.01)
    async with running(updater):
        for n in range(1, 31):  # 30 changes in ~0.6 s
            calls[0] = n
            await asyncio.sleep(0.02)
        await until_async(lambda: api.values()[-1:] == ["30"], "the settled value", timeout=scaled(5))
    assert len(api.patches) <= 1 + 0.6 / 0.3 + 2, api.values()


async def test_an_api_server_that_refuses_never_stops_the_process_and_is_retried(api, tmp_path, caplog):
    """403 (say, the admission policy or RBAC missing) is logged once and counted; the updater goes on and writes the
    value once the API server takes it."""
    api.status = 403
    registry = CollectorRegistry()
    updater = PodDeletionCost(pod(api, tmp_path), lambda: 2, registry, min_interval=0.05, check_every=0.01)
    async with running(updater):
        await until_async(lambda: len(api.patches) >= 3, "retries", timeout=scaled(5))
        api.status = 200
        await until_async(lambda: updater.written == 2, "written once allowed", timeout=scaled(5))
    assert registry.get_sample_value("personagate_pod_deletion_cost_updates_total", {"result": "failed"}) >= 3
    assert [r.message for r in caplog.records].count(
        "pod-deletion-cost not written (HTTP 403); retrying while it fails, the process goes on") == 1


def test_outside_a_pod_the_setting_is_refused_naming_what_is_missing(tmp_path) -> None:
    """pod_deletion_cost on a machine that is not a pod: a clear error at start, not a silent no-op."""
    with pytest.raises(PodDeletionCostError, match="POD_NAME, POD_NAMESPACE, KUBERNETES_SERVICE_HOST, the service "
                                                   "account token"):
        PodRef.in_cluster({}, tmp_path)
    (tmp_path / "token").write_text("t")
    ref = PodRef.in_cluster({"POD_NAME": "gw-1", "POD_NAMESPACE": "pg", "KUBERNETES_SERVICE_HOST": "fd00::1",
                             "KUBERNETES_SERVICE_PORT": "6443"}, tmp_path)
    assert ref.api == "https://[fd00::1]:6443" and ref.ca_file is None and ref.name == "gw-1"
