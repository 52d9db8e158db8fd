"""The tenant admin API: tenant isolation, persona YAML edits that keep the file byte for byte, the
same positioned validation messages as `personagate tenants validate`, If-Match, atomic concurrent
writes, voice clip uploads, history and rollback, read-only folders, reload status, settings.

Most tests drive the app in-process (httpx over ASGI, with its lifespan: the registry loads and
watches the folder); isolation, concurrency and the read-only folder run a real `personagate gateway`
process on loopback.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from gateway.admin.tokens import TokenFile, TokensUnavailable, new_token, parse_tokens
from gateway.config import SettingsError, load_gateway_settings
from gateway.tenants.loader import ClipCache, load_tenant
from personagate.cli import main
from tests.helpers.admin_api import (
    ACME,
    ADMIN,
    MAX_CLIP_BYTES,
    gateway_process,
    in_process_gateway,
    speech_like_wav,
    write_tenants,
    write_tokens,
)

CLAIMS = ACME[ACME.index("    prompt: >-"):ACME.index("\n  # Billing")]  # the claims persona's lines, indented


def _dedent(text: str, columns: int = 4) -> str:
    return "".join(line[columns:] if line.strip() else line for line in text.splitlines(keepends=True))


def _line_of(text: str, needle: str) -> int:
    return next(number for number, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("PERSONAGATE_GATEWAY_"):
            monkeypatch.delenv(name)


# ------------------------------------------------------------------------------------ isolation


@pytest.mark.e2e  # starts a process
async def test_a_tenant_token_gets_403_on_every_endpoint_of_another_tenant(tmp_path):
    """Tenant isolation, on a real gateway process: acme's token is refused (403) on each of bank's
    endpoints, and on a tenant that does not exist (403 too: it learns nothing about other tenants);
    bank's files are untouched. It sees only itself in lists and reload status. The operator sees
    both, and gets 404 on a tenant that does not exist. No token, another scheme, or an unknown token
    gets 401 with a Bearer challenge."""
    root = write_tenants(tmp_path / "tenants")
    tokens = write_tokens(tmp_path / "tokens.yaml")
    wav = speech_like_wav()
    with gateway_process(root, tokens.path) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            acme, op = tokens.auth(tokens.acme), tokens.auth(tokens.operator)
            # bank has a version in its history, for the history endpoints
            cards = "prompt: You help customers with their cards.\nvoice: {preset: VARF1}\n"
            r = await client.put(f"{ADMIN}/tenants/bank/personas/cards", content=cards, headers=op)
            assert r.status_code == 200, r.text
            bank_before = (root / "bank" / "tenant.yaml").read_bytes()
            for tenant in ("bank", "no-such-tenant"):
                t = f"{ADMIN}/tenants/{tenant}"
                for method, url, body in [
                    ("GET", t, None),
                    ("GET", f"{t}/personas/cards", None),
                    ("PUT", f"{t}/personas/cards", "prompt: Hijacked.\nvoice: {preset: NATF0}\n"),
                    ("PUT", f"{t}/personas/new", "prompt: Hijacked.\nvoice: {preset: NATF0}\n"),
                    ("DELETE", f"{t}/personas/cards", None),
                    ("PUT", f"{t}/clips/voices/x.wav", wav),
                    ("GET", f"{t}/clips/voices/x.wav", None),
                    ("GET", f"{t}/history", None),
                    ("GET", f"{t}/history/1", None),
                    ("POST", f"{t}/history/1/rollback", None),
                ]:
                    r = await client.request(method, url, content=body, headers=acme)
                    assert r.status_code == 403, (method, url, r.status_code, r.text)
                    assert r.json() == {"detail": f"this token cannot reach tenant {tenant!r}"}
            assert (root / "bank" / "tenant.yaml").read_bytes() == bank_before
            assert not (root / "bank" / "voices").exists()

            r = await client.get(f"{ADMIN}/tenants", headers=acme)
            assert [t["id"] for t in r.json()] == ["acme"]
            r = await client.get(f"{ADMIN}/reload", headers=acme)
            assert list(r.json()["tenants"]) == ["acme"]
            r = await client.get(f"{ADMIN}/tenants", headers=op)
            assert [(t["id"], t["state"]) for t in r.json()] == [("acme", "serving"), ("bank", "serving")]
            assert r.json()[1]["numbers"] == {"+442071234567": "cards"}
            r = await client.get(f"{ADMIN}/tenants/no-such-tenant", headers=op)
            assert r.status_code == 404
            r = await client.get(f"{ADMIN}/tenants/acme/personas/claims", headers=acme)
            assert r.status_code == 200
            r = await client.put(f"{ADMIN}/tenants/acme/clips/voices/big.wav", content=b"\0" * 5_000_001, headers=op)
            assert r.status_code == 413  # the default max_clip_bytes, answered by a real server

            for headers in ({}, {"Authorization": f"Basic {tokens.acme}"}, tokens.auth("not-a-token"),
                            tokens.auth(tokens.acme + "x")):
                r = await client.get(f"{ADMIN}/tenants/acme", headers=headers)
                assert r.status_code == 401, headers
                assert r.headers["www-authenticate"].startswith("Bearer")


async def test_without_a_tokens_file_the_admin_api_is_off_but_docs_are_served(tmp_path):
    """No admin_tokens_file: every admin endpoint answers 503 with the reason, even with a token; the
    OpenAPI document (with the bearer scheme) and /docs are still served."""
    root = write_tenants(tmp_path / "tenants")
    async with in_process_gateway(root, None) as (client, _):
        for method, url in [("GET", "/tenants"), ("GET", "/tenants/acme/personas/claims"), ("POST", "/reload"),
                            ("PUT", "/tenants/acme/personas/claims")]:
            r = await client.request(method, ADMIN + url, headers={"Authorization": "Bearer x"}, content="a: 1")
            assert r.status_code == 503
            assert r.json() == {"detail": "admin API disabled: no admin_tokens_file configured"}
        assert (await client.get("/docs")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
        assert spec["components"]["securitySchemes"]["bearer"] == {
            "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearer"][
                "description"]}
        assert {"/v1/admin/tenants/{tenant}/personas/{persona}", "/v1/admin/reload",
                "/v1/admin/tenants/{tenant}/history/{version}/rollback"} <= set(spec["paths"])
        assert (await client.get("/healthz")).json() == {"status": "ok", "tenants_serving": 2}


async def test_a_rotated_tokens_file_applies_without_restart(gw, caplog):
    """Replacing the tokens file (as a Secret update does) revokes old tokens and admits new ones at
    once; a malformed file turns the admin API off (503) rather than keep revoked tokens working. The
    503 names neither the file's path nor its problems (clients without a token get it too): the
    gateway's log does."""
    r = await gw.client.get(f"{ADMIN}/tenants", headers=gw.as_("acme"))
    assert r.status_code == 200
    token, line = new_token()
    replacement = gw.tokens.path.with_name("tokens.new")
    replacement.write_text(f"tenants:\n  acme:\n    - {line}\n")
    os.replace(replacement, gw.tokens.path)
    assert (await gw.client.get(f"{ADMIN}/tenants", headers=gw.as_("acme"))).status_code == 401
    assert (await gw.client.get(f"{ADMIN}/tenants", headers=gw.tokens.auth(token))).status_code == 200
    replacement.write_text(f"tenants:\n  acme:\n    - {token}\n")  # the token itself instead of its hash
    os.replace(replacement, gw.tokens.path)
    r = await gw.client.get(f"{ADMIN}/tenants", headers=gw.tokens.auth(token))
    assert r.status_code == 503
    assert r.json() == {"detail": "admin API disabled: the admin tokens file cannot be used; the gateway's log "
                                  "says why"}
    for headers in ({}, gw.tokens.auth(token)):
        r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/claims", headers=headers, content="a: 1")
        assert r.status_code == 503 and str(gw.tokens.path.parent) not in r.text and "tokens.yaml" not in r.text
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "gateway.admin.tokens"]
    assert any(str(gw.tokens.path) in m and "tenants.acme[0]: expected 'sha256:'" in m for m in logged), logged


