"""The gateway's RTP port range and public address, with a real SIP peer (sipp) against a real gateway and worker.

A gateway on a Kubernetes node's host network (deploy/k8s) opens only a bounded RTP range in the node's firewall
and must tell callers the node's reachable address, not the one it is bound to: these tests protect what a caller
receives in the 200 OK — ``c=IN IP4 <sip_public_address>``, an ``m=audio`` port inside
``sip_rtp_port``..``sip_rtp_port + sip_rtp_port_range - 1`` (also once the range has wrapped around), and a Contact
at the public address — and that settings which could not hold ``sip_max_calls`` calls are refused at start."""

from __future__ import annotations

import random
import re
import socket
import subprocess
from pathlib import Path

import pytest

from gateway.config import GatewaySettings, SettingsError, load_gateway_settings
from tests.helpers.programs import needs
from tests.helpers.sipp import SCENARIOS, sipp_caller
from tests.helpers.stack import OPEN_NUMBER, echo_stack, readyz
from tests.helpers.wait import until

PUBLIC_ADDRESS = "203.0.113.7"  # TEST-NET-3: no machine here has it, so it can only come from the setting
RANGE = 4  # two calls' RTP/RTCP pairs
SCENARIO = SCENARIOS / "answer_sdp_call.xml"


def _free_even_range(count: int) -> int:
    """The first port of ``count`` consecutive free UDP ports on loopback, even."""
    for _ in range(200):
        base = random.randrange(20_000, 29_990, 2)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free even UDP port range on loopback")


def _answer(sip: str, folder: Path) -> str:
    """One sipp call to the gateway at ``sip``; the 200 OK to its INVITE, as sipp logged it."""
    for old in folder.glob("*_messages.log"):
        old.unlink()
    done = subprocess.run(sipp_caller(SCENARIO, sip, OPEN_NUMBER, extra=("-trace_msg",)), cwd=folder,
                          capture_output=True, text=True, timeout=40, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    log = "\n".join(path.read_text(errors="replace") for path in folder.glob("*_messages.log"))
    answers = [m for m in re.split(r"-{10,}.*\n", log) if re.search(r"^\s*SIP/2\.0 200 OK", m, re.MULTILINE)
               and "application/sdp" in m]
    assert answers, log[-4000:]
    return answers[0]


@needs("sipp")
def test_the_answer_carries_the_public_address_and_a_port_in_the_range(tenants: Path, tmp_path: Path
                                                                       ) -> None:
    base = _free_even_range(RANGE)
    env = {"PERSONAGATE_GATEWAY_SIP_PUBLIC_ADDRESS": PUBLIC_ADDRESS, "PERSONAGATE_GATEWAY_SIP_RTP_PORT": str(base),
           "PERSONAGATE_GATEWAY_SIP_RTP_PORT_RANGE": str(RANGE), "PERSONAGATE_GATEWAY_SIP_MAX_CALLS": "2"}
    with echo_stack(tenants, env) as (stack, _, _):
        ports = []
        for _ in range(3):  # the third call's pair comes from the range again: it wraps, it does not grow
            until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
            answer = _answer(stack["sip"], tmp_path)
            assert re.search(rf"^\s*c=IN IP4 {re.escape(PUBLIC_ADDRESS)}\s*$", answer, re.MULTILINE), answer
            media = re.search(r"^\s*m=audio (\d+) RTP/AVP", answer, re.MULTILINE)
            assert media is not None, answer
            ports.append(int(media.group(1)))
            contact = re.search(r"^\s*Contact:\s*<?sip:[^@>]*@?([^:;>]+)", answer, re.MULTILINE | re.IGNORECASE)
            assert contact is not None and contact.group(1) == PUBLIC_ADDRESS, answer
        assert all(base <= port < base + RANGE and port % 2 == 0 for port in ports), (base, ports)


def test_rtp_port_settings_that_cannot_hold_the_calls_are_refused() -> None:
    assert GatewaySettings(sip_rtp_port=20000, sip_rtp_port_range=512, sip_max_calls=256).sip_rtp_port_range == 512
    refused = {
        "sip_rtp_port_range needs sip_rtp_port": {"sip_rtp_port_range": 100},
        "must be even": {"sip_rtp_port": 20001},
        "holds 50 calls": {"sip_rtp_port": 20000, "sip_rtp_port_range": 100, "sip_max_calls": 256},
        "at least 4 ports": {"sip_rtp_port": 20000, "sip_rtp_port_range": 2, "sip_max_calls": 1},
        "go past 65535": {"sip_rtp_port": 65000, "sip_rtp_port_range": 1000, "sip_max_calls": 4},
        "sip_public_address must be": {"sip_public_address": "0.0.0.0"},
        "must be an IPv4 address or a host name": {"sip_public_address": "2001:db8::5"},
        "each needs at least 4 ports": {"sip_rtp_port": 20000, "sip_rtp_port_range": 8, "sip_max_calls": 4,
                                        "sip_registrations": [{"registrar": f"sip:pbx{i}.example.com", "username": "u",
                                                               "password": "p"} for i in range(2)]},
    }
    for message, settings in refused.items():
        with pytest.raises(SettingsError, match=message):
            load_gateway_settings(**settings)


def test_each_sip_account_walks_its_own_share_of_the_rtp_ports() -> None:
    """pjsua walks RTP ports per account and gives up after 100 busy pairs: the trunks' account and each REGISTER
    binding get an even share of the range, so their calls never collide in it."""
    registrations = [{"registrar": f"sip:pbx{i}.example.com", "username": "u", "password": "p"} for i in range(2)]
    settings = load_gateway_settings(sip_rtp_port=20000, sip_rtp_port_range=1200, sip_max_calls=256,
                                     sip_registrations=registrations)
    assert [settings.rtp_port_share(i) for i in range(3)] == [(20000, 400), (20400, 400), (20800, 400)]
    assert load_gateway_settings(sip_rtp_port=20000, sip_rtp_port_range=512).rtp_port_share(0) == (20000, 512)
