"""The tenant's concurrent-call limit over SIP, end to end: a two-slot echo worker, a gateway, and a tenant
allowed one call at a time (``limits.max_concurrent_calls: 1``). The worker has room; the tenant does not."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.helpers.caller import CALL_TIMEOUT, call, call_command
from tests.helpers.processes import free_port, serve, udp_free_port
from tests.helpers.stack import OPEN_NUMBER, ROOT, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")

RATE = 16_000


@pytest.fixture(scope="module")
def one_call_tenant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tenants")
    shutil.copytree(ROOT / "tenants" / "harbor-mutual", folder / "harbor-mutual")
    yaml = folder / "harbor-mutual" / "tenant.yaml"
    text, count = re.subn(r"max_concurrent_calls: \d+", "max_concurrent_calls: 1", yaml.read_text())
    assert count == 1
    yaml.write_text(text)
    return folder


@pytest.fixture(scope="module")
def stack(one_call_tenant: Path) -> Iterator[dict[str, str]]:
    env = os.environ | {"NO_TORCH_COMPILE": "1"}
    worker_port, http_port, sip_port = free_port(), free_port(), udp_free_port()
    worker = [sys.executable, "-m", "personagate", "worker", "--model", "echo", "--port", str(worker_port),
              "--slots", "2"]
    gateway = [sys.executable, "-m", "personagate", "gateway", "--port", str(http_port), "--tenants",
               str(one_call_tenant), "--worker", f"http://127.0.0.1:{worker_port}", "--sip-port", str(sip_port)]
    with serve(worker, f"http://127.0.0.1:{worker_port}/readyz", env=env), \
            serve(gateway, f"http://127.0.0.1:{http_port}/readyz", env=env):
        http = f"http://127.0.0.1:{http_port}"
        until(lambda: readyz(http)["slots_free"] == 2, "the gateway sees the worker's two free slots")
        yield {"sip": f"127.0.0.1:{sip_port}", "http": http}


def test_a_tenant_at_its_limit_gets_486_and_the_live_call_keeps_its_audio(stack: dict[str, str],
                                                                           tmp_path: Path) -> None:
    """A tenant allowed one call at a time: while its first call is live, a second caller hears 486 Busy
    Here at once (the worker has a free slot: it is the tenant's limit, not capacity, and not 503), the
    first caller's audio goes on without a gap, and once the first call ends the tenant's line answers again."""
    seconds = 4.0
    t = np.arange(int(seconds * RATE)) / RATE
    soundfile.write(tmp_path / "tone.wav", 0.25 * np.sin(2 * np.pi * 800 * t), RATE, subtype="PCM_16")
    first = subprocess.Popen(call_command(stack, OPEN_NUMBER, "--play", str(tmp_path / "tone.wav"),
                                          "--record", str(tmp_path / "first.wav"), "--seconds", str(seconds)),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        until(lambda: readyz(stack["http"])["calls"] == 1, "the first call is up")
        claims_before = _claims(scrape_metrics(stack["http"]))
        assert claims_before >= 1, "the first call's claim is counted"
        busy = call(stack, OPEN_NUMBER, "--seconds", "1")
        assert busy["status"] == 486 and busy["reason"] == "Busy Here" and not busy["answered"], busy
        assert "retry_after" not in busy, busy
        # Counted in the routing store itself: /readyz's slots_free is a snapshot that can lag on a busy machine.
        assert _claims(scrape_metrics(stack["http"])) == claims_before, "the refused call took no slot"
        out, _ = first.communicate(timeout=CALL_TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    report = json.loads(out)
    assert report["status"] == 200 and report["hung_up"] == "caller", report
    assert report["rtp_packets_lost"] == 0, report
    # the echo of the tone, 20 ms window by 20 ms window, from its first arrival to 0.3 s before the end
    recorded, _ = soundfile.read(tmp_path / "first.wav")
    window = RATE // 50
    levels = np.sqrt(np.mean(recorded[:len(recorded) // window * window].reshape(-1, window) ** 2, axis=1))
    start = int(np.argmax(levels > 0.1))
    steady = levels[start + 1:int((seconds - 0.3) * 50)]
    assert len(steady) > 120, (start, len(levels))
    assert steady.min() > 0.1, ("a gap in the first call's audio", np.round(steady, 3).tolist())
    # the first call's BYE released the tenant's only call: the next one is answered
    until(lambda: readyz(stack["http"])["calls"] == 0, "the first call is over")
    again = call(stack, OPEN_NUMBER, "--seconds", "1")
    assert again["status"] == 200 and again["answered"], again
    metrics = scrape_metrics(stack["http"])
    assert metrics['personagate_gateway_sip_invites_total{answer="486"}'] == 1
    assert metrics['personagate_gateway_sip_invites_total{answer="200"}'] == 2


def _claims(metrics: dict[str, float]) -> float:
    """Slots the routing store has reserved (a refusal, such as the tenant's limit, is counted apart)."""
    return metrics.get('personagate_routing_claims_total{result="claimed"}', 0.0)