def test_a_malformed_tokens_file_names_every_problem(tmp_path):
    """Unknown keys, bad tenant ids, bad hashes and a hash given to two owners are all reported."""
    _, line = new_token()
    text = f"operater: []\noperator:\n  - {line}\ntenants:\n  Acme: []\n  bank:\n    - {line}\n    - 123\n"
    with pytest.raises(TokensUnavailable) as err:
        parse_tokens(text, "tokens.yaml")
    message = str(err.value)
    for part in ("operater: unknown key", "tenants.Acme: not a tenant id", "tenants.bank[1]: expected 'sha256:'",
                 "given to both operator and tenant:bank"):
        assert part in message
    with pytest.raises(TokensUnavailable, match="no admin_tokens_file configured"):
        TokenFile(None).current()
    missing = TokenFile(tmp_path / "nope.yaml")
    with pytest.raises(TokensUnavailable) as err:
        missing.current()
    assert "cannot read the admin tokens file" in err.value.detail and "nope.yaml" not in str(err.value)


def test_the_token_command_prints_a_token_and_the_line_for_the_tokens_file(capsys, tmp_path):
    """`personagate tenants token acme` prints a token once and the YAML to add; that YAML, as the
    tokens file, admits exactly that token, for acme."""
    assert main(["tenants", "token", "acme"]) == 0
    out = capsys.readouterr().out
    token = out.split("\n\n")[1].strip()
    entry = out[out.index("tenants:"):]
    table = parse_tokens(entry, "tokens.yaml")
    assert table.identify(token).name == "tenant:acme"
    assert table.identify(token + "x") is None
    assert token not in entry
    assert main(["tenants", "token", "--operator"]) == 0
    out = capsys.readouterr().out
    assert parse_tokens(out[out.index("operator:"):], "t").identify(out.split("\n\n")[1].strip()).operator
    with pytest.raises(SystemExit):
        main(["tenants", "token", "acme", "--operator"])


