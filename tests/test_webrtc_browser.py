"""End to end through a real browser: Debian's Chromium (headless, driven by Playwright) opens the gateway's
call page, calls a persona with a fake microphone fed from a wav file, and hears the agent.

Protects what a tenant's website visitor or a tenant admin sees on ``/call``: the public per-persona link
preselects its persona, Call reaches the agent (status "Live"), the agent's audio plays and its time to first
audio is measured and shown, the live transcript fills in, and Hang up ends the call and frees the agent; a
private persona is refused with the gateway's reason until its admin gives a token; hanging up at once holds
no agent; the keypad's escalation key reaches the gateway and the page says how it went.

Everything is real and on loopback: a tiny-model worker, the gateway, Chromium. Nothing is downloaded: the
system Chromium is launched by path (``playwright install`` is never needed). With ``PERSONAGATE_SCREENSHOT``
set, the public call saves a screenshot of the page mid-call there.

Also a benchmark: ``python -m tests.test_webrtc_browser --calls 5`` places calls one after another and prints
each call's time to first audio and setup time as the page measured them (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import soundfile
import yaml

from tests.helpers.programs import needs
from tests.helpers.stack import readyz
from tests.helpers.wait import until
from tests.helpers.webrtc import Stack, tenant_copy, webrtc_stack

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
TENANTS = Path(__file__).resolve().parent.parent / "tenants"
TENANT = "harbor-mutual"
CALL_TIMEOUT = 30.0  # seconds from the click to a live call with agent audio and text

pytestmark = needs("chromium")


def public_persona() -> str:
    """The shipped harbor-mutual persona that takes calls from its public link (``public_link: true``)."""
    personas = yaml.safe_load((TENANTS / TENANT / "tenant.yaml").read_text())["personas"]
    public = [name for name, persona in personas.items() if persona.get("public_link")]
    assert public, f"no {TENANT} persona has public_link: true any more: give this test one"
    return public[0]


def caller_wav(path: Path) -> None:
    """Four seconds of speech-like caller audio at 48 kHz: 300 ms vowel-like bursts (a 150 Hz buzz with
    harmonics, its pitch gliding) every 500 ms. Chromium loops it as the fake microphone."""
    rate = 48_000
    t = np.arange(4 * rate) / rate
    pitch = 150 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(np.pi * (t % 0.5) / 0.3), 0, None) * ((t % 0.5) < 0.3)
    soundfile.write(path, 0.25 * envelope * voice / np.max(np.abs(voice)), rate, subtype="PCM_16")


def chromium_args(wav: Path) -> list[str]:
    return ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
            # ICE host candidates on 127.0.0.1 too: a machine (or container) may have no other interface
            "--allow-loopback-in-peer-connection",
            "--disable-dev-shm-usage"]  # containers often have a small /dev/shm, which crashes Chromium's tabs


@contextlib.contextmanager
def browser_stack(folder: Path) -> Iterator[Stack]:
    """``tests.test_webrtc.webrtc_stack`` with one slot and the shipped tenants (copied into ``folder``, Harbor Mutual
    open at every hour: the page must show the same call whenever the test runs), ICE on 127.0.0.1 only (a machine,
    or a container, may have no other interface)."""
    tenant_copy(folder / "tenants", harbor_always_open=True)
    with webrtc_stack(folder, {"PERSONAGATE_GATEWAY_WEBRTC_ICE_INTERFACES": '["127.0.0.1"]'}, slots=1) as stack:
        yield stack


def slots_free(http: str) -> int:
    return readyz(http)["slots_free"]


@contextlib.contextmanager
def browser_page(wav: Path) -> Iterator[tuple[Page, list[str]]]:
    """A Chromium page (900x700) whose microphone plays ``wav``, and the list its uncaught errors and console errors
    go to."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(wav))
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            # console errors too: a Content-Security-Policy violation, a failed request
            page.on("console", lambda message: errors.append(f"console: {message.text} at {message.location['url']}")
                    if message.type == "error" else None)
            yield page, errors
        finally:
            browser.close()


