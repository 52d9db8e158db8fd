"""Digest authentication of trunks' INVITEs (gateway/sip/auth.py): the digest arithmetic against the RFCs' own
examples, the nonces, every verdict, the settings; then end to end against a real `personagate gateway` and
echo worker, with `personagate call` (pjsua2, SHA-256) and sipp (MD5) as the trunks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.config import SettingsError, load_gateway_settings
from gateway.sip.auth import (
    FAILURE_LIMIT,
    MAX_HEADER_CHARS,
    AuthResult,
    DigestAuthenticator,
    NonceIssuer,
    digest_response,
    parse_digest,
)
from tests.helpers.caller import call
from tests.helpers.processes import free_port, serve, udp_free_port
from tests.helpers.programs import needs
from tests.helpers.sipp import SCENARIOS, sipp_caller
from tests.helpers.stack import OPEN_NUMBER, echo_stack, readyz, scrape_metrics
from tests.helpers.wait import until

# --------------------------------------------------------------------------------------------- the digest


def test_digest_response_matches_the_rfc_examples() -> None:
    """A trunk computing its response by the book is admitted: RFC 2617 §3.5 (MD5) and RFC 7616 §3.9.1
    (MD5 and SHA-256) give the expected responses for their example credentials."""
    assert digest_response(algorithm="MD5", username="Mufasa", realm="testrealm@host.com", password="Circle Of Life",
                           method="GET", uri="/dir/index.html", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
                           nc="00000001", cnonce="0a4f113b") == "6629fae49393a05397450978507c4ef1"
    rfc7616 = {"username": "Mufasa", "realm": "http-auth@example.org", "password": "Circle of Life", "method": "GET",
               "uri": "/dir/index.html", "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", "nc": "00000001",
               "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"}
    assert digest_response(algorithm="MD5", **rfc7616) == "8ca523f5e9506fed4657c9700eebdbec"
    assert digest_response(algorithm="SHA-256", **rfc7616) == \
        "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"


def test_parse_digest_reads_quoted_and_token_values_and_refuses_junk() -> None:
    """Authorization headers as real UAs write them (sipp without spaces, pjsua with) are understood; anything
    else is not Digest credentials rather than a crash."""
    params = parse_digest('Digest username="a\\"b",realm="r", nc=00000001,qop=auth , uri="sip:x@y;a=b,c"')
    assert params == {"username": 'a"b', "realm": "r", "nc": "00000001", "qop": "auth", "uri": "sip:x@y;a=b,c"}
    assert parse_digest("Bearer abc") is None
    assert parse_digest('Digest realm="r", realm="s"') is None  # a parameter twice
    assert parse_digest('Digest realm="unterminated') is None
    assert parse_digest("Digest ,,,") is None
    assert parse_digest("Digest") == {}


def test_nonces_expire_and_belong_to_one_process() -> None:
    """A retry within ``nonce_seconds`` is accepted; later it is stale; a nonce another process (or a
    forger) made is not ours."""
    now = [1_000_000.0]
    issuer = NonceIssuer(300, clock=lambda: now[0])
    nonce = issuer.issue()
    assert issuer.check(nonce) == "fresh" and issuer.issue() != nonce
    now[0] += 301
    assert issuer.check(nonce) == "expired"
    assert NonceIssuer(300, clock=lambda: now[0]).check(issuer.issue()) == "foreign"
    tampered = issuer.issue()
    tampered = tampered[:3] + ("A" if tampered[3] != "A" else "B") + tampered[4:]
    for bad in (tampered, "", "not base64 !", "AAAA", "x" * 500):
        assert issuer.check(bad) == "foreign", bad


REALM = "personagate"
USERS = {"trunk-a": "correct-horse"}
RURI = f"sip:{OPEN_NUMBER}@10.0.0.1:5060"


def invite(authorization: str | None) -> str:
    head = [f"INVITE {RURI} SIP/2.0", "Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK1", "CSeq: 2 INVITE"]
    if authorization is not None:
        head.append(f"Authorization: {authorization}")
    return "\r\n".join(head) + "\r\n\r\nv=0\r\n"


def credentials(auth: DigestAuthenticator, *, password: str = "correct-horse", username: str = "trunk-a",
                algorithm: str = "SHA-256", nonce: str | None = None, uri: str = RURI, realm: str = REALM,
                qop: str = "auth", nc: str = "00000001") -> str:
    nonce = nonce or auth.nonces.issue()
    response = digest_response(algorithm=algorithm, username=username, realm=realm, password=password,
                               method="INVITE", uri=uri, nonce=nonce, nc=nc, cnonce="c0ffee")
    return (f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", response="{response}", '
            f'algorithm={algorithm}, cnonce="c0ffee", qop={qop}, nc={nc}')


def test_every_verdict_of_the_authenticator() -> None:
    """The answers a trunk gets: right → admitted (SHA-256 or MD5); none → 401; wrong password or unknown user →
    403 (not another 401); an expired nonce with the right password → 401 stale; foreign realm, unoffered
    algorithm, another Request-URI, a huge header → 403."""
    now = [2_000_000.0]
    auth = DigestAuthenticator(REALM, {"trunk-a": "correct-horse"},
                               nonces=NonceIssuer(60, clock=lambda: now[0]))

    def verdict(authorization: str | None, source: str = "10.0.0.9") -> tuple[AuthResult, int]:
        decision = auth.verify(invite(authorization), "INVITE", source)
        return decision.result, decision.status

    assert verdict(credentials(auth)) == (AuthResult.OK, 0)
    assert verdict(credentials(auth, algorithm="MD5")) == (AuthResult.OK, 0)
    assert verdict(credentials(auth, uri="sip:10.0.0.1:5060")) == (AuthResult.OK, 0)  # sipp signs the host only
    assert verdict(None) == (AuthResult.CHALLENGED, 401)
    assert verdict("Bearer xyz") == (AuthResult.CHALLENGED, 401)
    assert verdict(credentials(auth, password="wrong")) == (AuthResult.REJECTED, 403)
    assert verdict(credentials(auth, username="nobody")) == (AuthResult.REJECTED, 403)
    old = auth.nonces.issue()
    now[0] += 61
    assert verdict(credentials(auth, nonce=old)) == (AuthResult.STALE, 401)
    assert verdict(credentials(auth, nonce=old, password="wrong")) == (AuthResult.REJECTED, 403)
    foreign = NonceIssuer(60).issue()  # e.g. from before a restart: right password → a fresh challenge
    assert verdict(credentials(auth, nonce=foreign)) == (AuthResult.STALE, 401)
    assert verdict(credentials(auth, realm="elsewhere")) == (AuthResult.INVALID, 403)
    assert verdict(credentials(auth, uri="sip:+15550000000@10.0.0.1:5060")) == (AuthResult.INVALID, 403)
    assert verdict(credentials(auth, qop="auth-int")) == (AuthResult.INVALID, 403)
    assert verdict(credentials(auth).replace("SHA-256", "SHA-512-256")) == (AuthResult.INVALID, 403)
    assert verdict('Digest username="trunk-a", realm="personagate"') == (AuthResult.INVALID, 403)
    assert verdict(credentials(auth) + ", x=" + "y" * MAX_HEADER_CHARS) == (AuthResult.INVALID, 403)
    md5_only = DigestAuthenticator(REALM, {"trunk-a": "correct-horse"}, algorithms=["MD5"])
    assert md5_only.verify(invite(credentials(md5_only)), "INVITE", "10.0.0.8").result is AuthResult.INVALID


def test_a_replayed_invite_is_challenged_again_and_a_counted_reuse_is_admitted() -> None:
    """Someone who captured an authenticated INVITE cannot place calls by sending it again: the same nonce count
    over the same nonce gets a fresh challenge (401 stale), which needs the password. A client that reuses the
    nonce with its count raised, as RFC 7616 asks, is admitted."""
    auth = DigestAuthenticator(REALM, USERS)
    nonce = auth.nonces.issue()
    first = invite(credentials(auth, nonce=nonce))
    assert auth.verify(first, "INVITE", "10.0.0.9").result is AuthResult.OK
    replayed = auth.verify(first, "INVITE", "10.0.0.66")
    assert (replayed.result, replayed.status) == (AuthResult.STALE, 401), replayed
    assert auth.verify(invite(credentials(auth, nonce=nonce, nc="00000002")), "INVITE", "10.0.0.9").admitted
    assert auth.verify(invite(credentials(auth, nonce=nonce, nc="00000002")), "INVITE", "10.0.0.9").status == 401
    assert auth.verify(invite(credentials(auth, nonce=nonce, nc="zz")), "INVITE", "10.0.0.9").status == 403


def test_repeated_failures_from_one_source_are_refused_without_checking() -> None:
    """A flood of bad Authorization headers from one address costs no hashing after ``FAILURE_LIMIT`` failures
    a minute: even the right password is refused from there, while other sources are unaffected."""
    auth = DigestAuthenticator(REALM, {"trunk-a": "correct-horse"})
    for _ in range(FAILURE_LIMIT):
        assert auth.verify(invite(credentials(auth, password="guess")), "INVITE", "10.6.6.6").status == 403
    assert auth.verify(invite(credentials(auth)), "INVITE", "10.6.6.6").result is AuthResult.THROTTLED
    assert auth.verify(invite(credentials(auth)), "INVITE", "10.0.0.9").result is AuthResult.OK


def test_challenges_offer_each_algorithm_with_one_nonce() -> None:
    """A 401 carries one WWW-Authenticate per algorithm, in the configured order, qop="auth", stale on demand."""
    auth = DigestAuthenticator('pg "east"', {"u": "p"}, algorithms=["SHA-256", "MD5"])
    sha, md5 = auth.challenges(stale=True)
    assert parse_digest(sha) == {"realm": 'pg "east"', "nonce": parse_digest(md5)["nonce"], "algorithm": "SHA-256",
                                 "qop": "auth", "stale": "true"}
    assert parse_digest(md5)["algorithm"] == "MD5" and "stale" not in parse_digest(auth.challenges()[1])
    with pytest.raises(ValueError):
        DigestAuthenticator("r", {"u": "p"}, algorithms=["SHA-1"])


# --------------------------------------------------------------------------------------------- settings


def test_auth_settings_are_checked_at_start_and_passwords_stay_secret(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy that would refuse every call, an unreadable credentials file or a bad registrar stops the start
    with a clear message; passwords never show in the settings' text."""
    for name in [n for n in os.environ if n.startswith("PERSONAGATE_GATEWAY_")]:
        monkeypatch.delenv(name)
    with pytest.raises(SettingsError, match="sip_auth_policy digest needs trunk credentials"):
        load_gateway_settings(sip_auth_policy="digest")
    users = tmp_path / "trunks.yaml"
    users.write_text("trunk-a: correct-horse\ntrunk-b: 12345\n")
    settings = load_gateway_settings(sip_auth_users_file=users, sip_auth_users={"trunk-a": "from-env"},
                                     sip_auth_policy="allow_and_digest")
    assert {k: v.get_secret_value() for k, v in settings.sip_auth_users.items()} == {
        "trunk-a": "from-env", "trunk-b": "12345"}
    assert "correct-horse" not in repr(settings) and "from-env" not in str(settings)
    users.write_text("- not a mapping\n")
    with pytest.raises(SettingsError, match="expected a mapping of username: password"):
        load_gateway_settings(sip_auth_users_file=users)
    with pytest.raises(SettingsError, match="registrar must be a sip: or sips: URI"):
        load_gateway_settings(sip_registrations=[{"registrar": "pbx.example.com", "username": "u", "password": "p"}])
    monkeypatch.setenv("PERSONAGATE_GATEWAY_SIP_REGISTRATIONS",
                       '[{"registrar": "sip:pbx.example.com:5070", "username": "gw", "password": "pw"}]')
    registration = load_gateway_settings().sip_registrations[0]
    assert registration.aor == "sip:gw@pbx.example.com:5070" and registration.name == "gw@pbx.example.com:5070"
    assert "pw" not in repr(registration)