# ------------------------------------------------------------------------------------ personas


async def test_persona_get_then_put_round_trip_keeps_the_file_byte_for_byte(gw):
    """GET returns the persona's lines as written (comments included, de-indented) with an ETag;
    PUTting them back changes nothing; PUTting a change replaces just those lines: every comment,
    the other persona and the rest of the file stay byte for byte, and the registry serves it."""
    r = await gw.client.get(f"{ADMIN}/tenants/acme/personas/claims", headers=gw.as_("acme"))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/yaml")
    assert r.text == _dedent(CLAIMS)
    etag = r.headers["etag"]
    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/claims", content=r.text,
                            headers=gw.as_("acme") | {"If-Match": etag})
    assert r.status_code == 200 and r.json()["changed"] is False and r.json()["etag"] == etag
    assert gw.acme_file.read_text() == ACME

    new_claims = _dedent(CLAIMS).replace("calmly and precisely", "kindly").replace("0.7", "0.9")
    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/claims", content=new_claims,
                            headers=gw.as_("acme") | {"If-Match": etag, "Content-Type": "text/yaml"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["changed"] is True and body["status"]["state"] == "serving"
    assert body["version"]["actor"] == "tenant:acme" and body["version"]["action"] == "write"
    expected = ACME.replace("calmly and precisely", "kindly").replace("temperature: 0.7", "temperature: 0.9")
    assert gw.acme_file.read_text() == expected
    claims = gw.app.state.registry.tenants["acme"].personas["claims"]
    assert claims.prompt.endswith("kindly.") and claims.sampling.temperature == 0.9
    r = await gw.client.get(f"{ADMIN}/tenants/acme/personas/billing", headers=gw.as_("acme"))
    assert r.text == "prompt: You answer billing questions for Acme Insurance.\nvoice:\n  preset: NATM1\n"


async def test_a_put_with_an_error_is_422_with_the_validators_positioned_message_and_the_file_is_unchanged(gw):
    """A persona whose temperature is out of bounds is refused with exactly the message `personagate
    tenants validate` would print for the resulting file, positioned in tenant.yaml; nothing is
    written."""
    bad = _dedent(CLAIMS).replace("temperature: 0.7", "temperature: 5.0")
    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/claims", content=bad, headers=gw.as_("acme"))
    assert r.status_code == 422
    line = _line_of(ACME, "temperature: 0.7")  # the persona's lines keep their place; the value is at column 20
    assert r.json() == {"detail": "tenant configuration invalid", "problems": [
        f"acme/tenant.yaml:{line}:20: personas.claims.sampling.temperature: must be at most 1.2, got 5.0"]}
    assert gw.acme_file.read_text() == ACME
    # the same file, validated by the loader, gives the same string
    spliced = ACME.replace("temperature: 0.7", "temperature: 5.0")
    _, problems = load_tenant(gw.root / "acme", ClipCache(), text=spliced, label="acme/tenant.yaml")
    assert [str(p) for p in problems] == r.json()["problems"]

    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/claims", content="prompt: Hello.\nvoice:\n  preset: NOPE\n",
                            headers=gw.as_("acme"))
    assert r.status_code == 422
    assert r.json()["problems"][0].startswith(f"acme/tenant.yaml:{_line_of(ACME, '  claims:') + 3}:15: ")
    assert "unknown voice preset 'NOPE'" in r.json()["problems"][0]
    assert gw.acme_file.read_text() == ACME