# On Hang up the page sends {"type": "hangup"} on the data channel and then DELETEs the call; the gateway may end
# the call on the message before the DELETE arrives and answer that 404, which the browser logs. Nothing the
# caller sees: the one error that is not counted.
DELETE_AFTER_HANGUP = re.compile(r"status of 404 .* at http://[^ ]+/v1/webrtc/calls/webrtc-[0-9a-f]+$")


def unexpected(errors: list[str]) -> list[str]:
    return [error for error in errors if not DELETE_AFTER_HANGUP.search(error)]


def wait_for(page: Page, expression: str, timeout: float) -> None:
    """Poll ``expression`` until it is true. (Playwright's wait_for_function evaluates its string in the page, which
    the page's Content-Security-Policy rightly forbids: the test keeps that policy in force.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still not true after {timeout} s: {expression}")
        page.wait_for_timeout(20)


def open_link(page: Page, http: str, tenant: str, persona: str) -> None:
    """Open the page's link for ``tenant/persona`` and wait for its persona list; the link preselects it."""
    page.goto(f"{http}/call?tenant={tenant}&persona={persona}")
    wait_for(page, "document.getElementById('persona').options.length > 0", timeout=10)
    assert page.input_value("#persona") == f"{tenant}/{persona}"


def call_until_heard(page: Page) -> None:
    """Click Call; wait until the call is live with the agent's audio heard and some of its text shown."""
    assert page.is_enabled("#call")
    page.click("#call")
    try:
        wait_for(page, "(c => c.state === 'live' && c.firstAudioMs !== null && c.transcript.trim() !== '')"
                       "(window.personagateCall)", timeout=CALL_TIMEOUT)
    except TimeoutError as error:
        raise AssertionError(f"no live call with audio and text: {page_state(page)}") from error


def hang_up(page: Page) -> str:
    """Click Hang up; the status line once the call has ended."""
    page.click("#hangup")
    wait_for(page, "window.personagateCall.state === 'ended'", timeout=5)
    return page.text_content("#status") or ""


def place_call(page: Page, http: str, persona: str, *, talk_seconds: float = 0.0, screenshot: str | None = None) -> dict:
    """Open the persona's public link, call, wait for the agent's audio and text, optionally stay on the call and
    save a screenshot, hang up; returns ``window.personagateCall`` as it was mid-call, and the status at the end."""
    open_link(page, http, TENANT, persona)
    call_until_heard(page)
    time.sleep(talk_seconds)
    live = page_state(page)
    if screenshot:
        page.screenshot(path=screenshot)
    return live | {"ended_status": hang_up(page)}


def page_state(page: Page) -> dict:
    return page.evaluate("({...window.personagateCall, status: document.getElementById('status').textContent,"
                         " shown_first_audio: document.getElementById('first-audio').textContent})")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with browser_stack(tmp_path_factory.mktemp("browser")) as stack:
        yield stack


@pytest.fixture(scope="module")
def stack(gateway: Stack) -> str:
    """The gateway's HTTP address."""
    return gateway.http


@pytest.fixture(scope="module")
def admin_token(gateway: Stack) -> str:
    """A harbor-mutual admin's token, known to the gateway."""
    return gateway.admin_token


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Page, list[str]]]:
    wav = tmp_path_factory.mktemp("caller") / "caller.wav"
    caller_wav(wav)
    with browser_page(wav) as (page, errors):
        yield page, errors


