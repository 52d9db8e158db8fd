"""The SIP test stack: a real `personagate worker` (the echo model) and a real `personagate gateway` answering SIP
on loopback, the tenants they serve, and readers of the gateway's /readyz and /metrics.

    with echo_stack(sip_tenants(folder)) as (addresses, worker_proc, gateway_proc):
        until(lambda: readyz(addresses["http"])["calls"] == 0, "the gateway has no call")
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from tests.helpers.processes import free_port, serve, udp_free_port
from tests.helpers.wait import until

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
OPEN_NUMBER = "+14155550186"  # harbor-mutual's catastrophe line: answered at any hour
CLOSED_NUMBER = "+442079460318"  # northwind-bank, whose hours (in sip_tenants' copy) are always closed


def sip_tenants(folder: Path) -> Path:
    """The shipped harbor-mutual and northwind-bank tenants copied into ``folder``, northwind-bank's hours always
    closed; ``folder``."""
    shutil.copytree(ROOT / "tenants" / "harbor-mutual", folder / "harbor-mutual")
    shutil.copytree(ROOT / "tenants" / "northwind-bank", folder / "northwind-bank")
    yaml = folder / "northwind-bank" / "tenant.yaml"
    text = re.sub(r'"\d\d:\d\d-\d\d:\d\d"', "closed", yaml.read_text())
    yaml.write_text(text)
    return folder


def escalating_tenant(folder: Path) -> dict[str, str]:
    """The shipped harbor-mutual tenant in ``folder``, escalating (digit 0) to a free loopback port where a test
    may run sipp as the human; the target's URI and port."""
    shutil.copytree(ROOT / "tenants" / "harbor-mutual", folder / "harbor-mutual")
    target_port = udp_free_port()
    target = f"sip:humans@127.0.0.1:{target_port}"
    yaml = folder / "harbor-mutual" / "tenant.yaml"
    text, n = re.subn(r"transfer_to: \S+", f"transfer_to: {target}", yaml.read_text())
    assert n == 1
    yaml.write_text(text)
    return {"target": target, "target_port": str(target_port)}


@contextlib.contextmanager
def echo_stack(tenants: Path, env: dict[str, str] | None = None, *, gateway_first: bool = False, slots: int = 1,
               worker_args: Sequence[str] = ("--model", "echo"), worker_command: list[str] | None = None,
               sip_port: int | None = None) -> Iterator[tuple[dict[str, str], subprocess.Popen, subprocess.Popen]]:
    """A one-slot (or ``slots``) echo worker and a gateway with SIP on a free UDP port, both real processes; yields
    their addresses ({"sip", "port", "http", "worker"}), the worker process and the gateway process
    once the gateway sees the worker's free slots. ``worker_args`` pick another model (``()``: the tiny one);
    ``worker_command`` runs another worker altogether (its port appended; ``slots`` is then what it has)."""
    env = os.environ | {"NO_TORCH_COMPILE": "1"} | (env or {})
    worker_port, http_port, sip_port = free_port(), free_port(), sip_port or udp_free_port()
    command = [*worker_command, str(worker_port)] if worker_command is not None else \
        [sys.executable, "-m", "personagate", "worker", *worker_args, "--port", str(worker_port), "--slots", str(slots)]
    worker = serve(command, f"http://127.0.0.1:{worker_port}/readyz", env=env)
    gateway = serve([sys.executable, "-m", "personagate", "gateway", "--port", str(http_port), "--tenants",
                     str(tenants), "--worker", f"http://127.0.0.1:{worker_port}", "--sip-port", str(sip_port)],
                    f"http://127.0.0.1:{http_port}/readyz", env=env)
    with contextlib.ExitStack() as started:
        procs = [started.enter_context(cm) for cm in ((gateway, worker) if gateway_first else (worker, gateway))]
        worker_proc, gateway_proc = procs[::-1] if gateway_first else procs
        http = f"http://127.0.0.1:{http_port}"
        until(lambda: readyz(http)["slots_free"] == slots, "the gateway sees the worker's free slots")
        yield ({"sip": f"127.0.0.1:{sip_port}", "port": str(sip_port), "http": http,
                "worker": f"http://127.0.0.1:{worker_port}"}, worker_proc, gateway_proc)


def readyz(http: str) -> dict:
    """The gateway's (or worker's) /readyz at the base URL ``http``, as JSON."""
    return httpx.get(f"{http}/readyz", timeout=5).json()


def scrape_metrics(http: str) -> dict[str, float]:
    """Every sample of /metrics at the base URL ``http``, by its name with labels (``name{label="v"}``)."""
    samples = {}
    for line in httpx.get(f"{http}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
