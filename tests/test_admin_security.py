"""The admin API against hostile clients: wrong tokens throttled per address and per token prefix (429 with
Retry-After, in bounded memory), an audit log of every write attempt and refused login that each viewer reads
only as far as its token reaches, no server path in any answer, clip paths and clips that lie refused with a
4xx, and /docs served with no CDN.

In-process (httpx over ASGI), the throttle's clock a fake one moved by the tests; the browser check of /docs runs
a real gateway process and Debian's Chromium, which may reach nothing but the gateway.
"""

from __future__ import annotations

import asyncio
import collections
import io
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from gateway.admin.audit import AuditLog
from gateway.admin.throttle import FailureThrottle, retry_after, source_key
from gateway.admin.tokens import new_token
from gateway.config import GatewaySettings, SettingsError, load_gateway_settings
from tests.helpers.admin_api import (
    ADMIN,
    PERSONA,
    PLAIN_ACME,
    admin_gateway,
    gateway_process,
    speech_like_wav,
    write_tenants,
    write_tokens,
)
from tests.helpers.programs import needs


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _wrong() -> dict[str, str]:
    return {"Authorization": f"Bearer {new_token()[0]}"}


# ------------------------------------------------------------------------------------ the throttle itself


def test_a_key_is_held_after_its_burst_and_released_as_failures_are_forgiven():
    """``burst`` failures pass unheld; the next is held for the time one failure takes to be forgiven; waiting
    that long lets exactly one more attempt be checked. Other keys are not affected."""
    clock = FakeClock()
    throttle = FailureThrottle(burst=3, per_minute=6, clock=clock)  # one failure forgiven every 10 s
    assert [throttle.failed("a") for _ in range(3)][:2] == [0.0, 0.0]
    assert throttle.held("a") == pytest.approx(10.0)
    assert throttle.held("b") == 0.0
    clock.now += 10
    assert throttle.held("a") == 0.0
    assert throttle.failed("a") == pytest.approx(10.0)
    assert throttle.held("b", "a") == pytest.approx(10.0)  # held while any of the keys is
    assert retry_after(0.2) == "1" and retry_after(10.0) == "10" and retry_after(10.01) == "11"


def test_the_throttle_remembers_at_most_max_keys_and_forgets_forgiven_keys_first():
    """Memory is bounded whatever the number of sources or prefixes; when it is full, keys that have waited out
    their failures go first, so a key still held is not forgotten while such keys remain."""
    clock = FakeClock()
    throttle = FailureThrottle(burst=2, per_minute=60, max_keys=100, clock=clock)  # one failure forgiven a second
    for _ in range(3):
        throttle.failed("guesser")
    for i in range(99):
        throttle.failed(f"old-{i}")
    clock.now += 1.5  # the old keys' single failures are forgiven; the guesser is still held
    throttle.failed("new-0")
    assert len(throttle) == 2 and throttle.held("guesser") == pytest.approx(0.5)
    for i in range(1, 10_000):
        throttle.failed(f"new-{i}")
        assert len(throttle) <= 100


def test_a_source_is_an_ipv4_address_or_an_ipv6_64():
    """One subscriber's IPv6 network is one source: it cannot escape the throttle by changing address."""
    assert source_key("2001:db8:1:2::5") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("testclient") == "testclient"


# ------------------------------------------------------------------------------------ throttling through the API


