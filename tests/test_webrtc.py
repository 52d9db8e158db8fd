"""Browser calls with real peers on loopback: a `personagate worker` (the tiny model), a `personagate gateway`,
and an aiortc peer connection in the test as the browser (Opus, ICE, DTLS-SRTP, a data channel: what a browser
speaks), posting its offer to the gateway's HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import time
from collections.abc import AsyncIterator, Iterator

import aioice.stun
import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from gateway.admin.throttle import source_key
from gateway.webrtc.api import OfferRateLimit, public_cap
from gateway.webrtc.ice import CandidatePolicy, bound_remote_candidates, candidate_policy, restrict_host_addresses
from gateway.webrtc.offer import OfferError, check_offer, read_offer
from tests.helpers.webrtc import (
    CLOSED,
    LOUD_RMS,
    PRIVATE,
    PUBLIC,
    Stack,
    browser,
    hang_up,
    metrics,
    place,
    tenant_copy,
    webrtc_stack,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("webrtc")
    tenant_copy(folder / "tenants", harbor_limit=1, bank_public_and_closed=True)
    with webrtc_stack(folder, {"PERSONAGATE_GATEWAY_WEBRTC_MEDIA_TIMEOUT_SECONDS": "2",
                               "PERSONAGATE_GATEWAY_WEBRTC_CONNECT_TIMEOUT_SECONDS": "2",
                               "PERSONAGATE_GATEWAY_WEBRTC_OFFERS_PER_MINUTE": "1000"}) as addresses:
        yield addresses


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.http, timeout=30) as client:
        yield client


async def until_idle(http: httpx.AsyncClient) -> None:
    """Until the gateway has no browser call and the worker's slots are free again."""
    deadline = time.monotonic() + 15
    while (await metrics(http)).get('personagate_gateway_front_end_calls_active{front_end="webrtc"}') or \
            (await http.get("/readyz")).json().get("slots_free") != 2:
        assert time.monotonic() < deadline, "the gateway did not end the call"
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------- calls


async def test_browser_call_hears_the_agent_and_sees_its_transcript(stack: Stack, http: httpx.AsyncClient) -> None:
    """A caller on the public link is answered, hears the agent within a second, reads its words as they are
    spoken, and hangs up; the slot is free again at once."""
    async with browser() as call:
        response = await place(http, call, *PUBLIC)
        assert response.status_code == 201, response.text
        assert response.headers["content-type"].startswith("application/sdp")
        assert re.fullmatch(r"/v1/webrtc/calls/webrtc-[0-9a-f]{32}", call.location or "")
        await call.until(lambda: "ready" in call.kinds(), "the call is ready")
        await call.until(lambda: call.loud_frames >= 10 and len(call.transcript()) >= 5,
                         "agent audio and text arrive")
        assert call.kinds()[:2] == ["ringing", "ready"]
        ready = next(e for e in call.events if e["type"] == "ready")
        assert ready["persona"] in ("claims", "after-hours")  # after hours the public link reaches after-hours
        assert call.first_audio is not None
        first_audio = call.first_audio - call.began
        print(f"aiortc browser: ready after {ready['setup_ms']} ms (gateway), first agent audio "
              f"{first_audio * 1000:.0f} ms after the offer was made")
        assert first_audio < 5.0
        assert (await hang_up(http, call)).status_code == 204
        await call.until(lambda: "ended" in call.kinds(), "the call ends")
        assert call.events[-1] == {"type": "ended", "reason": "hangup"}
    await until_idle(http)
    samples = await metrics(http)
    assert samples['personagate_gateway_front_end_calls_ended_total{front_end="webrtc",reason="hangup"}'] >= 1
    assert samples['personagate_gateway_webrtc_offers_total{answer="201"}'] >= 1
    assert (await hang_up(http, call)).status_code == 204  # already over: hanging up again is harmless
    assert (await http.delete("/v1/webrtc/calls/webrtc-" + "0" * 32)).status_code == 404


