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

from tests.conftest import udp_free_port
from tests.helpers.programs import needs
from tests.helpers.stack import OPEN_NUMBER, echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")
pytestmark = needs("sipp")

REALM = "carrier.test"

_CHALLENGE = """
  <recv request="REGISTER"/>
  <send>
    <![CDATA[
      SIP/2.0 401 Unauthorized
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      WWW-Authenticate: Digest realm="{realm}", nonce="[pid]n[call_number]{round}", qop="auth", algorithm=MD5
      Content-Length: 0
    ]]>
  </send>
  <recv request="REGISTER">
    <action>
      <verifyauth assign_to="authvalid" username="{username}" password="{password}"/>{actions}
    </action>
  </recv>
"""

# The Contact registered, for the call the registrar makes to it.
_CONTACT = """
      <ereg regexp="sip:[^&gt;]*" search_in="hdr" header="Contact:" assign_to="contact"/>"""

_RESPONSE = """
  <send>
    <![CDATA[
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]{extra}
      Content-Length: 0
    ]]>
  </send>
"""

_FAIL = """
  <recv request="NEVER" timeout="200"/>
"""

# A call from the registrar to the Contact it was given, like a carrier's (the Call-ID is the REGISTER's, so
# that sipp keeps the whole exchange in one of its calls; the INVITE is a new dialog all the same).
_CALL = """
  <pause milliseconds="2000"/>
  <send retrans="500">
    <![CDATA[
      INVITE [$contact] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: carrier <sip:carrier@[local_ip]:[local_port]>;tag=[pid]inv[call_number]
      To: <[$contact]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:carrier@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=carrier 1 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rrs="true"/>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: carrier <sip:carrier@[local_ip]:[local_port]>;tag=[pid]inv[call_number]
      To: <[$contact]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <pause milliseconds="1000"/>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: carrier <sip:carrier@[local_ip]:[local_port]>;tag=[pid]inv[call_number]
      To: <[$contact]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200"/>
"""

# Then refreshes (the registrar grants only GRANTED_SECONDS, so pjsua refreshes every few seconds), until the
# gateway stops: REGISTER with Expires: 0 (in the header or the Contact's expires parameter).
GRANTED_SECONDS = 10
_REFRESH_UNTIL_UNREGISTER = """
  <label id="registered"/>
  <recv request="REGISTER" timeout="60000">
    <action>
      <ereg regexp="(Expires: *0[^0-9]|expires=0[^0-9])" search_in="msg" assign_to="unregister"/>
    </action>
  </recv>
""" + _RESPONSE.format(status="200 OK", extra=f"\n      [last_Contact:];expires={GRANTED_SECONDS}") + """
  <nop hide="true" test="unregister" next="unregistered"/>
  <nop hide="true" next="registered"/>
  <label id="unregistered"/>
"""


def _scenario(body: str) -> str:
    return ('<?xml version="1.0" encoding="ISO-8859-1" ?>\n<!DOCTYPE scenario SYSTEM "sipp.dtd">\n'
            f'<scenario name="personagate registrar">{body}</scenario>\n')


def registrar_accepting(username: str, password: str) -> str:
    """Challenge, check the digest (wrong → 403 and the scenario fails), 200 with a short expiry, call the
    Contact, then answer the refreshes until the unregistration."""
    return _scenario(
        _CHALLENGE.format(realm=REALM, round="a", username=username, password=password, actions=_CONTACT)
        + '  <nop hide="true" test="authvalid" next="good"/>\n'
        + _RESPONSE.format(status="403 Forbidden", extra="") + _FAIL
        + '  <label id="good"/>\n'
        + _RESPONSE.format(status="200 OK", extra=f"\n      [last_Contact:];expires={GRANTED_SECONDS}")
        + _CALL + _REFRESH_UNTIL_UNREGISTER)


def registrar_refusing(username: str, password: str) -> str:
    """Challenge, and refuse a wrong digest 403 (a right one fails the scenario). pjsua starts a new Call-ID
    for the gateway's next attempt, so each attempt is one sipp call."""
    return _scenario(_CHALLENGE.format(realm=REALM, round="a", username=username, password=password, actions="")
                     + '  <nop hide="true" test="authvalid" next="valid"/>\n'
                     + _RESPONSE.format(status="403 Forbidden", extra="") + '  <nop hide="true" next="end"/>\n'
                     + '  <label id="valid"/>\n' + _FAIL + '  <label id="end"/>\n')


def start_registrar(tmp_path: Path, name: str, scenario: str, calls: int = 1) -> tuple[subprocess.Popen, int]:
    path = tmp_path / f"{name}.xml"
    path.write_text(scenario)
    port = udp_free_port()
    proc = subprocess.Popen(
        ["sipp", "-sf", str(path), "-i", "127.0.0.1", "-p", str(port), "-mp", str(udp_free_port()), "-m", str(calls),
         "-timeout", "80", "-timeout_error", "-nostdin", "-trace_err", "-trace_msg"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


def _sipp_result(proc: subprocess.Popen, tmp_path: Path, name: str) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    errors = "".join(p.read_text(errors="replace") for p in tmp_path.glob(f"{name}_*_errors.log"))
    return proc.returncode, (out or "")[-2000:] + errors[-3000:]


def test_gateway_registers_answers_the_registrars_call_and_unregisters(tenants: Path, tmp_path: Path) -> None:
    """A trunk that needs REGISTER: the gateway answers the registrar's 401 with the right digest (verified by
    the registrar) and shows itself registered (``personagate_gateway_sip_registered`` 1); the carrier's INVITE
    to the registered Contact (the DID as its user) is answered by the tenant's agent (180/183/200, echo
    stack); pjsua refreshes the binding before the (short) expiry the registrar granted; on stop the gateway
    unregisters (Expires: 0). A second binding with a wrong password is refused 403,
    shows 0, and is tried again after ``refused_retry_seconds`` (pjsua itself would give up)."""
    good, good_port = start_registrar(tmp_path, "good", registrar_accepting("gw-user", "s3cret"))
    bad, bad_port = start_registrar(tmp_path, "bad", registrar_refusing("gw-other", "right-one"), calls=2)
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
            bad_rc, bad_log = _sipp_result(bad, tmp_path, "bad")
            assert bad_rc == 0, bad_log
        good_rc, good_log = _sipp_result(good, tmp_path, "good")  # the unregistration came as the gateway stopped
        assert good_rc == 0, good_log
    finally:
        for proc in (good, bad):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