async def test_wrong_tokens_from_one_address_get_429_with_retry_after_even_for_the_right_token(tmp_path):
    """A guessing attack: 300 wrong tokens in a row. After the burst every attempt from that address is 429 with
    Retry-After, unchecked — the right token too, so a guesser learns nothing — while other addresses are served.
    Once Retry-After has passed, the right token works again. Every refusal is counted."""
    clock = FakeClock()
    async with admin_gateway(tmp_path, clock=clock, admin_auth_failure_burst=10,
                             admin_auth_failures_per_minute=6) as gw:
        statuses = []
        for _ in range(300):
            r = await gw.client.get(f"{ADMIN}/tenants", headers=_wrong())
            statuses.append(r.status_code)
        assert statuses[:10] == [401] * 10
        assert set(statuses[10:]) == {429}
        r = await gw.client.get(f"{ADMIN}/tenants/acme", headers=gw.as_("acme"))
        assert r.status_code == 429, r.text
        wait = int(r.headers["retry-after"])
        assert 1 <= wait <= 10
        assert "try again in" in r.json()["detail"]
        async with gw.client_from("198.51.100.20") as other:
            assert (await other.get(f"{ADMIN}/tenants/acme", headers=gw.as_("acme"))).status_code == 200
        clock.now += wait
        assert (await gw.client.get(f"{ADMIN}/tenants/acme", headers=gw.as_("acme"))).status_code == 200
        assert gw.sample("personagate_gateway_auth_failures_total", reason="invalid_token") == 10
        assert gw.sample("personagate_gateway_auth_failures_total", reason="throttled") == 291
        assert gw.sample("personagate_gateway_admin_refusals_total", reason="throttled") == 291
        assert gw.sample("personagate_gateway_admin_refusals_total", reason="unauthenticated") == 10


async def test_wrong_tokens_sent_all_at_once_are_checked_no_more_than_the_burst(tmp_path):
    """Concurrency does not widen the burst: of 100 wrong tokens sent at once, 10 are checked (401), the rest are
    429. Right tokens cost nothing: 100 sent at once from one address are all served."""
    async with admin_gateway(tmp_path, clock=FakeClock(), admin_auth_failure_burst=10) as gw:
        async with gw.client_from("198.51.100.30") as admin:
            served = await asyncio.gather(*(admin.get(f"{ADMIN}/tenants", headers=gw.as_("acme")) for _ in range(100)))
            assert {r.status_code for r in served} == {200}
        answers = await asyncio.gather(*(gw.client.get(f"{ADMIN}/tenants", headers=_wrong()) for _ in range(100)))
        statuses = collections.Counter(r.status_code for r in answers)
        assert statuses == {401: 10, 429: 90}, statuses


async def test_guessing_one_tokens_prefix_from_many_addresses_is_held_on_that_prefix(tmp_path):
    """A distributed guesser who knows the start of acme's token (a truncated log line) gets 10 tries on that
    prefix in all, whatever its number of addresses; then that prefix is held for everyone — acme's own token
    included, for the penalty — while other tokens are unaffected."""
    clock = FakeClock()
    async with admin_gateway(tmp_path, clock=clock, admin_auth_failure_burst=10) as gw:
        prefix = gw.tokens.acme[:8]
        statuses = []
        for i in range(40):
            async with gw.client_from(f"192.0.2.{i + 1}") as client:
                guess = prefix + new_token()[0][8:]
                statuses.append((await client.get(f"{ADMIN}/tenants", headers=gw.tokens.auth(guess))).status_code)
        assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}
        async with gw.client_from("192.0.2.200") as fresh:
            assert (await fresh.get(f"{ADMIN}/tenants", headers=gw.as_("acme"))).status_code == 429
            assert (await fresh.get(f"{ADMIN}/tenants", headers=gw.as_("bank"))).status_code == 200
            clock.now += 60
            assert (await fresh.get(f"{ADMIN}/tenants", headers=gw.as_("acme"))).status_code == 200


async def test_the_throttle_stays_bounded_under_many_sources_and_prefixes(tmp_path):
    """Wrong tokens from a thousand addresses, each a new prefix: the throttle keeps at most its configured number
    of addresses and of prefixes, and every answer is still a 401 or a 429."""
    async with admin_gateway(tmp_path, admin_auth_tracked_keys=100) as gw:
        admin = gw.app.state.admin
        for i in range(1000):
            async with gw.client_from(f"10.{i // 250}.{i % 250}.1") as client:
                r = await client.get(f"{ADMIN}/tenants", headers=_wrong())
                assert r.status_code in (401, 429)
        assert len(admin.sources) <= 100 and len(admin.prefixes) <= 100


async def test_wrong_tokens_on_the_browser_call_api_meet_the_same_throttle(tmp_path):
    """The browser call API shares the token check: guessing there is throttled as on the admin API."""
    clock = FakeClock()
    async with admin_gateway(tmp_path, clock=clock, admin_auth_failure_burst=5) as gw:
        statuses = [(await gw.client.get("/v1/webrtc/personas", headers=_wrong())).status_code for _ in range(8)]
        assert statuses == [401] * 5 + [429] * 3
        assert (await gw.client.get(f"{ADMIN}/tenants", headers=gw.as_("operator"))).status_code == 429