async def test_a_browser_that_vanishes_frees_its_slot(stack: Stack, http: httpx.AsyncClient) -> None:
    """A browser that stops sending audio (a closed laptop lid, a dead network) is hung up after the media
    timeout; one that closes its connection without a DELETE (a closed tab) at once."""
    before = await metrics(http)
    async with browser() as call:
        assert (await place(http, call, *PUBLIC)).status_code == 201
        await call.until(lambda: call.loud_frames >= 1, "agent audio arrives")
        call.pc.getSenders()[0].replaceTrack(None)  # no more RTP from the "browser"
        await call.until(lambda: "ended" in call.kinds(), "the call ends", timeout=10)
        assert call.events[-1] == {"type": "ended", "reason": "media_timeout"}
    await until_idle(http)
    async with browser() as call:
        assert (await place(http, call, *PUBLIC)).status_code == 201
        await call.until(lambda: "ready" in call.kinds(), "the call is ready")
    began = time.monotonic()
    await until_idle(http)  # the connection closed: the call is over
    print(f"a closed connection freed its slot in {(time.monotonic() - began) * 1000:.0f} ms")
    after = await metrics(http)
    reason = 'personagate_gateway_front_end_calls_ended_total{front_end="webrtc",reason="%s"}'
    assert after[reason % "media_timeout"] == before.get(reason % "media_timeout", 0) + 1
    assert after[reason % "hangup"] == before.get(reason % "hangup", 0) + 1