def test_the_policy_table(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """docs/sip.md's table of sip_auth_policy, row by row, through the server's own admission step: a source in
    sip_allow (10.0.0.9) or not (192.0.2.1), without credentials or with the right ones. No password, right or
    wrong, reaches the log."""
    from prometheus_client import CollectorRegistry

    from gateway.sip.server import SipServer

    for name in [n for n in os.environ if n.startswith("PERSONAGATE_GATEWAY_")]:
        monkeypatch.delenv(name)
    def answers(policy: str, users: dict[str, str]) -> dict[tuple[str, str], int]:
        calls = SimpleNamespace(metrics=SimpleNamespace(registry=CollectorRegistry()))  # only its metrics registry
        settings = load_gateway_settings(sip_allow=["10.0.0.0/24"], sip_auth_policy=policy, sip_auth_users=users)
        server = SipServer(settings, registry=None, calls=calls)  # type: ignore[arg-type]
        out = {}
        for source in ("10.0.0.9", "192.0.2.1"):
            for given in ("none", "right"):
                authorization = credentials(server.auth) if given == "right" and server.auth else None
                refusal = server._admission(invite(authorization), source)
                out[(source, given)] = 0 if refusal is None else refusal[0]
        return out

    caplog.set_level(logging.DEBUG)
    allowed, other = "10.0.0.9", "192.0.2.1"
    assert answers("allow_or_digest", {}) == {(allowed, "none"): 0, (allowed, "right"): 0,
                                              (other, "none"): 403, (other, "right"): 403}
    assert answers("allow_or_digest", USERS) == {(allowed, "none"): 0, (allowed, "right"): 0,
                                                 (other, "none"): 401, (other, "right"): 0}
    assert answers("digest", USERS) == {(allowed, "none"): 401, (allowed, "right"): 0,
                                        (other, "none"): 401, (other, "right"): 0}
    assert answers("allow_and_digest", USERS) == {(allowed, "none"): 401, (allowed, "right"): 0,
                                                  (other, "none"): 403, (other, "right"): 403}
    server = SipServer(load_gateway_settings(sip_auth_policy="digest", sip_auth_users=USERS), registry=None,
                       calls=SimpleNamespace(metrics=SimpleNamespace(registry=CollectorRegistry())))  # type: ignore[arg-type]
    assert server.auth is not None
    assert server._admission(invite(credentials(server.auth, password="battery-staple")), other)[0] == 403
    logged = caplog.text + repr([record.__dict__ for record in caplog.records])
    assert "INVITE authenticated" in logged and "trunk-a" in logged
    assert "correct-horse" not in logged and "battery-staple" not in logged


# --------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def auth_stack(tenants: Path) -> Iterator[dict[str, str]]:
    """The echo stack; trunks from 127.0.0.2 admitted by address, any other by digest (SHA-256, then MD5)."""
    env = {"PERSONAGATE_GATEWAY_SIP_ALLOW": '["127.0.0.2/32"]',
           "PERSONAGATE_GATEWAY_SIP_AUTH_USERS": json.dumps(USERS)}
    with echo_stack(tenants, env) as (addresses, _, _):
        yield addresses


def _auth_counts(stack: dict[str, str]) -> dict[str, float]:
    metrics = scrape_metrics(stack["http"])
    counts = {result.value: metrics.get(f'personagate_gateway_sip_auth_total{{result="{result.value}"}}', 0)
              for result in AuthResult}
    counts["401"] = metrics.get('personagate_gateway_sip_invites_total{answer="401"}', 0)
    return counts


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_a_trunk_with_the_right_password_is_answered_after_one_challenge(auth_stack: dict[str, str]) -> None:
    """`personagate call --user --password` from outside sip_allow: 401 (SHA-256 offered first), the INVITE
    again with credentials, then the echo agent answers it."""
    until(lambda: readyz(auth_stack["http"])["slots_free"] == 1, "the slot is free")
    before = _auth_counts(auth_stack)
    report = call(auth_stack, OPEN_NUMBER, "--seconds", "1", "--user", "trunk-a", "--password", "correct-horse")
    assert report["status"] == 200 and report["answered"], report
    assert _delta(before, _auth_counts(auth_stack)) == {"challenged": 1, "401": 1, "ok": 1}


def test_a_wrong_password_is_403_not_another_challenge(auth_stack: dict[str, str]) -> None:
    before = _auth_counts(auth_stack)
    report = call(auth_stack, OPEN_NUMBER, "--seconds", "1", "--user", "trunk-a", "--password", "battery-staple")
    assert report["status"] == 403 and not report["answered"], report
    assert _delta(before, _auth_counts(auth_stack)) == {"challenged": 1, "401": 1, "rejected": 1}


def test_no_credentials_is_401_with_the_challenges(auth_stack: dict[str, str]) -> None:
    before = _auth_counts(auth_stack)
    report = call(auth_stack, OPEN_NUMBER, "--seconds", "1")
    assert report["status"] == 401 and "seconds_to_180" not in report, report
    assert _delta(before, _auth_counts(auth_stack)) == {"challenged": 1, "401": 1}


def test_a_source_in_sip_allow_needs_no_password(auth_stack: dict[str, str]) -> None:
    """The default policy keeps today's behaviour for trunks admitted by address."""
    until(lambda: readyz(auth_stack["http"])["slots_free"] == 1, "the slot is free")
    before = _auth_counts(auth_stack)
    report = call(auth_stack, OPEN_NUMBER, "--seconds", "1", "--host", "127.0.0.2")
    assert report["status"] == 200 and report["answered"], report
    assert _delta(before, _auth_counts(auth_stack)) == {}


@contextlib.contextmanager
def digest_only_gateway(tenants: Path, worker: str) -> Iterator[dict[str, str]]:
    """A second gateway on the same worker: every INVITE must pass digest (even from sip_allow), MD5 first."""
    env = os.environ | {"PERSONAGATE_GATEWAY_SIP_AUTH_POLICY": "digest",
                        "PERSONAGATE_GATEWAY_SIP_AUTH_USERS": json.dumps(USERS),
                        "PERSONAGATE_GATEWAY_SIP_AUTH_ALGORITHMS": '["MD5", "SHA-256"]'}
    http_port, sip_port = free_port(), udp_free_port()
    command = [sys.executable, "-m", "personagate", "gateway", "--port", str(http_port), "--tenants", str(tenants),
               "--worker", worker, "--sip-port", str(sip_port)]
    with serve(command, f"http://127.0.0.1:{http_port}/readyz", env=env):
        http = f"http://127.0.0.1:{http_port}"
        until(lambda: readyz(http)["slots_free"] == 1, "the second gateway sees the worker's free slot")
        yield {"sip": f"127.0.0.1:{sip_port}", "http": http}


def _sipp(scenario: str, stack: dict[str, str], tmp_path: Path, username: str, password: str
          ) -> subprocess.CompletedProcess:
    """sipp running tests/sipp/``scenario`` against the gateway, answering its challenge as ``username``."""
    command = sipp_caller(SCENARIOS / scenario, stack["sip"], OPEN_NUMBER, extra=("-au", username, "-ap", password))
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=40, check=False)


@needs("sipp")
def test_sipp_trunk_answers_the_challenge(auth_stack: dict[str, str], tenants: Path,
                                          tmp_path: Path) -> None:
    """A third-party UAC (sipp) with sip_auth_policy digest, from an address in sip_allow: 401 with an MD5
    challenge, its [authentication] retry gets 180, 183 and 200 from the echo stack; a wrong password gets 403."""
    with digest_only_gateway(tenants, auth_stack["worker"]) as gateway:
        done = _sipp("digest_call.xml", gateway, tmp_path, "trunk-a", "correct-horse")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        done = _sipp("digest_call_refused.xml", gateway, tmp_path, "trunk-a", "battery-staple")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        until(lambda: readyz(gateway["http"])["calls"] == 0, "the call is over")
        metrics = scrape_metrics(gateway["http"])
    assert metrics['personagate_gateway_sip_auth_total{result="ok"}'] == 1
    assert metrics['personagate_gateway_sip_auth_total{result="challenged"}'] == 2
    assert metrics['personagate_gateway_sip_auth_total{result="rejected"}'] == 1
    assert metrics['personagate_gateway_sip_invites_total{answer="200"}'] == 1