def test_a_browser_calls_a_public_persona_hears_the_agent_and_reads_its_transcript(
        stack: str, browser: tuple[Page, list[str]]) -> None:
    """A visitor following a tenant's public link calls the persona, hears it (time to first audio shown), reads
    its live transcript, and hangs up, which frees the agent for the next caller."""
    page, errors = browser
    errors.clear()
    call = place_call(page, stack, public_persona(), talk_seconds=2.0,
                      screenshot=os.environ.get("PERSONAGATE_SCREENSHOT"))
    print(f"browser call: first audio {call['firstAudioMs']:.0f} ms after the click, ready after "
          f"{call['setupMs']:.0f} ms (the gateway's part {call['serverSetupMs']} ms); "
          f"transcript {call['transcript']!r}")
    assert call["status"] == "Live" and call["error"] is None, call
    assert isinstance(call["firstAudioMs"], float | int) and 0 < call["firstAudioMs"] < CALL_TIMEOUT * 1000, call
    assert call["shown_first_audio"] == f"{math.floor(call['firstAudioMs'] + 0.5)} ms", call  # JS Math.round
    assert 0 < call["setupMs"] <= call["firstAudioMs"], call
    assert call["transcript"].strip(), call
    assert call["ended_status"] == "Ended: hangup", call
    # hanging up gives the agent back: the next caller gets it
    until(lambda: slots_free(stack) == 1, "the hung-up call's slot is free again", timeout=10)
    assert unexpected(errors) == []
    assert refused_hangups(stack) == 0  # the page hangs up with the call's secret


def refused_hangups(http: str) -> float:
    """Hang-ups the gateway refused for want of the call's secret (it has no other client than the page here)."""
    metrics = httpx.get(f"{http}/metrics", timeout=5).text
    line = next(line for line in metrics.splitlines()
                if line.startswith('personagate_gateway_webrtc_refusals_total{reason="hangup_forbidden"}'))
    return float(line.split()[-1])


def test_a_private_persona_is_refused_without_a_token_and_called_by_its_tenant_admin(
        stack: str, admin_token: str, browser: tuple[Page, list[str]]) -> None:
    """A tenant admin hears a persona before putting it on a number: without the token the page shows the
    gateway's refusal (HTTP status and detail); with it, the list shows the tenant's private personas and the
    call goes through."""
    page, errors = browser
    errors.clear()
    private = next(name for name in yaml.safe_load((TENANTS / TENANT / "tenant.yaml").read_text())["personas"]
                   if name != public_persona())
    open_link(page, stack, TENANT, private)
    assert f"{private} (private)" not in page.eval_on_selector_all("#persona option", "os => os.map(o => o.label)")
    page.click("#call")
    wait_for(page, "window.personagateCall.state === 'ended'", timeout=10)
    assert page.text_content("#status") == "Ended: failed"
    shown = page.text_content("#error") or ""
    # a private persona is a 404 to anyone without its tenant's token, as one that does not exist (no discovery
    # by guessing); the detail still tells an admin what to do
    assert shown.startswith("HTTP 404: ") and "admin token" in shown, shown
    assert page.is_visible("#error")

    page.click("#admin summary")
    page.fill("#token", admin_token)
    page.click("#load")
    wait_for(page, f"[...document.querySelectorAll('#persona option')].some(o => o.label === '{private} (private)')",
             timeout=10)
    assert page.input_value("#persona") == f"{TENANT}/{private}"
    assert page.evaluate("sessionStorage.getItem('personagate.token')") == admin_token
    call_until_heard(page)
    assert page_state(page)["error"] is None and not page.is_visible("#error")
    assert hang_up(page) == "Ended: hangup"
    until(lambda: slots_free(stack) == 1, "the hung-up call's slot is free again", timeout=10)
    assert len(unexpected(errors)) == 1 and "status of 404" in errors[0], errors  # the refused offer, nothing else


def test_hanging_up_while_connecting_leaves_no_call_behind(stack: str, browser: tuple[Page, list[str]]) -> None:
    """A caller who hangs up at once (while the page is still connecting) sees the call end, and no agent is left
    held for them: the slot comes back, and the next call from the page goes through; a caller who closes the
    page mid-call holds no agent either."""
    page, errors = browser
    errors.clear()
    persona = public_persona()
    for delay_ms in (0, 50, 150):  # before the offer, around the POST, while the media connects
        open_link(page, stack, TENANT, persona)
        page.click("#call")
        page.wait_for_timeout(delay_ms)
        assert hang_up(page) == "Ended: hangup"
        until(lambda: slots_free(stack) == 1, "no slot is held for the abandoned call", timeout=10)
    open_link(page, stack, TENANT, persona)
    call_until_heard(page)
    page.goto("about:blank")  # the page goes away mid-call: its pagehide hangs up
    until(lambda: slots_free(stack) == 1, "the closed page's slot is free again", timeout=5)
    assert unexpected(errors) == []
    assert refused_hangups(stack) == 0