async def test_a_client_that_never_connects_holds_its_slot_only_briefly(stack: Stack,
                                                                       http: httpx.AsyncClient) -> None:
    """A client that posts an offer and never uses the answer (a script probing the public link, a browser that
    crashed) gets its call ended once webrtc_connect_timeout_seconds pass (2 s here): the slot goes back to real
    callers."""
    before = await metrics(http)
    async with browser() as call:
        response = await http.post(f"/v1/webrtc/calls/{PUBLIC[0]}/{PUBLIC[1]}", content=call.pc.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp"})
        assert response.status_code == 201
        began = time.monotonic()
        await until_idle(http)
        print(f"an offer never connected held its slot {time.monotonic() - began:.1f} s")
    reason = 'personagate_gateway_front_end_calls_ended_total{front_end="webrtc",reason="setup_timeout"}'
    assert (await metrics(http))[reason] == before.get(reason, 0) + 1


async def test_the_tenant_limit_refuses_a_second_call_with_429(stack: Stack, http: httpx.AsyncClient) -> None:
    """The tenant's max_concurrent_calls counts browser calls as it counts phone calls: at its limit (1 in this
    copy) the next caller is told so (429 with Retry-After), and the call in progress keeps going."""
    async with browser() as first, browser() as second:
        assert (await place(http, first, *PUBLIC)).status_code == 201
        await first.until(lambda: "ready" in first.kinds(), "the first call is ready")
        refused = await place(http, second, *PUBLIC)
        assert refused.status_code == 429, refused.text
        assert "limit" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
        heard = first.loud_frames
        await first.until(lambda: first.loud_frames > heard + 10, "the first call still hears the agent")
        await hang_up(http, first)
    await until_idle(http)


async def test_admins_call_their_own_personas_with_their_token(stack: Stack, http: httpx.AsyncClient) -> None:
    """A persona without public_link is for its tenant's admins: without a token, or with another tenant's, it is
    a 404 exactly like a persona that does not exist (nobody discovers private personas by guessing); an unknown
    token is a 401; its own admin's token places the call (and the page lists it for that token only)."""
    async with browser() as call:
        missing = await place(http, call, "northwind-bank", "no-such-persona")
        for token in (None, stack.admin_token):
            hidden = await place(http, call, *PRIVATE, token=token)
            assert hidden.status_code == 404
            assert hidden.json()["detail"] == missing.json()["detail"].replace("no-such-persona", PRIVATE[1])
        assert (await place(http, call, *PRIVATE, token="not-a-token")).status_code == 401
        response = await place(http, call, *PRIVATE, token=stack.other_token)
        assert response.status_code == 201, response.text
        await call.until(lambda: call.loud_frames >= 1, "agent audio arrives")
        await hang_up(http, call)
    await until_idle(http)
    public = (await http.get("/v1/webrtc/personas")).json()["personas"]
    assert [(p["tenant"], p["persona"]) for p in public] == [PUBLIC, CLOSED]
    bank = (await http.get("/v1/webrtc/personas", headers={"Authorization": f"Bearer {stack.other_token}"})).json()
    assert {(p["tenant"], p["persona"]) for p in bank["personas"]} == {
        PUBLIC, ("northwind-bank", "card-services"), PRIVATE}


async def test_a_closed_tenant_refuses_the_public_but_not_its_admins(stack: Stack, http: httpx.AsyncClient) -> None:
    """A public link follows the tenant's hours as its phone numbers do: out of hours the visitor is told the
    tenant is closed and why (503); the tenant's admins still reach the persona to try it."""
    async with browser() as call:
        closed = await place(http, call, *CLOSED)
        assert closed.status_code == 503
        assert "closed now" in closed.json()["detail"] and "freeze it in the app" in closed.json()["detail"]
        # another tenant's admin calls a public persona as anyone does: the hours apply
        assert (await place(http, call, *CLOSED, token=stack.admin_token)).status_code == 503
        assert (await place(http, call, *CLOSED, token=stack.other_token)).status_code == 201
        await call.until(lambda: "ready" in call.kinds(), "the admin's call is ready")
        await hang_up(http, call)
    await until_idle(http)


async def test_no_free_agent_is_503_with_retry_after(stack: Stack, http: httpx.AsyncClient) -> None:
    """With every worker slot taken (two calls on the two slots), the next caller gets 503 and when to retry, and
    nothing is held for it."""
    async with browser() as first, browser() as second, browser() as third:
        assert (await place(http, first, *PUBLIC)).status_code == 201
        assert (await place(http, second, *PRIVATE, token=stack.other_token)).status_code == 201
        await second.until(lambda: "ready" in second.kinds(), "the second call is ready")
        refused = await place(http, third, *CLOSED, token=stack.other_token)
        assert refused.status_code == 503, refused.text
        assert "no agent is free" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
        for call in (first, second):
            await hang_up(http, call)
    await until_idle(http)


@pytest.mark.parametrize(("body", "content_type", "status", "detail"), [
    (b"hello", "application/sdp", 400, "starts with the line 'v=0'"),
    (b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "application/sdp", 400, "no audio section"),
    (b"\xff\xfe", "application/sdp", 400, "not UTF-8"),
    (b"v=0\r\n" + b"a=x\r\n" * 5000, "application/sdp", 413, "larger than"),
    (b"v=0\r\n", "application/json", 415, "application/sdp"),
    # passes the gateway's own checks (a=setup:foo) but not aiortc's: still a 400 that says so, not a 500
    (None, "application/sdp", 400, "could not be used"),
])
async def test_a_bad_offer_gets_a_clear_error(stack: Stack, http: httpx.AsyncClient, body: bytes | None,
                                              content_type: str,
                                              status: int, detail: str) -> None:
    """A malformed, oversized or mistyped offer is refused with the reason, costs no slot (none is even claimed:
    aiortc's own parse comes before the claim too), and the gateway carries on."""
    if body is None:
        async with browser() as call:
            body = re.sub(r"a=setup:\w+", "a=setup:sideways", call.pc.localDescription.sdp).encode()
    before = claims(await metrics(http))
    response = await http.post(f"/v1/webrtc/calls/{PUBLIC[0]}/{PUBLIC[1]}", content=body,
                               headers={"Content-Type": content_type})
    assert response.status_code == status
    assert detail in response.json()["detail"]
    assert claims(await metrics(http)) == before
    assert (await http.get("/readyz")).json()["slots_free"] == 2


async def test_unknown_personas_and_assets_are_404(http: httpx.AsyncClient) -> None:
    """Callers and admins get a plain 404, not a traceback, for a persona or page file that does not exist."""
    async with browser() as call:
        assert (await place(http, call, "harbor-mutual", "nobody")).status_code == 404
        assert (await place(http, call, "no-such-tenant", "claims")).status_code == 404
    assert (await http.get("/call/../config.py")).status_code == 404
    assert (await http.get("/call/nothing.js")).status_code == 404


def test_offer_checks_name_the_problem() -> None:
    """What a tenant's web developer sees when their page sends an offer the gateway cannot answer."""
    good = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    async def offer() -> str:
        good.addTransceiver("audio", direction="sendrecv")
        await good.setLocalDescription(await good.createOffer())
        sdp = good.localDescription.sdp
        await good.close()
        return sdp

    sdp = asyncio.run(offer())
    assert check_offer(sdp.encode()).startswith("v=0\r\n")
    with pytest.raises(OfferError, match="recvonly: it sends no audio"):
        check_offer(sdp.replace("a=sendrecv", "a=recvonly").encode())
    with pytest.raises(OfferError, match="no Opus"):
        check_offer(re.sub(r"a=rtpmap:\d+ opus/48000/2\r\n", "", sdp).encode())
    with pytest.raises(OfferError, match="fingerprint"):
        check_offer(re.sub(r"a=fingerprint:[^\r]*\r\n", "", sdp).encode())
    with pytest.raises(OfferError, match="line 2 is not an SDP line"):
        check_offer(b"v=0\r\n<html>\r\n")
    with pytest.raises(OfferError, match="a=setup"):
        check_offer(re.sub(r"a=setup:[^\r]*\r\n", "", sdp).encode())
    video = sdp + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\n"
    with pytest.raises(OfferError, match="media are audio, video: a call takes one audio section"):
        check_offer(video.encode())
    audio = sdp[sdp.index("m=audio"):]
    with pytest.raises(OfferError, match="media are audio, audio"):
        check_offer((sdp + audio).encode())


def test_offers_are_counted_per_ipv4_address_and_per_ipv6_64() -> None:
    """One IPv6 subscriber holds a whole /64: the offer rate limit counts the network, so rotating addresses
    inside it gets no more offers."""
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    limit = OfferRateLimit(3, clock=lambda: 0.0)
    assert limit.take("a") == 0 and limit.take("a") == pytest.approx(20.0) and limit.take("b") == 0


# ---------------------------------------------------------------------- an edge gateway: ICE and rate limits


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway whose ICE is restricted to loopback and that takes 3 offers a minute per client."""
    folder = tmp_path_factory.mktemp("edge")
    tenant_copy(folder / "tenants")
    with webrtc_stack(folder, {"PERSONAGATE_GATEWAY_WEBRTC_ICE_INTERFACES": '["127.0.0.1"]',
                               "PERSONAGATE_GATEWAY_WEBRTC_OFFERS_PER_MINUTE": "3"}, slots=2) as addresses:
        yield addresses


async def test_ice_candidates_stay_on_the_configured_interfaces_and_offers_are_rate_limited(edge: Stack) -> None:
    """An operator who names the interfaces browsers may reach gets candidates on those only, and the call
    works over them; a client posting offers faster than webrtc_offers_per_minute gets 429 with Retry-After."""
    restrict_host_addresses(["127.0.0.1"])  # the test's own "browser" on loopback too
    try:
        async with httpx.AsyncClient(base_url=edge.http, timeout=30) as http, browser() as call:
            response = await place(http, call, *PUBLIC)
            assert response.status_code == 201, response.text
            candidates = re.findall(r"a=candidate:\S+ \d+ udp \d+ (\S+) \d+ typ host", response.text)
            assert candidates and set(candidates) == {"127.0.0.1"}, response.text
            await call.until(lambda: call.loud_frames >= 1, "agent audio arrives over loopback")
            await hang_up(http, call)
            limited = await http.post(f"/v1/webrtc/calls/{PUBLIC[0]}/{PUBLIC[1]}", content=b"v=0\r\n",
                                      headers={"Content-Type": "application/sdp"})
            assert limited.status_code == 429
            assert 1 <= int(limited.headers["retry-after"]) <= 20
            assert "too many call attempts" in limited.json()["detail"]
    finally:
        restrict_host_addresses([])


# ---------------------------------------------------------------------- the audio path, measured with an echo


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway in front of the echo model: the agent says back what it hears, 80 ms later."""
    folder = tmp_path_factory.mktemp("echo")
    tenant_copy(folder / "tenants")
    with webrtc_stack(folder, worker_args=("--model", "echo")) as addresses:
        yield addresses


async def test_the_caller_hears_a_clean_echo_paced_in_real_time(echo: Stack) -> None:
    """The audio path is transparent and steady: a 440 Hz tone sent by the browser comes back through 48 → 24 kHz,
    the agent session and 24 → 48 kHz as the same clean tone (no clicks between frames: one stateful resampler per
    direction), its bursts delayed by well under a second, and packets arrive at the 20 ms pace, not in bursts."""
    async with httpx.AsyncClient(base_url=echo.http, timeout=30) as http, browser() as call:
        assert (await place(http, call, *PUBLIC)).status_code == 201
        await call.until(lambda: call.loud_frames >= 60, "the echo has come back for a while")
        await hang_up(http, call)
    heard = np.concatenate(call.heard)
    loud = [i for i, frame in enumerate(call.heard) if np.sqrt(np.mean(frame ** 2)) > LOUD_RMS]
    # A whole burst (25 frames of tone, 500 ms) in the middle of what came back: its spectrum is one line.
    start = next(i for i in loud[1:] if i - 1 not in loud and all(j in loud for j in range(i, i + 20)))
    window = heard[(start + 3) * 960:(start + 19) * 960] * np.hanning(16 * 960)
    spectrum = np.abs(np.fft.rfft(window)) ** 2
    freqs = np.fft.rfftfreq(len(window), 1 / 48_000)
    peak = freqs[np.argmax(spectrum)]
    purity = spectrum[np.abs(freqs - 440) < 25].sum() / spectrum.sum()
    rms = np.sqrt(np.mean(heard[(start + 3) * 960:(start + 19) * 960] ** 2)) / 32767
    gaps = np.diff(call.arrivals[len(call.arrivals) // 4:])
    print(f"echo through WebRTC: peak {peak:.0f} Hz, {purity * 100:.2f} % of the energy within 25 Hz of it, "
          f"level {20 * np.log10(rms):.1f} dBFS (sent: -13.5), packet gaps p50 {np.median(gaps) * 1000:.1f} ms, "
          f"p99 {np.percentile(gaps, 99) * 1000:.1f} ms")
    assert abs(peak - 440) < 5
    assert purity > 0.99
    assert -15 < 20 * np.log10(rms) < -12  # the level is kept (sent at -13.5 dBFS)
    assert 0.015 < np.median(gaps) < 0.025


# ---------------------------------------------------------------------- hostile callers


def client_at(http: str, address: str) -> httpx.AsyncClient:
    """An HTTP client whose requests come from ``address`` (any of 127/8 on Linux): another caller, to the
    gateway, on the same machine."""
    return httpx.AsyncClient(base_url=http, timeout=30, transport=httpx.AsyncHTTPTransport(local_address=address))


async def post_offer(http: httpx.AsyncClient, sdp: str, tenant: str, persona: str,
                     token: str | None = None) -> httpx.Response:
    """POST ``sdp`` as an offer and leave the answer unused (a client that never connects)."""
    headers = {"Content-Type": "application/sdp"} | ({"Authorization": f"Bearer {token}"} if token else {})
    return await http.post(f"/v1/webrtc/calls/{tenant}/{persona}", content=sdp, headers=headers)


def claims(samples: dict[str, float]) -> float:
    """Slot claims the routing store has been asked for, whatever their result."""
    return sum(v for k, v in samples.items() if k.startswith("personagate_routing_claims_total{"))


def refusals(samples: dict[str, float], reason: str) -> float:
    return samples.get(f'personagate_gateway_webrtc_refusals_total{{reason="{reason}"}}', 0.0)


def with_candidates_at(sdp: str, address: str) -> str:
    """``sdp`` with every candidate's address replaced by ``address``."""
    return re.sub(r"(a=candidate:\S+ \d+ \S+ \d+ )\S+", rf"\g<1>{address}", sdp)


def with_extra_candidates(sdp: str, count: int) -> str:
    """``sdp`` with ``count`` more host candidates in its audio section (distinct documentation addresses)."""
    extra = "".join(f"a=candidate:x{n} 1 udp 2130706431 198.51.{n // 250}.{n % 250 + 1} {40000 + n} typ host\r\n"
                    for n in range(count))
    head, tail = sdp.split("m=audio", 1)
    first = tail.index("a=candidate:")
    return head + "m=audio" + tail[:first] + extra + tail[first:]


async def test_only_the_calls_secret_or_its_tenants_admin_hangs_it_up(stack: Stack, http: httpx.AsyncClient) -> None:
    """A call's id is no secret (it is in Location and in the log): anyone else's DELETE (no token, a made-up
    secret, another tenant's admin token) is refused 403 and the call goes on, audio and all; the secret answered
    to its creator (only there: never in the gateway's log) hangs it up, and after the end its tenant's admin
    may DELETE it again while a stranger still may not."""
    before = await metrics(http)
    async with browser() as call, client_at(stack.http, "127.0.0.2") as stranger:
        response = await place(http, call, *PUBLIC)
        assert response.status_code == 201, response.text
        assert response.headers["cache-control"] == "no-store"
        assert call.secret and len(call.secret) >= 40
        await call.until(lambda: "ready" in call.kinds(), "the call is ready")
        for headers in ({}, {"Authorization": "Bearer " + "A" * 43}, {"Authorization": f"Bearer {stack.other_token}"}):
            refused = await stranger.delete(call.location, headers=headers)
            assert refused.status_code == 403, refused.text
            assert "secret" in refused.json()["detail"]
        heard = call.loud_frames
        await call.until(lambda: call.loud_frames > heard + 10, "the call still hears the agent")
        assert "ended" not in call.kinds()
        assert (await hang_up(stranger, call)).status_code == 204  # the secret is what counts, from anywhere
        await call.until(lambda: "ended" in call.kinds(), "the call ends")
        assert call.events[-1] == {"type": "ended", "reason": "hangup"}
        assert (await stranger.delete(call.location)).status_code == 403
        admin = await http.delete(call.location, headers={"Authorization": f"Bearer {stack.admin_token}"})
        assert admin.status_code == 204
    await until_idle(http)
    after = await metrics(http)
    assert refusals(after, "hangup_forbidden") == refusals(before, "hangup_forbidden") + 4
    assert stack.gateway_log is not None
    log = stack.gateway_log.read_text()
    assert call.location.rsplit("/", 1)[1] in log and call.secret not in log


BAD_OFFERS = {  # what an outside tester sent, each answered 201 before
    "m=audio notaport": (lambda sdp: re.sub(r"m=audio \d+", "m=audio notaport", sdp),
                         "port 'notaport' is not a port number", "invalid_offer"),
    "rtpmap:999999": (lambda sdp: re.sub(r"a=rtpmap:\d+ opus", "a=rtpmap:999999 opus", sdp),
                      "payload type '999999' is not a number 0-127", "invalid_offer"),
    "150 candidates": (lambda sdp: with_extra_candidates(sdp, 150), "at most 20 UDP ones are taken",
                       "too_many_candidates"),
    "candidates on the gateway's host": (lambda sdp: with_candidates_at(sdp, "127.0.0.1"),
                                         "this gateway's own host", "no_usable_candidate"),
    "candidates at the metadata service": (lambda sdp: with_candidates_at(sdp, "169.254.169.254"),
                                           "a link-local address", "no_usable_candidate"),
}


@pytest.mark.parametrize("case", BAD_OFFERS)
async def test_a_hostile_offer_is_refused_before_any_slot_is_claimed(stack: Stack, http: httpx.AsyncClient,
                                                                     case: str) -> None:
    """Offers a browser never sends (a port that is no number, a payload type past 127, 150 candidates that would
    make the gateway spray STUN at 150 addresses, candidates aimed at the gateway's own host or at the cloud's
    metadata address) get 400 naming the problem, are counted by reason, and claim no slot at all."""
    change, detail, reason = BAD_OFFERS[case]
    before = await metrics(http)
    async with browser() as call:
        body = change(call.pc.localDescription.sdp)
    assert len(body.encode()) <= 16_384  # refused for what it says, not for its size
    response = await post_offer(http, body, *PUBLIC)
    assert response.status_code == 400, response.text
    assert detail in response.json()["detail"]
    after = await metrics(http)
    assert claims(after) == claims(before)
    assert refusals(after, reason) == refusals(before, reason) + 1
    assert (await http.get("/readyz")).json()["slots_free"] == 2


def test_offer_checks_ports_payload_types_and_candidates() -> None:
    """What a tenant's web developer (or an attacker) sees for an offer with impossible numbers or candidates; and
    which candidates are quietly left out (an address of the browser's VPN or container bridge is normal) rather
    than refused."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    async def offer() -> str:
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    sdp = with_candidates_at(asyncio.run(offer()), "198.51.100.7")
    assert read_offer(sdp.encode()).candidates >= 1
    with pytest.raises(OfferError, match="port '70000' is not a port number"):
        check_offer(re.sub(r"m=audio \d+", "m=audio 70000", sdp).encode())
    with pytest.raises(OfferError, match="m=audio: payload type '128'"):
        check_offer(re.sub(r"(m=audio \S+ \S+) ", r"\1 128 ", sdp).encode())
    assert "a=rtpmap:0 PCMU/8000" in sdp
    with pytest.raises(OfferError, match="a=rtpmap: payload type '-1'"):
        check_offer(sdp.replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:-1 PCMU/8000").encode())
    candidate = re.search(r"a=candidate:[^\r]*", sdp)
    assert candidate is not None
    for broken, why in (("999.1.1.1", "is not an IP address"), ("224.0.0.1", "is not an address a browser"),
                        ("0.0.0.0", "is not an address a browser")):
        with pytest.raises(OfferError, match=why):
            check_offer(with_candidates_at(sdp, broken).encode())
    with pytest.raises(OfferError, match="port '65536'"):
        check_offer(re.sub(r"(a=candidate:\S+ \d+ \S+ \d+ \S+ )\d+", r"\g<1>65536", sdp).encode())
    with pytest.raises(OfferError, match="type 'bogus'"):
        check_offer(re.sub(r"typ host", "typ bogus", sdp).encode())
    with pytest.raises(OfferError, match="at most 3 UDP ones are taken") as refused:
        check_offer(with_extra_candidates(sdp, 3).encode(), max_candidates=3)
    assert refused.value.reason == "too_many_candidates"
    # TCP candidates (every browser offers them) are left out, uncounted: the gateway's ICE speaks UDP only
    tcp = re.sub(r"(a=candidate:\S+ \d+ )udp", r"\1tcp", with_extra_candidates(sdp, 3))
    assert "udp" in with_extra_candidates(sdp, 0) and "tcp" in tcp
    with_tcp = with_extra_candidates(sdp, 0).replace(candidate.group(0), candidate.group(0) + "\r\n" +
                                                     candidate.group(0).replace(" udp ", " tcp "))
    udp = sdp.count("a=candidate:")
    kept = read_offer(with_tcp.encode(), max_candidates=udp)  # the TCP one is not counted against the cap
    assert " tcp " not in kept.sdp and kept.dropped == [] and kept.candidates == udp
    with pytest.raises(OfferError, match="they are all TCP"):
        check_offer(tcp.encode())
    policy = CandidatePolicy(loopback=False, families=frozenset({4}), foreign=(ipaddress.ip_network("10.9.0.0/16"),))
    mixed = with_extra_candidates(sdp, 1).replace("198.51.0.1", "10.9.1.1")
    mixed = mixed.replace(candidate.group(0), candidate.group(0) + "\r\n" +
                          candidate.group(0).replace("198.51.100.7", "a1b2c3d4-1111.local"))
    kept = read_offer(mixed.encode(), address_check=policy.refuse)
    assert kept.dropped == ["10.9.1.1: in 10.9.0.0/16, a network of an interface not in webrtc_ice_interfaces"]
    assert "10.9.1.1" not in kept.sdp and "198.51.100.7" in kept.sdp and ".local" in kept.sdp
    with pytest.raises(OfferError, match="none of the offer's") as refused:
        check_offer(with_candidates_at(sdp, "10.9.3.3").encode(), address_check=policy.refuse)
    assert refused.value.reason == "no_usable_candidate"
    assert policy.refuse(ipaddress.ip_address("127.0.0.1")) is not None
    assert policy.refuse(ipaddress.ip_address("::ffff:10.9.0.1")) is not None  # an IPv4 target however written
    assert policy.refuse(ipaddress.ip_address("2001:db8::1")) is not None  # no IPv6 candidates of its own
    assert candidate_policy(["127.0.0.1"]).refuse(ipaddress.ip_address("127.0.0.1")) is None
    assert candidate_policy([]).refuse(ipaddress.ip_address("127.0.0.1")) is not None


def test_the_ice_agent_checks_a_bounded_number_of_candidates() -> None:
    """However many candidates reach aioice (the offer's cap is checked before; peer-reflexive ones are learnt
    from incoming checks), a call's ICE agent keeps at most the bound: its check list, and so the STUN requests
    it sends, stay bounded by the bound times its own candidates, and a check from yet another address is
    answered without a check back."""
    async def scenario() -> None:
        bound_remote_candidates(4)
        browser_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        browser_pc.addTransceiver("audio", direction="sendrecv")
        await browser_pc.setLocalDescription(await browser_pc.createOffer())
        offer = with_extra_candidates(browser_pc.localDescription.sdp, 12)
        await browser_pc.close()
        gateway_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            await gateway_pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await gateway_pc.setLocalDescription(await gateway_pc.createAnswer())
            connection = gateway_pc.getTransceivers()[0].receiver.transport.transport._connection
            deadline = time.monotonic() + 30
            while not connection._check_list:  # the checks start in the background
                assert time.monotonic() < deadline, "the ICE agent never started its checks"
                await asyncio.sleep(0.05)
            local = len(connection.local_candidates)
            assert len(connection._remote_candidates) == 4
            assert 1 <= len(connection._check_list) <= 4 * local
            request = aioice.stun.Message(aioice.stun.Method.BINDING, aioice.stun.Class.REQUEST)
            request.attributes["PRIORITY"] = 1
            connection.check_incoming(request, ("198.51.200.9", 9), connection._protocols[0])
            assert len(connection._remote_candidates) == 4 and len(connection._check_list) <= 4 * local
        finally:
            await gateway_pc.close()
            bound_remote_candidates(None)

    asyncio.run(scenario())


async def test_a_token_holder_is_not_held_to_the_anonymous_offer_rate(edge: Stack) -> None:
    """An admin behind an address whose anonymous offers are rate limited (an office, a NAT) still places calls:
    the per-client rate applies after the token is checked, to callers without one; an unknown token is a 401,
    not a pass. Candidate checks apply to admins too: this gateway's ICE is on loopback only, so an offer whose
    candidates are all elsewhere is refused."""
    restrict_host_addresses(["127.0.0.1"])
    try:
        async with httpx.AsyncClient(base_url=edge.http, timeout=30) as http, browser() as call:
            for _ in range(4):  # 3 a minute, a burst of 1: the anonymous bucket is empty after this
                limited = await post_offer(http, "v=0\r\n", *PUBLIC)
            assert limited.status_code == 429
            assert (await post_offer(http, "v=0\r\n", *PUBLIC, token="not-a-token")).status_code == 401
            elsewhere = await post_offer(http, with_candidates_at(call.pc.localDescription.sdp, "198.51.100.7"),
                                         *PUBLIC, token=edge.admin_token)
            assert elsewhere.status_code == 400 and "offers no candidate in" in elsewhere.json()["detail"]
            response = await place(http, call, *PUBLIC, token=edge.admin_token)
            assert response.status_code == 201, response.text
            await call.until(lambda: call.loud_frames >= 1, "agent audio arrives")
            assert (await hang_up(http, call)).status_code == 204
    finally:
        restrict_host_addresses([])


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway on 4 slots whose anonymous callers may have 2 calls in progress per tenant and 1 per client, and
    whose answered offers must connect within 2 s; both tenants public and open at every hour."""
    folder = tmp_path_factory.mktemp("crowd")
    tenant_copy(folder / "tenants", harbor_always_open=True, bank_public_always_open=True)
    with webrtc_stack(folder, {"PERSONAGATE_GATEWAY_WEBRTC_PUBLIC_CALLS_PER_TENANT": "2",
                               "PERSONAGATE_GATEWAY_WEBRTC_PUBLIC_CALLS_PER_CLIENT": "1",
                               "PERSONAGATE_GATEWAY_WEBRTC_CONNECT_TIMEOUT_SECONDS": "2",
                               "PERSONAGATE_GATEWAY_WEBRTC_OFFERS_PER_MINUTE": "1000"}, slots=4) as addresses:
        yield addresses


async def test_one_public_link_cannot_take_every_slot(crowd: Stack) -> None:
    """Anonymous callers of one tenant's public link hold at most webrtc_public_calls_per_tenant calls (then 503
    with Retry-After) and one client at most webrtc_public_calls_per_client (then 429), so another tenant's caller
    still gets an agent; an answered offer that never connects gives its place and its slot back within the
    connect timeout (2 s here), and the next caller gets them."""
    bank = ("northwind-bank", "card-services")
    async with contextlib.AsyncExitStack() as held:
        a, b, c, d = [await held.enter_async_context(client_at(crowd.http, f"127.0.0.{n}")) for n in (2, 3, 4, 5)]
        first, second, other = [await held.enter_async_context(browser()) for _ in range(3)]
        before = await metrics(a)
        assert (await place(a, first, *PUBLIC)).status_code == 201
        assert (await place(b, second, *PUBLIC)).status_code == 201
        response = await place(d, other, *bank)  # another tenant's caller: a slot is still there
        assert response.status_code == 201, response.text
        await other.until(lambda: other.loud_frames >= 1, "the other tenant's caller hears its agent")
        heard = other.loud_frames
        refused = await post_offer(c, first.pc.localDescription.sdp, *PUBLIC)
        assert refused.status_code == 503, refused.text
        assert "public link" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
        refused = await post_offer(a, first.pc.localDescription.sdp, *bank)
        assert refused.status_code == 429, refused.text
        assert "in progress" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
        await other.until(lambda: other.loud_frames > heard + 10, "the call in progress keeps its audio")
        assert (await hang_up(a, first)).status_code == 204
        await first.until(lambda: "ended" in first.kinds(), "the first call ends")
        # c now gets Harbor's freed place, but never connects: it holds it (and a slot) for 2 s only
        assert (await post_offer(c, first.pc.localDescription.sdp, *PUBLIC)).status_code == 201
        await _poll(lambda: metrics(a), lambda m: m.get(
            'personagate_gateway_front_end_calls_ended_total{front_end="webrtc",reason="setup_timeout"}', 0) >= before.get(
            'personagate_gateway_front_end_calls_ended_total{front_end="webrtc",reason="setup_timeout"}', 0) + 1,
            "the never-connected call ends")
        await _poll(lambda: _slots_free(a), lambda free: free == 2, "its slot is free again")
        again = await post_offer(c, first.pc.localDescription.sdp, *PUBLIC)  # c's place is free again too
        assert again.status_code == 201, again.text
        for call in (second, other):
            assert (await hang_up(a, call)).status_code == 204
        after = await metrics(a)
    assert refusals(after, "public_tenant_cap") == refusals(before, "public_tenant_cap") + 1
    assert refusals(after, "public_client_cap") == refusals(before, "public_client_cap") + 1


def test_a_public_link_always_leaves_its_tenant_a_call() -> None:
    """However high webrtc_public_calls_per_tenant is set, anonymous callers leave one of the tenant's
    max_concurrent_calls to its phone numbers and admins (a tenant limited to one call has just that one)."""
    assert public_cap(4, 40) == 4
    assert public_cap(4, 3) == 2
    assert public_cap(4, 1) == 4  # the tenant limit itself refuses the second call (429)


async def _slots_free(http: httpx.AsyncClient) -> int:
    return (await http.get("/readyz")).json()["slots_free"]


async def _poll(read, check, what: str, timeout: float = 30.0) -> None:
    """Until ``check(await read())``, or fail after ``timeout`` (generous: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while not check(await read()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.1)
