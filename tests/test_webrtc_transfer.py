"""Escalation from a browser call: the caller presses the tenant's escalation key on the page (sent over the data
channel), the gateway calls the tenant's human over SIP and bridges the browser to whoever answers. Real peers on
loopback: a `personagate worker` (echo), a `personagate gateway` (SIP and WebRTC), an aiortc peer connection as
the browser, and sipp as the human (`-rtp_echo`: it sends back the audio it hears)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.programs import needs
from tests.helpers.sipp import Human
from tests.helpers.stack import echo_stack, escalating_tenant
from tests.helpers.webrtc import PUBLIC, Browser, browser, hang_up, metrics, place

pytest.importorskip("pjsua2")
pytestmark = needs("sipp")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("tenants")
    target = escalating_tenant(folder)  # harbor-mutual, escalating digit 0 to sipp on a loopback port
    with echo_stack(folder, {"PERSONAGATE_GATEWAY_SIP_TRANSFER_RING_SECONDS": "3"}) as (addresses, _, _):
        yield addresses | target


@pytest.fixture
async def http(stack: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack["http"], timeout=30) as client:
        yield client


async def _live(http: httpx.AsyncClient, call: Browser) -> None:
    assert (await place(http, call, *PUBLIC)).status_code == 201
    await call.until(lambda: call.loud_frames >= 10, "the echo agent's audio arrives")


def _press(call: Browser, digit: str) -> None:
    """A key pressed on the page's keypad."""
    assert call.channel is not None
    call.channel.send(json.dumps({"type": "dtmf", "digit": digit}))


async def _slots_free(http: httpx.AsyncClient) -> int:
    return (await http.get("/readyz")).json()["slots_free"]


async def test_the_browser_caller_is_bridged_to_the_human(stack: dict[str, str], http: httpx.AsyncClient,
                                                          tmp_path: Path) -> None:
    """Pressing the escalation key rings the tenant's human while the caller keeps talking to the agent; when the
    human answers the page is told (transferred), the agent's slot is freed, the caller and the human hear each
    other, and the human hanging up ends the call with the reason on the page."""
    human = Human(stack, tmp_path, "hangs_up", pause_ms=4000)
    async with browser() as call:
        await _live(http, call)
        _press(call, "0")
        await call.until(lambda: "transferred" in call.kinds(), "the human answers", timeout=10)
        assert call.kinds().index("transferring") < call.kinds().index("transferred")
        heard = call.loud_frames
        # the human's side (sipp) sends the browser's own tone back: both directions of the bridge carry audio
        await call.until(lambda: call.loud_frames > heard + 25, "the human's audio arrives")
        assert await _slots_free(http) == 1  # the agent session is over: its slot is free while the human talks
        await call.until(lambda: "ended" in call.kinds(), "the human hangs up", timeout=15)
        assert call.events[-1] == {"type": "ended", "reason": "transfer", "ended_by": "human"}
    assert human.finished() == 0, human.errors()
    samples = await metrics(http)
    assert samples['personagate_gateway_front_end_transfers_total{front_end="webrtc",method="bridge",result="success"}'] >= 1


async def test_a_busy_human_leaves_the_caller_with_the_agent(stack: dict[str, str], http: httpx.AsyncClient,
                                                            tmp_path: Path) -> None:
    """The human's side answers busy: the page is told (transfer_failed: busy) and the call goes on with the agent."""
    human = Human(stack, tmp_path, "refuses", status="486 Busy Here")
    async with browser() as call:
        await _live(http, call)
        _press(call, "0")
        await call.until(lambda: "transfer_failed" in call.kinds(), "the human's side refuses", timeout=10)
        assert next(e for e in call.events if e["type"] == "transfer_failed") == {
            "type": "transfer_failed", "result": "busy"}
        heard = call.loud_frames
        await call.until(lambda: call.loud_frames > heard + 25, "the agent still answers")
        await hang_up(http, call)
        await call.until(lambda: "ended" in call.kinds(), "the call ends")
    assert human.finished() == 0, human.errors()