def test_the_keypad_asks_for_a_person_and_the_page_says_how_it_went(stack: str, browser: tuple[Page, list[str]]
                                                                     ) -> None:
    """Pressing the tenant's escalation key on the page's keypad asks the gateway for a person; this gateway has
    SIP off, so none can be called: the page says so and the caller stays with the agent."""
    page, errors = browser
    errors.clear()
    digit = str(yaml.safe_load((TENANTS / TENANT / "tenant.yaml").read_text())["escalation"]["dtmf_digit"])
    open_link(page, stack, TENANT, public_persona())
    assert page.is_disabled(f"#keypad [data-digit='{digit}']")  # no call, no keys
    call_until_heard(page)
    page.click(f"#keypad [data-digit='{digit}']")
    wait_for(page, "document.getElementById('status').textContent.includes('no person')", timeout=10)
    assert page.text_content("#status") == "Live: no person could take the call (unavailable)"
    assert page.text_content("#digits") == digit
    heard = page.evaluate("window.personagateCall.transcript.length")
    wait_for(page, f"window.personagateCall.transcript.length > {heard}", timeout=10)  # the agent talks on
    assert hang_up(page) == "Ended: hangup"
    assert unexpected(errors) == []


def gateway_first_audio_seconds(http: str) -> float:
    """The sum of the gateway's own offer → first agent audio queued for the browser, over its calls so far."""
    metrics = httpx.get(f"{http}/metrics", timeout=5).text
    line = next(line for line in metrics.splitlines()
                if line.startswith('personagate_gateway_front_end_first_agent_audio_seconds_sum{front_end="webrtc"}'))
    return float(line.split()[-1])


def main() -> None:
    """Place one call on a fresh stack (cold: the persona's first priming on the worker), then ``--calls`` more one
    after another, and print each call's figures as the page measured them (and the gateway's own offer → first
    agent audio queued, from its metrics); the summary covers the calls after the first."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--screenshot", help="save a screenshot of the second call, mid-call, to this PNG")
    args = parser.parse_args()
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    persona = public_persona()
    calls = []
    with tempfile.TemporaryDirectory() as folder:
        caller_wav(Path(folder) / "caller.wav")
        with browser_stack(Path(folder)) as gateway, browser_page(Path(folder) / "caller.wav") as (page, _):
            http = gateway.http
            for n in range(1 + args.calls):
                screenshot = args.screenshot if n == 1 else None  # a few seconds in: some transcript to show
                before = gateway_first_audio_seconds(http)
                call = place_call(page, http, persona, talk_seconds=3.0 if screenshot else 1.0, screenshot=screenshot)
                figures = {k: round(call[k]) for k in ("firstAudioMs", "setupMs", "serverSetupMs")}
                figures["gatewayFirstAudioMs"] = round((gateway_first_audio_seconds(http) - before) * 1000)
                # after the gateway queued the agent's first audio: pacer, Opus, loopback, Chrome's jitter
                # buffer and playout, the page's meter (the click → offer part is setupMs - serverSetupMs)
                figures["afterGatewayMs"] = (figures["firstAudioMs"] - (figures["setupMs"] - figures["serverSetupMs"])
                                             - figures["gatewayFirstAudioMs"])
                calls.append(figures)
                print(("first call " if n == 0 else "") + json.dumps(figures), flush=True)
                until(lambda: slots_free(http) == 1, "the slot is free again", timeout=10)
    for key in calls[0]:
        values = [c[key] for c in calls[1:]]
        print(f"{key} over {len(values)} calls after the first: median {statistics.median(values):.0f} ms, "
              f"min {min(values):.0f}, max {max(values):.0f}")


if __name__ == "__main__":
    main()