def test_throttle_and_audit_settings_are_validated_and_read_from_the_environment(monkeypatch):
    """The new settings have the usual env names and are checked at start."""
    monkeypatch.setenv("PERSONAGATE_GATEWAY_ADMIN_AUTH_FAILURE_BURST", "4")
    monkeypatch.setenv("PERSONAGATE_GATEWAY_ADMIN_AUTH_FAILURES_PER_MINUTE", "2.5")
    settings = load_gateway_settings()
    assert (settings.admin_auth_failure_burst, settings.admin_auth_failures_per_minute) == (4, 2.5)
    monkeypatch.setenv("PERSONAGATE_GATEWAY_ADMIN_AUTH_FAILURE_BURST", "0")
    with pytest.raises(SettingsError, match="admin_auth_failure_burst"):
        load_gateway_settings()
    monkeypatch.delenv("PERSONAGATE_GATEWAY_ADMIN_AUTH_FAILURE_BURST")
    assert GatewaySettings(admin_audit_entries=100).admin_audit_entries == 100


# ------------------------------------------------------------------------------------ the audit log


async def test_the_audit_log_records_writes_and_refusals_and_each_viewer_sees_its_own(tmp_path):
    """Persona PUT and DELETE, a clip upload, a rollback and a reload are recorded with who, from where, what,
    the version written and the result; so are refused attempts (invalid body, another tenant's token, a wrong
    token, no token). The operator reads them all; acme's admin only acme's, with bank's admin not named; bank's
    admin none of acme's."""
    async with admin_gateway(tmp_path, client_address="198.51.100.7") as gw:
        acme, op = gw.as_("acme"), gw.as_("operator")
        base = f"{ADMIN}/tenants/acme"
        assert (await gw.client.put(f"{base}/personas/billing", content=PERSONA, headers=acme)).status_code == 200
        assert (await gw.client.put(f"{base}/personas/billing", content=PERSONA, headers=acme)).status_code == 200
        r = await gw.client.put(f"{base}/personas/bad", content="prompt: [unclosed\n", headers=acme)
        assert r.status_code == 422
        assert (await gw.client.put(f"{base}/clips/voices/sam.wav", content=speech_like_wav(),
                                    headers=acme)).status_code == 200
        assert (await gw.client.delete(f"{base}/personas/billing", headers=op)).status_code == 200
        history = (await gw.client.get(f"{base}/history", headers=acme)).json()["versions"]
        first = next(v["version"] for v in reversed(history) if v["file"] == "tenant.yaml" and v["action"] == "write")
        assert (await gw.client.post(f"{base}/history/{first}/rollback", headers=acme)).status_code == 200
        assert (await gw.client.put(f"{base}/personas/x", content=PERSONA, headers=gw.as_("bank"))).status_code == 403
        assert (await gw.client.put(f"{base}/personas/x", content=PERSONA, headers=_wrong())).status_code == 401
        assert (await gw.client.delete(f"{base}/personas/claims")).status_code == 401
        assert (await gw.client.post(f"{ADMIN}/reload", headers=op)).status_code == 200
        r = await gw.client.put(f"{ADMIN}/tenants/bank/personas/cards",
                                content="prompt: Cards.\nvoice: {preset: VARF1}\n", headers=gw.as_("bank"))
        assert r.status_code == 200

        everything = (await gw.client.get(f"{ADMIN}/audit", headers=op)).json()["entries"]
        rows = [(e["actor"], e["action"], e["tenant"], e["target"], e["status"], e["result"])
                for e in reversed(everything)]
        assert rows == [
            ("tenant:acme", "put_persona", "acme", "billing", 200, "applied"),
            ("tenant:acme", "put_persona", "acme", "billing", 200, "unchanged"),
            ("tenant:acme", "put_persona", "acme", "bad", 422, "refused"),
            ("tenant:acme", "put_clip", "acme", "voices/sam.wav", 200, "applied"),
            ("operator", "delete_persona", "acme", "billing", 200, "applied"),
            ("tenant:acme", "rollback", "acme", f"version {first}", 200, "applied"),
            ("tenant:bank", "put_persona", "acme", "x", 403, "refused"),
            (None, "login", "acme", f"PUT {base}/personas/x", 401, "refused"),
            (None, "login", "acme", f"DELETE {base}/personas/claims", 401, "refused"),
            ("operator", "reload", None, None, 200, "applied"),
            ("tenant:bank", "put_persona", "bank", "cards", 200, "applied"),
        ]
        assert all(e["source"] == "198.51.100.7" for e in everything)
        applied = [e for e in everything if e["result"] == "applied" and e["action"] != "reload"]
        assert all(isinstance(e["version"], int) for e in applied)
        assert everything[-3]["detail"].startswith("persona invalid")

        seen_by_acme = (await gw.client.get(f"{ADMIN}/audit", headers=acme)).json()["entries"]
        assert {e["tenant"] for e in seen_by_acme} == {"acme"}
        assert len(seen_by_acme) == 9
        assert "tenant:bank" not in str(seen_by_acme) and "another tenant" in {e["actor"] for e in seen_by_acme}
        seen_by_bank = (await gw.client.get(f"{ADMIN}/audit", headers=gw.as_("bank"))).json()["entries"]
        assert [(e["action"], e["tenant"]) for e in seen_by_bank] == [("put_persona", "bank")]
        assert (await gw.client.get(f"{ADMIN}/audit?tenant=acme", headers=gw.as_("bank"))).status_code == 403
        assert len((await gw.client.get(f"{ADMIN}/audit?limit=2", headers=op)).json()["entries"]) == 2