async def test_a_body_that_is_not_a_persona_mapping_is_422_positioned_in_the_body(gw):
    """Bodies that are not YAML key: value lines are refused with positions in the body itself."""
    url, auth = f"{ADMIN}/tenants/acme/personas/claims", gw.as_("acme")
    cases = {
        "- prompt: x\n": "request body:1:1: (body): expected the persona's settings as 'key: value' lines "
                         "(prompt:, voice:, ...), got a list",
        "prompt: x\nvoice: [NATF0\n": "request body:3:1: (yaml): not valid YAML: while parsing a flow sequence "
                                      "expected ',' or ']', but got '<stream end>'",
        "": "request body:1:1: (body): is empty; expected the persona's settings (prompt:, voice:, ...)",
    }
    for body, problem in cases.items():
        r = await gw.client.put(url, content=body, headers=auth)
        assert r.status_code == 422, body
        assert r.json() == {"detail": "persona invalid (positions are in the request body)", "problems": [problem]}
    r = await gw.client.put(url, content="x" * (64 * 1024 + 1), headers=auth)
    assert r.status_code == 413
    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/Claims!", content="prompt: x\n", headers=auth)
    assert r.status_code == 422 and "is not a persona name" in r.json()["detail"]
    assert gw.acme_file.read_text() == ACME


async def test_if_match_mismatch_is_412_and_nothing_is_written(gw):
    """Two admins edit the same persona: the second, holding the ETag of the file before the first
    write, gets 412 instead of overwriting the first admin's change."""
    url = f"{ADMIN}/tenants/acme/personas/billing"
    r = await gw.client.get(url, headers=gw.as_("acme"))
    etag = r.headers["etag"]
    first = r.text.replace("billing questions", "billing and payment questions")
    r = await gw.client.put(url, content=first, headers=gw.as_("acme") | {"If-Match": etag})
    assert r.status_code == 200
    after_first = gw.acme_file.read_text()
    second = "prompt: Something else.\nvoice: {preset: NATM1}\n"
    r = await gw.client.put(url, content=second, headers=gw.as_("operator") | {"If-Match": etag})
    assert r.status_code == 412
    assert r.headers["etag"] != etag
    assert gw.acme_file.read_text() == after_first


