"""SIP over TCP and TLS, and SRTP with SDES keys, against peers we did not write: sipp over TCP, and baresip over
TLS with SRTP; `personagate call --transport tls --srtp …` too. The worker is the echo model, so a call's audio
is checked end to end: a 600 Hz tone goes in, the same tone must come back.

sipp is Debian's sip-tester, built without TLS (`-t l1` is refused), so sipp only tests TCP here; TLS is tested
with baresip and `personagate call`.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from personagate_bench.sip import MULAW_DECODE, mulaw_encode
from tests.helpers.caller import call
from tests.helpers.processes import udp_free_port
from tests.helpers.programs import BARESIP_MODULES, needs, path_of
from tests.helpers.sipp import SCENARIOS, sipp_caller
from tests.helpers.stack import OPEN_NUMBER, echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

pytest.importorskip("pjsua2")

TONE_HZ = 600
BARESIP = path_of("baresip")


# ---------------------------------------------------------------------- certificates


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def _signed(folder: Path, name: str, subject: str, ca: str) -> None:
    """``name``.key and ``name``.pem (for 127.0.0.1 and localhost, server and client use) signed by ``ca``; and
    ``name``-bundle.pem, both in one file, as baresip takes a certificate."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=folder)
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                    "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", "ext.cnf", cwd=folder)
    (folder / f"{name}-bundle.pem").write_text((folder / f"{name}.pem").read_text() +
                                              (folder / f"{name}.key").read_text())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA; the gateway's certificate (server) and a trunk's (client) signed by it; a trunk certificate from
    another CA (rogue); generated here with openssl, valid two days from now."""
    folder = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                 f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=personagate test {ca}", cwd=folder)
    _signed(folder, "server", "/CN=localhost", "ca")
    _signed(folder, "client", "/CN=trunk-a", "ca")
    _signed(folder, "rogue", "/CN=rogue", "rogue-ca")
    return folder


def _tls_env(certs: Path, tls_port: int, **more: str) -> dict[str, str]:
    return {"PERSONAGATE_GATEWAY_SIP_TLS_CERT_FILE": str(certs / "server.pem"),
            "PERSONAGATE_GATEWAY_SIP_TLS_KEY_FILE": str(certs / "server.key"),
            "PERSONAGATE_GATEWAY_SIP_TLS_PORT": str(tls_port),
            **{f"PERSONAGATE_GATEWAY_{name.upper()}": value for name, value in more.items()}}


@pytest.fixture(scope="module")
def stack(tenants: Path, certs: Path) -> Iterator[dict[str, str]]:
    """The echo stack with TLS on and the defaults otherwise (sip_srtp optional, SDES only over TLS); calls are cut
    at 5 s, so that the gateway hangs up (BYE) calls that last."""
    tls_port = udp_free_port()
    with echo_stack(tenants, _tls_env(certs, tls_port, sip_max_call_seconds="5")) as (addresses, _, _):
        yield addresses | {"tls": f"127.0.0.1:{tls_port}"}


@pytest.fixture(scope="module")
def strict_stack(tenants: Path, certs: Path) -> Iterator[dict[str, str]]:
    """The echo stack for trunks that require security: SRTP mandatory, mutual TLS (client certificates from the
    test CA), TLS 1.3 only."""
    tls_port = udp_free_port()
    env = _tls_env(certs, tls_port, sip_srtp="mandatory", sip_tls_ca_file=str(certs / "ca.pem"),
                   sip_tls_require_client_cert="true", sip_tls_min_version="1.3")
    with echo_stack(tenants, env) as (addresses, _, _):
        yield addresses | {"tls": f"127.0.0.1:{tls_port}"}


# ---------------------------------------------------------------------- audio


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * TONE_HZ * t)


def tone_seconds(audio: np.ndarray, rate: int) -> float:
    """How much of ``audio`` (floats in [-1, 1]) is the caller's tone come back: 100 ms frames whose strongest
    frequency is within 10 Hz of it, at about the level it was sent (-13.5 dBFS RMS; PCMU and the resamplers cost
    a fraction of a dB). Ringback (440 + 480 Hz) and silence do not count, wherever the answer fell."""
    frame = rate // 10
    count = 0
    for start in range(0, len(audio) - frame + 1, frame):
        piece = audio[start:start + frame]
        spectrum = np.abs(np.fft.rfft(piece * np.hanning(frame)))
        frequency = float(np.fft.rfftfreq(frame, 1 / rate)[int(np.argmax(spectrum))])
        level = 20 * np.log10(max(float(np.sqrt(np.mean(piece**2))), 1e-9))
        count += abs(frequency - TONE_HZ) <= 10 and level > -18
    return count / 10


def assert_tone_came_back(audio: np.ndarray | None, rate: int, what: str, *, at_least: float = 1.0) -> None:
    assert audio is not None, f"{what}: no audio came back"
    heard = tone_seconds(audio, rate)
    assert heard >= at_least, f"{what}: {heard:.1f} s of the tone came back out of {len(audio) / rate:.1f} s heard"


class RtpPeer(threading.Thread):
    """A caller's RTP for sipp, which cannot record what comes back: a socket whose port sipp offers in its SDP.
    The gateway's first packet (ringback, as early media) shows where its RTP comes from; from then on a 4 s PCMU
    tone is sent there every 20 ms, and every packet received is kept."""

    def __init__(self) -> None:
        super().__init__(name="rtp-peer", daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        pcm = np.round(tone(4.0, 8000) * 32767).astype(np.int16)
        self.payload = mulaw_encode(pcm)
        self.received: list[tuple[float, bytes]] = []  # (arrival, PCMU payload)
        self.stopping = threading.Event()

    def run(self) -> None:
        remote, sent, next_at = None, 0, 0.0
        while not self.stopping.is_set():
            wait = 0.02 if remote is None else max(0.0, next_at - time.monotonic())
            if select.select([self.sock], [], [], wait)[0]:
                data, source = self.sock.recvfrom(2048)
                if len(data) > 12 and data[1] & 0x7F == 0:  # PCMU
                    self.received.append((time.monotonic(), data[12:]))
                    if remote is None:
                        remote, next_at = source, time.monotonic()
            if remote is not None and time.monotonic() >= next_at and (sent + 1) * 160 <= len(self.payload):
                header = bytes([0x80, 0]) + (sent & 0xFFFF).to_bytes(2, "big") + (sent * 160).to_bytes(4, "big") + \
                    (0x5E1F).to_bytes(4, "big")
                self.sock.sendto(header + self.payload[sent * 160:(sent + 1) * 160], remote)
                sent += 1
                next_at += 0.02

    def heard(self) -> np.ndarray:
        """Everything that came from the gateway, decoded, as floats."""
        pcm = MULAW_DECODE[np.frombuffer(b"".join(payload for _, payload in self.received), np.uint8)]
        return pcm.astype(np.float64) / 32768

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.sock.close()


# ---------------------------------------------------------------------- baresip


def baresip_call(folder: Path, uri: str, *, mediaenc: str | None, ca_file: Path, certificate: Path | None = None,
                 seconds: int = 8, patience: float = 30) -> tuple[str, np.ndarray | None]:
    """baresip (config in ``folder``) calls ``uri`` playing a 5 s 600 Hz tone from the first early media (it hangs
    up when the tone ends),
    with SRTP by ``mediaenc`` (srtp: offered, RTP/AVP with keys; srtp-mand: required, RTP/SAVP; None: plain RTP),
    checking the gateway's certificate against ``ca_file``, presenting ``certificate`` (certificate and key in one
    PEM) if given; it quits after ``seconds``, or is killed after ``patience`` (a TLS connection refused leaves it
    waiting). Returns its log and what it decoded from the gateway (8 kHz floats; None without a call)."""
    folder.mkdir(parents=True, exist_ok=True)
    soundfile.write(folder / "tone.wav", tone(5.0, 8000), 8000, subtype="PCM_16")
    lines = ["poll_method epoll", "sip_listen 127.0.0.1:0", f"sip_cafile {ca_file}",
             f"audio_source aufile,{folder / 'tone.wav'}", "audio_player aufile,none", "audio_alert aufile,none",
             "audio_srate 8000", "audio_channels 1", f"module_path {BARESIP_MODULES}", "module g711.so",
             "module aufile.so", "module sndfile.so", "module srtp.so", "module_app account.so",
             "module_app menu.so", f"snd_path {folder}"]
    if certificate is not None:
        lines.append(f"sip_certificate {certificate}")
    (folder / "config").write_text("\n".join(lines) + "\n")
    encryption = f";mediaenc={mediaenc}" if mediaenc else ""
    (folder / "accounts").write_text(f"<sip:caller@127.0.0.1>;regint=0{encryption};audio_codecs=PCMU\n")
    assert BARESIP is not None
    proc = subprocess.Popen([BARESIP, "-f", str(folder), "-e", f"/dial {uri}", "-t", str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=patience)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    decoded = sorted(folder.glob("dump-*-dec.wav"))
    audio = soundfile.read(decoded[-1])[0] if decoded else None
    return out, audio


def _calls(stack: dict[str, str], transport: str, srtp: bool) -> float:
    return scrape_metrics(stack["http"]).get(
        f'personagate_gateway_sip_calls_total{{srtp="{str(srtp).lower()}",transport="{transport}"}}', 0.0)


def _tls(stack: dict[str, str]) -> dict[str, str]:
    """The stack as `call` sees it, with the TLS port as the SIP address."""
    return stack | {"sip": stack["tls"]}


# ---------------------------------------------------------------------- TCP


def test_a_request_over_tcp_is_answered_on_its_own_connection(stack: dict[str, str]) -> None:
    """RFC 3261 18.2.2: responses to requests over TCP go back on the same connection. The Via here names a port
    where nothing listens, so a response sent anywhere but on this connection would never arrive."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = closed.getsockname()[1]
    host, port = stack["sip"].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        for cseq in (1, 2):  # and the connection stays usable for the next request
            call_id = uuid.uuid4().hex
            conn.sendall((f"OPTIONS sip:{OPEN_NUMBER}@{stack['sip']};transport=tcp SIP/2.0\r\n"
                          f"Via: SIP/2.0/TCP 127.0.0.1:{nowhere};branch=z9hG4bK{call_id}\r\n"
                          f"From: <sip:probe@127.0.0.1>;tag={cseq}\r\nTo: <sip:{OPEN_NUMBER}@{stack['sip']}>\r\n"
                          f"Call-ID: {call_id}\r\nCSeq: {cseq} OPTIONS\r\nMax-Forwards: 70\r\n"
                          "Content-Length: 0\r\n\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                assert chunk, "the gateway closed the connection"
                data += chunk
            head = data.decode().split("\r\n")
            assert head[0] == "SIP/2.0 200 OK", head
            assert f"Call-ID: {call_id}" in head and any(h.startswith("Via: SIP/2.0/TCP") for h in head), head


@needs("sipp")
def test_sipp_over_tcp_is_answered_echoed_and_hung_up_over_tcp(stack: dict[str, str], tmp_path: Path) -> None:
    """sipp -t t1 (TCP only: it listens for nothing else) calls; the 200 OK's Contact says transport=tcp; a 600 Hz
    tone sent as the caller's RTP comes back from the echo worker; the gateway hangs up at the stack's 5 s limit
    with a BYE that comes over TCP with a Via of SIP/2.0/TCP, both checked by the scenario (tcp_call.xml)."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = _calls(stack, "tcp", False)
    rtp = RtpPeer()
    rtp.start()
    try:
        done = subprocess.run(sipp_caller(SCENARIOS / "tcp_call.xml", stack["sip"], OPEN_NUMBER,
                                          extra=("-t", "t1", "-key", "rtp_port", str(rtp.port), "-trace_msg")),
                              cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    finally:
        rtp.stop()
    trace = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*_messages.log"))
    errors = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*_errors.log"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:] + errors[-3000:] + trace[-4000:]
    assert rtp.received, f"no RTP reached port {rtp.port}: {trace[-6000:]}"
    assert_tone_came_back(rtp.heard(), 8000, "sipp over TCP")
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    assert _calls(stack, "tcp", False) == before + 1


# ---------------------------------------------------------------------- TLS and SRTP


@needs("baresip")
def test_baresip_over_tls_with_srtp_is_echoed(stack: dict[str, str], certs: Path, tmp_path: Path) -> None:
    """baresip offers SRTP (mediaenc srtp: RTP/AVP with SDES keys) over TLS, checking the gateway's certificate
    against the test CA: the call is answered with SRTP (sip_srtp optional), and its tone comes back."""
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    before = _calls(stack, "tls", True)
    out, audio = baresip_call(tmp_path, f"sip:{OPEN_NUMBER}@{stack['tls']};transport=tls", mediaenc="srtp",
                              ca_file=certs / "ca.pem")
    assert "Call established" in out and "SRTP is Enabled" in out, out[-3000:]
    assert_tone_came_back(audio, 8000, f"baresip over TLS with SRTP: {out[-3000:]}")
    until(lambda: readyz(stack["http"])["calls"] == 0, "the call is over")
    assert _calls(stack, "tls", True) == before + 1


def test_personagate_call_over_tls_with_srtp_checks_the_certificate(stack: dict[str, str], certs: Path,
                                                                     tmp_path: Path) -> None:
    """`personagate call --transport tls --ca-file … --srtp mandatory`: answered, SRTP, the tone echoed; the
    report says so. With a CA that did not sign the gateway's certificate, the caller refuses the connection."""
    rate = 16_000
    soundfile.write(tmp_path / "tone.wav", np.concatenate([tone(2.0, rate), np.zeros(rate // 2)]), rate)
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    report = call(_tls(stack), OPEN_NUMBER, "--transport", "tls", "--ca-file", str(certs / "ca.pem"), "--srtp",
                  "mandatory", "--play", str(tmp_path / "tone.wav"), "--seconds", "2.5",
                  "--record", str(tmp_path / "back.wav"))
    assert report["status"] == 200 and report["answered"], report
    assert report["transport"] == "tls" and report["srtp"] is True, report
    back, back_rate = soundfile.read(tmp_path / "back.wav")
    assert_tone_came_back(back, back_rate, "personagate call over TLS")
    refused = call(_tls(stack), OPEN_NUMBER, "--transport", "tls", "--ca-file", str(certs / "rogue-ca.pem"),
                   "--seconds", "1", "--timeout", "10")
    assert not refused["answered"] and "certificate" in refused["reason"], refused


def test_srtp_keys_are_not_exchanged_over_signalling_in_clear(stack: dict[str, str]) -> None:
    """sip_srtp optional, sip_srtp_insecure_signalling false (the defaults): a caller over TCP offering SDES keys
    with RTP/AVP gets plain RTP (the keys would be readable on the path); one offering RTP/SAVP only is refused
    488 (counted with pjsua's other answers). Over TLS the same offer gets SRTP, and one without keys plain RTP."""
    refused_488 = 'personagate_gateway_sip_responses_total{method="INVITE",status="488"}'
    before = scrape_metrics(stack["http"]).get(refused_488, 0)
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    plain = call(stack, OPEN_NUMBER, "--transport", "tcp", "--srtp", "optional", "--seconds", "1")
    assert plain["status"] == 200 and plain["srtp"] is False and plain["transport"] == "tcp", plain
    refused = call(stack, OPEN_NUMBER, "--transport", "tcp", "--srtp", "mandatory", "--seconds", "1")
    assert refused["status"] == 488 and not refused["answered"], refused
    after = scrape_metrics(stack["http"])[refused_488]
    assert after == before + 1
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    secure = call(_tls(stack), OPEN_NUMBER, "--transport", "tls", "--srtp", "optional", "--seconds", "1")
    assert secure["status"] == 200 and secure["srtp"] is True, secure
    until(lambda: readyz(stack["http"])["slots_free"] == 1, "the slot is free")
    no_keys = call(_tls(stack), OPEN_NUMBER, "--transport", "tls", "--seconds", "1")
    assert no_keys["status"] == 200 and no_keys["srtp"] is False, no_keys


@needs("baresip")
def test_mandatory_srtp_and_mutual_tls(strict_stack: dict[str, str], certs: Path, tmp_path: Path) -> None:
    """sip_srtp mandatory with client certificates required: baresip presenting the trunk's certificate and
    requiring SRTP (srtp-mand: RTP/SAVP) is answered with SRTP and echoed; the same trunk offering plain RTP is
    refused 488; a caller without a certificate, or with one from another CA, does not get past TLS; and calls
    over TCP are refused 488 whatever they offer: their keys could not be exchanged safely."""
    uri = f"sip:{OPEN_NUMBER}@{strict_stack['tls']};transport=tls"
    until(lambda: readyz(strict_stack["http"])["slots_free"] == 1, "the slot is free")
    out, audio = baresip_call(tmp_path / "srtp", uri, mediaenc="srtp-mand", ca_file=certs / "ca.pem",
                              certificate=certs / "client-bundle.pem")
    assert "Call established" in out and "SRTP is Enabled" in out, out[-3000:]
    assert_tone_came_back(audio, 8000, f"baresip, mandatory SRTP and mutual TLS: {out[-3000:]}")
    until(lambda: readyz(strict_stack["http"])["calls"] == 0, "the call is over")
    assert _calls(strict_stack, "tls", True) == 1

    refused_488 = 'personagate_gateway_sip_responses_total{method="INVITE",status="488"}'
    out, _ = baresip_call(tmp_path / "plain", uri, mediaenc=None, ca_file=certs / "ca.pem",
                          certificate=certs / "client-bundle.pem", seconds=5)
    assert "488" in out and "Call established" not in out, out[-3000:]
    assert scrape_metrics(strict_stack["http"])[refused_488] == 1

    no_certificate = call(_tls(strict_stack), OPEN_NUMBER, "--transport", "tls", "--srtp", "mandatory",
                          "--seconds", "1", "--timeout", "10")
    assert not no_certificate["answered"] and "certificate" in no_certificate["reason"], no_certificate
    out, _ = baresip_call(tmp_path / "rogue", uri, mediaenc="srtp-mand", ca_file=certs / "ca.pem",
                          certificate=certs / "rogue-bundle.pem", seconds=3, patience=8)
    assert "Call established" not in out and "Call in-progress" not in out, out[-3000:]

    # Over TCP: an offer of SRTP is refused by pjsua (no SRTP where keys would cross in clear), one of plain RTP
    # by the gateway (SRTP is mandatory).
    keys_in_clear = call(strict_stack, OPEN_NUMBER, "--transport", "tcp", "--srtp", "mandatory", "--seconds", "1")
    assert keys_in_clear["status"] == 488, keys_in_clear
    plain_over_tcp = call(strict_stack, OPEN_NUMBER, "--transport", "tcp", "--seconds", "1")
    assert plain_over_tcp["status"] == 488 and "seconds_to_180" not in plain_over_tcp, plain_over_tcp
    metrics = scrape_metrics(strict_stack["http"])
    assert metrics[refused_488] == 3
    assert metrics['personagate_gateway_sip_invites_total{answer="488"}'] == 1
    assert readyz(strict_stack["http"])["calls"] == 0


def test_tls_below_the_minimum_version_is_refused(strict_stack: dict[str, str], certs: Path) -> None:
    """sip_tls_min_version 1.3 (the strict stack): a trunk with the right certificate gets a TLS 1.3 connection,
    and the same trunk is refused at TLS 1.2."""
    host, port = strict_stack["tls"].split(":")

    def handshake(version: ssl.TLSVersion) -> str | None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(certs / "ca.pem")
        context.load_cert_chain(certs / "client.pem", certs / "client.key")
        context.minimum_version = context.maximum_version = version
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version()

    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_2)


# ---------------------------------------------------------------------- settings


def _gateway_refuses(env: dict[str, str], tmp_path: Path) -> str:
    """`personagate gateway` started with ``env``: it must exit 2 at once; its message."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONAGATE_GATEWAY_")} | env
    done = subprocess.run([sys.executable, "-m", "personagate", "gateway", "--sip", "--sip-port", "0", "--tenants",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    return done.stderr


@pytest.mark.parametrize(("settings", "message"), [
    ({"sip_tls_cert_file": "{missing}", "sip_tls_key_file": "{certs}/server.key"},
     "sip_tls_cert_file '{missing}': no such file"),
    ({"sip_tls_cert_file": "{certs}/server.pem", "sip_tls_key_file": "{certs}/ext.cnf"},
     "sip_tls_key_file '{certs}/ext.cnf': not a PEM file"),
    ({"sip_tls_cert_file": "{certs}/server.pem", "sip_tls_key_file": "{certs}/client.key"},
     "sip_tls_key_file '{certs}/client.key': the private key does not match the certificate"),
    ({"sip_tls_cert_file": "{certs}/server.pem", "sip_tls_key_file": "{certs}/encrypted.key"},
     "sip_tls_key_file '{certs}/encrypted.key': the private key is encrypted"),
    ({"sip_tls_cert_file": "{certs}/server.pem"}, "sip_tls_cert_file is set but sip_tls_key_file is not"),
    ({"sip_tls_cert_file": "{certs}/server.pem", "sip_tls_key_file": "{certs}/server.key",
      "sip_tls_ca_file": "{certs}/server.key"}, "sip_tls_ca_file '{certs}/server.key': OpenSSL cannot load"),
    ({"sip_tls_cert_file": "{certs}/server.pem", "sip_tls_key_file": "{certs}/server.key",
      "sip_tls_require_client_cert": "true"}, "sip_tls_require_client_cert needs sip_tls_ca_file"),
    ({"sip_tls_ca_file": "{certs}/ca.pem"}, "sip_tls_ca_file is set but SIP over TLS is off"),
    ({"sip_srtp": "mandatory"}, "sip_srtp is mandatory but SIP over TLS is off"),
    ({"sip_tls_cert_file": "{certs}/server.pem", "sip_tls_key_file": "{certs}/server.key", "sip_tls_port": "5060"},
     "sip_tls_port (5060) is sip_port"),
])
def test_tls_and_srtp_settings_are_checked_at_start(certs: Path, tmp_path: Path, settings: dict[str, str],
                                                     message: str) -> None:
    """A wrong TLS or SRTP setting stops the gateway at start with a message naming the setting and the file,
    not a pjsua error once it runs."""
    from gateway.config import SettingsError, load_gateway_settings

    if not (certs / "encrypted.key").exists():
        _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key", cwd=certs)
    names = {"certs": str(certs), "missing": str(tmp_path / "missing.pem")}
    values = {name: value.format(**names) for name, value in settings.items()}
    with pytest.raises(SettingsError) as err:
        load_gateway_settings(**values)
    assert message.format(**names) in str(err.value)


@pytest.mark.e2e  # starts a process
def test_the_gateway_command_names_a_bad_tls_file(certs: Path, tmp_path: Path) -> None:
    stderr = _gateway_refuses({"PERSONAGATE_GATEWAY_SIP_TLS_CERT_FILE": str(certs / "server.pem"),
                               "PERSONAGATE_GATEWAY_SIP_TLS_KEY_FILE": str(certs / "client.key")}, tmp_path)
    assert "the private key does not match the certificate" in stderr and "server.pem" in stderr, stderr


def test_tls_settings_and_the_rtp_range(certs: Path) -> None:
    """With TLS on, the TLS trunks' account takes its own share of the RTP range (pjsua counts ports per account)."""
    from gateway.config import load_gateway_settings

    tls = {"sip_tls_cert_file": certs / "server.pem", "sip_tls_key_file": certs / "server.key"}
    settings = load_gateway_settings(sip_rtp_port=20000, sip_rtp_port_range=1024, sip_max_calls=256, **tls)
    assert settings.sip_tls_enabled and settings.sip_srtp == "optional" and settings.sip_tls_min_version == "1.2"
    assert [settings.rtp_port_share(i) for i in range(2)] == [(20000, 512), (20512, 512)]
    assert not load_gateway_settings().sip_tls_enabled


def test_transport_helpers() -> None:
    from gateway.sip.caller import with_transport
    from gateway.sip.leg import has_sdes_keys
    from gateway.sip.server import signalling_transport

    assert signalling_transport("INVITE sip:1@gw SIP/2.0\r\nVia: SIP/2.0/TCP 10.0.0.1:5060;branch=z9\r\n\r\n") == "tcp"
    assert signalling_transport("INVITE sip:1@gw SIP/2.0\r\nv: SIP/2.0/tls 10.0.0.1\r\nVia: SIP/2.0/UDP x\r\n\r\n") \
        == "tls"
    assert signalling_transport("INVITE sip:1@gw SIP/2.0\r\nVia: SIP/2.0/WSS x\r\n\r\n") == "other"
    assert with_transport("sip:1@gw:5061", "tls") == "sip:1@gw:5061;transport=tls"
    assert with_transport("sip:1@gw", "udp") == "sip:1@gw"
    assert with_transport("sips:1@gw", "tls") == "sips:1@gw"
    assert with_transport("sip:1@gw;transport=tcp", "tls") == "sip:1@gw;transport=tcp"
    assert has_sdes_keys("v=0\r\nm=audio 4000 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:x\r\n")
    assert not has_sdes_keys("v=0\r\nm=audio 4000 RTP/AVP 0\r\n")