def test_the_audit_log_is_bounded_and_logins_cannot_push_changes_out():
    """A flood of refused logins fills its own ring; the record of changes keeps its entries."""
    audit = AuditLog(changes=100, logins=10)
    audit.record(actor="operator", source="a", action="put_persona", tenant="acme", target="p", status=200,
                 result="applied", version=1)
    for _ in range(5000):
        audit.record(actor=None, source="b", action="login", tenant=None, target="GET /", status=401,
                     result="refused")
    entries = audit.read(None, limit=1000)
    assert len(entries) == 11 and entries[-1].action == "put_persona"


# ------------------------------------------------------------------------------------ paths and clips


async def test_a_nul_or_control_character_in_a_clip_path_is_422(tmp_path):
    """A NUL byte in a clip path was a 500; it is a 422 saying why, on upload and on read, and in a persona that
    names the clip; nothing is written."""
    async with admin_gateway(tmp_path) as gw:
        for path in ("voices/a%00b.wav", "voices/a%00.wav", "voices%00/x.wav", "voices/a%01b.wav"):
            for method in ("PUT", "GET"):
                r = await gw.client.request(method, f"{ADMIN}/tenants/acme/clips/{path}",
                                            content=speech_like_wav() if method == "PUT" else None,
                                            headers=gw.as_("acme"))
                assert r.status_code == 422, (method, path, r.text)
                assert "control character" in r.json()["detail"]
        r = await gw.client.put(f"{ADMIN}/tenants/acme/clips/voices/a%0Ab.wav", content=b"x", headers=gw.as_("acme"))
        assert r.status_code == 404  # a line break matches no route
        persona = 'prompt: Hi.\nvoice: {clip: "voices/a\\0b.wav"}\n'  # YAML's escape for a NUL
        r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/nul", content=persona, headers=gw.as_("acme"))
        assert r.status_code == 422 and "control character" in r.text, r.text
        assert not (gw.root / "acme" / "voices").exists()


def _lying_wav(seconds: float = 5.0, extra: int = 3_640_000) -> bytes:
    """A valid wav of ``seconds`` whose file goes on for ``extra`` bytes its header does not declare."""
    wav = speech_like_wav(seconds)
    return wav + np.random.default_rng(1).integers(0, 256, extra, dtype=np.uint8).tobytes()


