"""REGISTER to a PBX or carrier (``sip_registrations``), against real peers on loopback: sipp as the registrar
(it challenges with 401 and checks the digest with ``verifyauth``), a real `personagate gateway` and a one-slot
echo worker. The registrar then calls the registered Contact, as a carrier does, and the call reaches the echo
agent through the same admission and routing as any INVITE."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.processes import udp_free_port
from tests.helpers.programs import needs
from tests.helpers.sipp import SCENARIOS
from tests.helpers.stack import OPEN_NUMBER, echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")
pytestmark = needs("sipp")

GRANTED_SECONDS = 10  # the expiry tests/sipp/registrar_accepting.xml grants: pjsua refreshes every few seconds


def start_registrar(tmp_path: Path, scenario: str, username: str, password: str, calls: int = 1
                    ) -> tuple[subprocess.Popen, int]:
    """sipp running tests/sipp/``scenario`` as a registrar expecting ``username`` and ``password`` for ``calls``
    sipp calls, on a free loopback port; the process and its port."""
    port = udp_free_port()
    proc = subprocess.Popen(
        ["sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port), "-mp", str(udp_free_port()),
         "-m", str(calls), "-key", "username", username, "-key", "password", password,
         "-timeout", "80", "-timeout_error", "-nostdin", "-trace_err", "-trace_msg"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


def _sipp_result(proc: subprocess.Popen, workdir: Path) -> tuple[int, str]:
    """sipp's exit status, and the end of its output and error log (written in ``workdir``)."""
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    errors = "".join(p.read_text(errors="replace") for p in workdir.glob("*_errors.log"))
    return proc.returncode, (out or "")[-2000:] + errors[-3000:]


def test_gateway_registers_answers_the_registrars_call_and_unregisters(tenants: Path, tmp_path: Path) -> None:
    """A trunk that needs REGISTER: the gateway answers the registrar's 401 with the right digest (verified by
    the registrar) and shows itself registered (``personagate_gateway_sip_registered`` 1); the carrier's INVITE
    to the registered Contact (the DID as its user) is answered by the tenant's agent (180/183/200, echo
    stack); pjsua refreshes the binding before the (short) expiry the registrar granted; on stop the gateway
    unregisters (Expires: 0). A second binding with a wrong password is refused 403,
    shows 0, and is tried again after ``refused_retry_seconds`` (pjsua itself would give up)."""
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good, good_port = start_registrar(tmp_path / "good", "registrar_accepting.xml", "gw-user", "s3cret")
    bad, bad_port = start_registrar(tmp_path / "bad", "registrar_refusing.xml", "gw-other", "right-one", calls=2)
    registrations = [
        {"registrar": f"sip:127.0.0.1:{good_port}", "username": "gw-user", "password": "s3cret",
         "contact_user": OPEN_NUMBER, "expiry_seconds": 300},
        {"registrar": f"sip:127.0.0.1:{bad_port}", "username": "gw-other", "password": "not-the-right-one",
         "refused_retry_seconds": 5},
    ]
    good_name, bad_name = f"gw-user@127.0.0.1:{good_port}", f"gw-other@127.0.0.1:{bad_port}"
    try:
        with echo_stack(tenants, {"PERSONAGATE_GATEWAY_SIP_REGISTRATIONS": json.dumps(registrations)}) as (stack, _, _):
            registered = f'personagate_gateway_sip_registered{{registration="{good_name}"}}'
            until(lambda: scrape_metrics(stack["http"]).get(registered) == 1, "the gateway is registered")
            answered = 'personagate_gateway_sip_invites_total{answer="200"}'
            until(lambda: scrape_metrics(stack["http"]).get(answered, 0) == 1, "the registrar's call is answered")
            until(lambda: readyz(stack["http"])["calls"] == 0, "the registrar's call is over")
            began = time.monotonic()
            failed = f'personagate_gateway_sip_registrations_total{{registration="{bad_name}",result="failed"}}'
            until(lambda: scrape_metrics(stack["http"]).get(failed, 0) >= 2, "the refused binding is retried",
                  timeout=20)
            refreshed = f'personagate_gateway_sip_registrations_total{{registration="{good_name}",result="ok"}}'
            until(lambda: scrape_metrics(stack["http"]).get(refreshed, 0) >= 2,
                  "the binding is refreshed before it expires", timeout=GRANTED_SECONDS)
            metrics = scrape_metrics(stack["http"])
            assert metrics[f'personagate_gateway_sip_registered{{registration="{bad_name}"}}'] == 0
            assert metrics[registered] == 1
            assert time.monotonic() - began < 15
            bad_rc, bad_log = _sipp_result(bad, tmp_path / "bad")
            assert bad_rc == 0, bad_log
        good_rc, good_log = _sipp_result(good, tmp_path / "good")  # the unregistration came as the gateway stopped
        assert good_rc == 0, good_log
    finally:
        for proc in (good, bad):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