async def test_a_new_persona_is_added_and_a_routed_persona_cannot_be_deleted(gw):
    """PUT of a new name adds the persona after the last one; DELETE of a persona a number still
    routes to is refused with the validator's message; DELETE of an unrouted one removes just it."""
    body = "prompt: You handle fraud reports.\nvoice:\n  preset: VARM2\n"
    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/fraud", content=body, headers=gw.as_("operator"))
    assert r.status_code == 200, r.text
    with_fraud = ACME.replace("      preset: NATM1\n", "      preset: NATM1\n  fraud:\n    prompt: You handle fraud "
                                                        "reports.\n    voice:\n      preset: VARM2\n")
    assert gw.acme_file.read_text() == with_fraud
    assert "fraud" in gw.app.state.registry.tenants["acme"].personas

    r = await gw.client.delete(f"{ADMIN}/tenants/acme/personas/claims", headers=gw.as_("acme"))
    assert r.status_code == 422
    line = _line_of(ACME, '"+14155550100"')
    assert r.json()["problems"] == [
        (f"acme/tenant.yaml:{line}:19: numbers.+14155550100: routes to persona 'claims', which is not defined; "
        "expected one of: billing, fraud")]
    assert gw.acme_file.read_text() == with_fraud
    r = await gw.client.delete(f"{ADMIN}/tenants/acme/personas/fraud", headers=gw.as_("acme"))
    assert r.status_code == 200
    assert gw.acme_file.read_text() == ACME
    r = await gw.client.delete(f"{ADMIN}/tenants/acme/personas/fraud", headers=gw.as_("acme"))
    assert r.status_code == 404