async def test_a_clip_holding_more_than_its_header_declares_is_refused(tmp_path):
    """A wav whose header says 5 s (160 KB) in a 3.8 MB file was stored: it is refused with 422, whether the extra
    bytes follow the RIFF chunk or the RIFF size covers them; nothing is stored. An honest clip with a little
    metadata is still taken."""
    async with admin_gateway(tmp_path) as gw:
        trailing = _lying_wav()
        covered = bytearray(trailing)
        covered[4:8] = struct.pack("<I", len(covered) - 8)
        for body in (trailing, bytes(covered)):
            assert len(body) > 3_800_000
            started = time.monotonic()
            r = await gw.client.put(f"{ADMIN}/tenants/acme/clips/voices/lying.wav", content=body,
                                    headers=gw.as_("acme"))
            assert r.status_code == 422, r.text
            assert "declares 5.00 s of audio" in r.json()["detail"]
            assert time.monotonic() - started < 30  # refused from the header, not after decoding: generous bound
        assert not (gw.root / "acme" / "voices").exists()
        honest = speech_like_wav(5.0)
        with_metadata = honest + b"LIST" + struct.pack("<I", 2000) + b"INFO" + b"\0" * 1996
        r = await gw.client.put(f"{ADMIN}/tenants/acme/clips/voices/honest.wav", content=with_metadata,
                                headers=gw.as_("acme"))
        assert r.status_code == 200, r.text


def test_honest_flac_and_float_wav_clips_pass_the_holds_only_audio_check():
    """Compressed and wide-sample files are judged by what their header declares, not refused for their size."""
    from personagate_common.voices import prepare_clip

    rate = 48_000
    t = np.arange(4 * rate) / rate
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * 0.5 * (1 - np.cos(2 * np.pi * 4 * t))
    for fmt, subtype in (("FLAC", "PCM_24"), ("WAV", "FLOAT"), ("WAV", "PCM_16")):
        out = io.BytesIO()
        soundfile.write(out, np.stack([audio, audio], axis=1), rate, format=fmt, subtype=subtype)
        assert prepare_clip(out.getvalue()).seconds == pytest.approx(4.0)


# ------------------------------------------------------------------------------------ /docs offline


async def test_docs_are_served_by_the_gateway_with_no_external_host(tmp_path):
    """/docs names no other host: its scripts, stylesheet, icon and the OpenAPI document it reads all come from
    the gateway (200, non-empty), so the page works offline. The document it reads is OpenAPI 3.0 (what the
    bundled Swagger UI renders) with every admin path; /openapi.json stays 3.1."""
    async with admin_gateway(tmp_path) as gw:
        r = await gw.client.get("/docs")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = r.text
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page, re.IGNORECASE), page
        urls = re.findall(r'(?:src|href)="([^"]+)"', page) + re.findall(r'url: "([^"]+)"', page)
        assert len(urls) >= 4, urls
        for url in urls:
            assert url.startswith("/"), url
            asset = await gw.client.get(url)
            assert asset.status_code == 200 and asset.content, url
        spec = (await gw.client.get(next(u for u in urls if u.endswith(".json")))).json()
        assert spec["openapi"].startswith("3.0")
        assert "/v1/admin/audit" in spec["paths"] and "/v1/admin/tenants/{tenant}/clips/{path}" in spec["paths"]
        assert '"type": "null"' not in str(spec).replace("'", '"')
        assert (await gw.client.get("/openapi.json")).json()["openapi"].startswith("3.1")
        assert (await gw.client.get("/redoc")).status_code == 404  # it would load a CDN: not served


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.e2e  # starts a process
@needs("chromium")
def test_docs_render_in_a_browser_that_can_reach_nothing_but_the_gateway(tmp_path):
    """Swagger UI renders the admin API (its title, its operations, no error box) in Chromium with every request
    to another host refused, and the page asks for none."""
    from playwright.sync_api import Route, sync_playwright

    root = write_tenants(tmp_path / "tenants", acme=PLAIN_ACME)
    tokens = write_tokens(tmp_path / "tokens.yaml")
    with gateway_process(root, tokens.path) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            elsewhere: list[str] = []

            def only_the_gateway(route: Route) -> None:
                if route.request.url.startswith(base):
                    route.continue_()
                else:
                    elsewhere.append(route.request.url)
                    route.abort()

            page.route("**/*", only_the_gateway)
            page.goto(f"{base}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            assert "personagate gateway" in page.inner_text(".info .title")
            assert page.locator(".opblock").count() >= 13
            assert page.locator(".errors-wrapper").count() == 0
            assert elsewhere == []
        finally:
            browser.close()