@pytest.mark.e2e  # starts a process
async def test_concurrent_writes_never_leave_a_half_written_file(tmp_path):
    """20 concurrent PUTs of different personas to a real gateway while another thread reads
    tenant.yaml in a loop: every read is a whole, valid tenant file, and all 20 personas are there
    at the end, each write recorded in the history."""
    root = write_tenants(tmp_path / "tenants")
    tokens = write_tokens(tmp_path / "tokens.yaml")
    path = root / "acme" / "tenant.yaml"
    stop, reads, bad = threading.Event(), [0], []

    def reader() -> None:
        clips = ClipCache()
        while not stop.is_set():
            text = path.read_text()
            tenant, problems = load_tenant(root / "acme", clips, text=text)
            reads[0] += 1
            if tenant is None:
                bad.append((text, [str(p) for p in problems]))

    with gateway_process(root, tokens.path) as base:
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            async with httpx.AsyncClient(base_url=base, timeout=60, headers=tokens.auth(tokens.acme)) as client:
                responses = await asyncio.gather(*(
                    client.put(f"{ADMIN}/tenants/acme/personas/p{i:02d}",
                               content=f"# persona {i}\nprompt: You are agent number {i}.\nvoice:\n  preset: NATF{i % 4}\n")
                    for i in range(20)))
                history = (await client.get(f"{ADMIN}/tenants/acme/history")).json()["versions"]
        finally:
            stop.set()
            thread.join()
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200]
    assert not bad, bad[0]
    assert reads[0] > 20
    tenant, problems = load_tenant(root / "acme", ClipCache())
    assert not problems
    assert set(tenant.personas) == {"claims", "billing", *(f"p{i:02d}" for i in range(20))}
    assert path.read_text().startswith(ACME.rstrip("\n").rsplit("\nlimits:", 1)[0])
    assert [v["action"] for v in history] == ["write"] * 20 + ["baseline"]
    assert len({v["sha256"] for v in history}) == 21
    assert not [p for p in (root / "acme").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------ clips


async def test_clip_uploads_are_size_capped_validated_and_stored(gw):
    """A clip over max_clip_bytes is 413; a file that is not audio is 422 with the clip checker's
    message; a valid clip is stored as sent, can be read back, and a persona that uses it validates
    and serves with the prepared clip. Paths follow the schema's rules."""
    url, auth = f"{ADMIN}/tenants/acme/clips/voices/claims.wav", gw.as_("acme")
    r = await gw.client.put(url, content=b"\0" * (MAX_CLIP_BYTES + 1), headers=auth)
    assert r.status_code == 413 and r.json() == {"detail": f"the clip is larger than {MAX_CLIP_BYTES} bytes"}

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the stream is cut off
        for _ in range(100):
            yield b"\0" * 10_000
    r = await gw.client.put(url, content=chunks(), headers=auth)
    assert r.status_code == 413

    r = await gw.client.put(url, content=b"this is not audio at all" * 100, headers=auth)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("voice clip rejected: not a wav or flac file")
    assert r.json()["problems"][0].startswith("acme/voices/claims.wav: not a wav or flac file")
    silent = io.BytesIO()
    soundfile.write(silent, np.zeros(48_000), 16_000, format="WAV")
    r = await gw.client.put(url, content=silent.getvalue(), headers=auth)
    assert r.status_code == 422 and "clip is silent" in r.json()["detail"]
    assert not (gw.root / "acme" / "voices").exists()
    for bad in ("../bank/x.wav", "voices/claims.mp3", ".history/x.wav"):
        r = await gw.client.put(f"{ADMIN}/tenants/acme/clips/{bad}", content=b"x", headers=auth)
        assert r.status_code in (404, 422), bad  # '..' may be resolved by the client already

    wav = speech_like_wav()
    r = await gw.client.put(url, content=wav, headers=auth | {"Content-Type": "audio/wav"})
    assert r.status_code == 200, r.text
    assert (gw.root / "acme" / "voices" / "claims.wav").read_bytes() == wav
    r = await gw.client.get(url, headers=auth)
    assert r.content == wav and r.headers["content-type"] == "audio/wav"
    body = _dedent(CLAIMS).replace("voice: {preset: NATF0}", "voice: {clip: voices/claims.wav}")
    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/claims", content=body, headers=auth)
    assert r.status_code == 200, r.text
    claims = gw.app.state.registry.tenants["acme"].personas["claims"]
    assert claims.voice_clip is not None and abs(claims.voice_clip.seconds - 3.0) < 0.01


# ------------------------------------------------------------------------------------ history


async def test_history_lists_versions_and_rollback_restores_the_old_text_and_applies_it(gw):
    """Each write is a version (the file as first found is kept as the baseline); rolling back to
    the baseline restores its exact text, is recorded as a new version, and the registry serves the
    restored persona."""
    url, auth = f"{ADMIN}/tenants/acme/personas/billing", gw.as_("operator")
    r = await gw.client.put(url, content="prompt: Billing, version two.\nvoice: {preset: NATM1}\n", headers=auth)
    assert r.status_code == 200
    assert gw.app.state.registry.tenants["acme"].personas["billing"].prompt == "Billing, version two."
    versions = (await gw.client.get(f"{ADMIN}/tenants/acme/history", headers=auth)).json()["versions"]
    assert [(v["version"], v["action"], v["actor"], v["file"]) for v in versions] == [
        (2, "write", "operator", "tenant.yaml"), (1, "baseline", "filesystem", "tenant.yaml")]
    assert versions[1]["size"] == len(ACME.encode())
    r = await gw.client.get(f"{ADMIN}/tenants/acme/history/1", headers=auth)
    assert r.text == ACME

    r = await gw.client.post(f"{ADMIN}/tenants/acme/history/1/rollback", headers=gw.as_("acme"))
    assert r.status_code == 200, r.text
    assert r.json()["version"] | {"time": 0} == {
        "version": 3, "time": 0, "actor": "tenant:acme", "file": "tenant.yaml", "sha256": versions[1]["sha256"],
        "size": len(ACME.encode()), "action": "rollback", "from_version": 1}
    assert gw.acme_file.read_text() == ACME
    billing = gw.app.state.registry.tenants["acme"].personas["billing"]
    assert billing.prompt == "You answer billing questions for Acme Insurance."
    r = await gw.client.post(f"{ADMIN}/tenants/acme/history/99/rollback", headers=auth)
    assert r.status_code == 404


async def test_an_edit_made_by_hand_is_recorded_before_the_api_writes_over_it(gw):
    """A change made outside the API between two API writes is kept in the history as
    'external_edit', so it can be rolled back to."""
    await gw.client.put(f"{ADMIN}/tenants/acme/personas/billing", content="prompt: A.\nvoice: {preset: NATM1}\n",
                        headers=gw.as_("acme"))
    by_hand = gw.acme_file.read_text().replace("max_concurrent_calls: 5", "max_concurrent_calls: 7")
    gw.acme_file.write_text(by_hand)
    await gw.client.put(f"{ADMIN}/tenants/acme/personas/billing", content="prompt: B.\nvoice: {preset: NATM1}\n",
                        headers=gw.as_("acme"))
    versions = (await gw.client.get(f"{ADMIN}/tenants/acme/history", headers=gw.as_("acme"))).json()["versions"]
    assert [v["action"] for v in versions] == ["write", "external_edit", "write", "baseline"]
    assert (await gw.client.get(f"{ADMIN}/tenants/acme/history/3", headers=gw.as_("acme"))).text == by_hand
    assert "max_concurrent_calls: 7" in gw.acme_file.read_text()


async def test_history_keeps_the_last_versions_per_file(tmp_path):
    """With history_versions: 3, older versions and their stored copies are dropped."""
    from gateway.tenants.store import TenantStore

    store = TenantStore(tmp_path, history_versions=3)
    (tmp_path / "t").mkdir()
    for i in range(6):
        with store.transaction("t"):
            store.write("t", "tenant.yaml", f"v{i}\n".encode(), actor="operator")
    versions = store.history("t")
    assert [v.version for v in versions] == [4, 5, 6]
    assert store.content("t", 6)[1] == b"v5\n"
    assert len(list((tmp_path / "t" / ".history" / "blobs").iterdir())) == 3


# ------------------------------------------------------------------------------------ read-only, reload


def _read_only_prefix(root: Path) -> tuple[str, ...] | None:
    """How to run the gateway with ``root`` read-only: a read-only bind mount in a private mount
    namespace (the ConfigMap case), or for a non-root user file permissions; None if neither."""
    if shutil.which("unshare"):
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0"', str(root)],
                               capture_output=True, check=False)
        if probe.returncode == 0:
            return ("unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(root))
    if os.geteuid() != 0:
        for folder in [root, *root.iterdir()]:
            folder.chmod(0o555)
        return ()
    return None


@pytest.mark.e2e  # starts a process
async def test_a_read_only_tenants_folder_is_409_with_the_reason(tmp_path):
    """Where the tenants folder cannot be written (a Kubernetes ConfigMap mount), a valid write is
    refused with 409 and a reason that says what to do; reads still work."""
    root = write_tenants(tmp_path / "tenants")
    tokens = write_tokens(tmp_path / "tokens.yaml")
    prefix = _read_only_prefix(root)
    if prefix is None:
        pytest.skip("no way to make a read-only folder here (root without unshare)")
    try:
        with gateway_process(root, tokens.path, prefix=prefix) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30, headers=tokens.auth(tokens.acme)) as client:
                r = await client.put(f"{ADMIN}/tenants/acme/personas/billing",
                                     content="prompt: New.\nvoice: {preset: NATM1}\n")
                assert r.status_code == 409, r.text
                detail = r.json()["detail"]
                assert detail.startswith("cannot write acme/")
                assert "read-only for the gateway" in detail and "ConfigMap" in detail
                r = await client.put(f"{ADMIN}/tenants/acme/clips/voices/a.wav", content=speech_like_wav())
                assert r.status_code == 409
                r = await client.get(f"{ADMIN}/tenants/acme/personas/billing")
                assert r.status_code == 200
    finally:
        for folder in [root, *root.iterdir()]:
            folder.chmod(0o755)
    assert (root / "acme" / "tenant.yaml").read_text() == ACME


async def test_reload_status_shows_an_invalid_manual_edit(gw):
    """A hand edit that breaks acme's file keeps its last good configuration serving; the reload
    status says serving_previous with the problem as the validator prints it. A number clash names
    the other tenant to the operator, but not to acme's admin."""
    gw.acme_file.write_text(ACME.replace("temperature: 0.7", "temperature: 5.0"))
    r = await gw.client.post(f"{ADMIN}/reload", headers=gw.as_("operator"))
    assert r.status_code == 200
    status = r.json()
    assert status["ok"] is False and status["tenants"]["bank"] == {
        "state": "serving", "problems": [], "applied_at": status["tenants"]["bank"]["applied_at"]}
    line = _line_of(ACME, "temperature: 0.7")
    assert status["tenants"]["acme"]["state"] == "serving_previous"
    assert status["tenants"]["acme"]["problems"] == [
        f"acme/tenant.yaml:{line}:20: personas.claims.sampling.temperature: must be at most 1.2, got 5.0"]
    r = await gw.client.get(f"{ADMIN}/tenants/acme", headers=gw.as_("acme"))
    assert r.json()["state"] == "serving_previous" and r.json()["personas"] == ["billing", "claims"]
    assert gw.app.state.registry.tenants["acme"].personas["claims"].sampling.temperature == 0.7

    gw.acme_file.write_text(ACME.replace('"+14155550101": billing', '"+442071234567": billing'))
    await gw.client.post(f"{ADMIN}/reload", headers=gw.as_("acme"))
    line = _line_of(ACME, '"+14155550101"')
    operator_view = (await gw.client.get(f"{ADMIN}/reload", headers=gw.as_("operator"))).json()["tenants"]["acme"]
    acme_view = (await gw.client.get(f"{ADMIN}/reload", headers=gw.as_("acme"))).json()["tenants"]["acme"]
    assert operator_view["problems"] == [
        (f"acme/tenant.yaml:{line}:3: numbers.+442071234567: is also routed by tenant 'bank' (bank/tenant.yaml:4); "
        "expected each number in one tenant")]
    assert acme_view["problems"] == [
        (f"acme/tenant.yaml:{line}:3: numbers.+442071234567: is also routed by another tenant; "
        "expected each number in one tenant")]
    # an API write into a file that is invalid as a whole is refused until the file is fixed
    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/billing", content="prompt: x\nvoice: {preset: NATM1}\n",
                            headers=gw.as_("acme"))
    assert r.status_code == 422 and "another tenant" in r.json()["problems"][0]


async def test_metrics_count_admin_requests_by_route(gw):
    await gw.client.get(f"{ADMIN}/tenants/acme", headers=gw.as_("acme"))
    await gw.client.get(f"{ADMIN}/tenants/bank", headers=gw.as_("acme"))
    text = (await gw.client.get("/metrics")).text
    assert ('personagate_gateway_http_requests_total{method="GET",route="/v1/admin/tenants/{tenant}",status="403"} 1.0'
            in text)
    assert 'personagate_gateway_tenants_serving 2.0' in text


# ------------------------------------------------------------------------------------ settings


def test_gateway_settings_file_then_environment_then_flags(tmp_path, monkeypatch):
    """Defaults, then a YAML file, the environment (PERSONAGATE_GATEWAY_*) and flags, each overriding
    the one before; every bad value is reported on its own line."""
    s = load_gateway_settings()
    assert (s.host, s.http_port, s.tenants_dir, s.admin_tokens_file, s.max_clip_bytes, s.history_versions) == (
        "127.0.0.1", 8080, Path("tenants"), None, 5_000_000, 50)
    config = tmp_path / "gateway.yaml"
    config.write_text("http_port: 9000\ntenants_dir: /srv/tenants\nhistory_versions: 10\n")
    monkeypatch.setenv("PERSONAGATE_GATEWAY_HISTORY_VERSIONS", "20")
    s = load_gateway_settings(config, http_port=9100, tenants_dir=None)
    assert (s.http_port, s.tenants_dir, s.history_versions) == (9100, Path("/srv/tenants"), 20)
    config.write_text("http_port: 70000\nmax_clip_bytes: 1\nadmin_tokens: x\n")
    with pytest.raises(SettingsError) as err:
        load_gateway_settings(config)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid gateway settings:"
    assert {line.split(":")[0].strip() for line in lines[1:]} == {"http_port", "max_clip_bytes", "admin_tokens"}
    assert main(["gateway", "--config", str(tmp_path / "nope.yaml")]) == 2
