"""The gateway's calls (``gateway.calls``) and its worker client (``gateway.worker_client``) against fake workers in
this event loop: the logic of tests/test_calls.py and tests/test_worker_client.py without a process, a model or
Redis, so that it runs in the fast tier (docs/testing.md).

Each fake worker (tests/helpers/fake_worker.py) speaks the real worker protocol on a loopback WebSocket and is
registered in the in-process routing store (``EmbeddedRouter``) by a heartbeat the test sends itself; the test
drives a call the way a front end does (``send`` a caller frame, read ``frames()``). The end-to-end modules keep
checking the same behaviour with real workers, real Redis and real time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import numpy as np
import pytest

from gateway.calls import AGENT_BACKLOG_EVENTS, AgentCall, Calls, PersonaRejected, SessionState
from gateway.worker_client import (
    UNAUTHORIZED,
    AgentAudio,
    AgentText,
    WorkerRefused,
    WorkerSession,
    persona_message,
    talk,
)
from personagate_common.plane import WorkerAuth
from personagate_common.protocol import FRAME_BYTES, CloseCode
from personagate_common.routing import Refusal, Router
from tests.helpers.calls import ACME, TIGHT, route
from tests.helpers.fake_worker import SILENCE, TONE, FakeWorker, in_process_calls
from tests.helpers.wait import scaled, until_async
from tests.helpers.worker import WORKER_AUTH

PERSONA = persona_message("You are a claims agent.", voice="tiny-low")


def frame(i: int) -> bytes:
    """Caller frame ``i``: distinct bytes, so an echo shows which frame came back."""
    return (np.random.default_rng(i).standard_normal(FRAME_BYTES // 2) * 3000).astype("<i2").tobytes()


async def reserved(router: Router) -> dict[str, int]:
    return {w.worker_id: w.reserved for w in await router.workers() if w.reserved}


def starts(calls: Calls, result: str) -> float | None:
    return calls.metrics.registry.get_sample_value("personagate_gateway_call_starts_total", {"result": result})


async def next_event(events: AsyncIterator[AgentAudio | AgentText]) -> AgentAudio | AgentText:
    return await asyncio.wait_for(anext(events), scaled(5))


async def next_audio(events: AsyncIterator[AgentAudio | AgentText], *, filler: bool | None = False) -> AgentAudio:
    """The next agent frame (skipping text, and comfort noise unless ``filler`` is None or True)."""
    while True:
        event = await next_event(events)
        if isinstance(event, AgentAudio) and (filler is None or event.filler == filler):
            return event


async def refusal(start) -> Refusal:
    with pytest.raises(Refusal) as info:
        await start
    return info.value


# ------------------------------------------------------------------------------------ a call's life


async def test_a_call_carries_the_callers_audio_to_its_worker_and_the_agent_back_then_frees_the_slot(registry):
    """A caller's call goes live on a worker that primes the tenant's persona under the call's id, the caller's
    frames reach it in order and the agent's audio and text come back; hanging up ends the worker session
    (client_end) and frees the slot for the next caller."""
    async with FakeWorker(texts=[" Hello", " there"]) as worker, in_process_calls(registry, worker) as calls:
        call = await calls.start("call-life", *route(registry, ACME))
        assert call.state is SessionState.LIVE and call.worker_id == worker.worker_id
        with pytest.raises(ValueError, match="3840"):  # only 80 ms frames: a front end's bug fails loudly
            call.send(b"\0" * 100)
        assert worker.active == ["call-life"]
        assert worker.sessions["call-life"].persona == call.persona.worker_persona
        assert await reserved(calls.router) == {worker.worker_id: 1}
        events = aiter(call.frames())
        call.send(frame(1))
        assert (await next_event(events)) == AgentAudio(SILENCE)  # the echo worker's first frame
        assert (await next_event(events)) == AgentText(" Hello")
        call.send(frame(2))
        assert (await next_audio(events)).pcm == frame(1)  # one agent frame per caller frame, in order
        assert (await next_event(events)) == AgentText(" there")
        await call.end()
        assert await call.wait_ended() == "hangup"
        assert [state for state, _ in call.history] == ["claiming", "connecting", "live", "ending", "ended"]
        assert "call-life" not in calls.live and await reserved(calls.router) == {}
        await until_async(lambda: worker.sessions["call-life"].ended == "client_end", "the worker session ended")
        assert starts(calls, "live") == 1
        assert calls.metrics.registry.get_sample_value("personagate_gateway_calls_ended_total",
                                                       {"reason": "hangup"}) == 1


async def test_ending_a_call_twice_keeps_the_first_reason_and_frees_the_slot_once(registry):
    """A front end that ends a call from two places (the caller's BYE and its own timer) gets one ending: the
    first reason is the call's, the slot is released once, and reading frames stops for every reader."""
    async with FakeWorker() as worker, in_process_calls(registry, worker) as calls:
        call = await calls.start("call-twice", *route(registry, ACME))
        readers = [asyncio.create_task(_drain(call)) for _ in range(2)]
        await asyncio.gather(call.end("hangup"), call.end("shutdown"))
        assert call.end_reason == "hangup" and call.ended
        await asyncio.wait_for(asyncio.gather(*readers), scaled(5))
        assert await reserved(calls.router) == {}


async def _drain(call: AgentCall) -> None:
    async for _ in call.frames():
        pass


async def test_frames_a_front_end_does_not_read_are_dropped_oldest_first_and_counted(registry):
    """A front end that falls behind loses the oldest agent frames, not the newest, and the call counts them:
    the caller hears the present, never a growing delay."""
    async with FakeWorker() as worker, in_process_calls(registry, worker) as calls:
        call = await calls.start("call-behind", *route(registry, ACME))
        session = worker.sessions["call-behind"]
        for i in range(40):
            call.send(frame(i))
            await until_async(lambda i=i: session.frames_out > i, "the worker answered", interval=0.001)
        await until_async(lambda: call.agent_events_dropped == 40 - AGENT_BACKLOG_EVENTS, "agent frames dropped")
        # agent frame k echoes caller frame k - 1: the first 8 were dropped, so the oldest left echoes frame 7
        assert (await next_audio(aiter(call.frames()))).pcm == frame(40 - AGENT_BACKLOG_EVENTS - 1)
        assert call.caller_frames_dropped == 0
        await call.end()


# ------------------------------------------------------------------------------------ refusals


async def test_workers_that_refuse_the_session_are_skipped_until_one_takes_the_call(registry, caplog):
    """A worker that is full (4503), draining (1013) or too slow to prime is left for the next one: the caller
    still gets an agent, from a worker that can take the call, and the refusing workers hold no slot for it."""
    caplog.set_level(logging.INFO, logger="gateway.calls")
    async with FakeWorker(slots=0) as full, FakeWorker() as draining, FakeWorker(priming_delay=60) as slow, \
            FakeWorker() as good:
        draining.draining = True
        workers = {full: 8, draining: 7, slow: 6, good: 1}  # advertised free slots: the refusing ones first
        async with in_process_calls(registry, session_start_timeout=0.3, start_attempts=4) as calls:
            for worker, capacity in workers.items():
                await calls.router.heartbeat(worker.state(capacity=capacity, draining=False))
            call = await calls.start("call-skip", *route(registry, ACME))
            assert call.worker_id == good.worker_id and good.active == ["call-skip"]
            assert full.refusals == [(CloseCode.NO_FREE_SLOT, "all 0 slots are in use")]
            assert draining.refusals == [(CloseCode.TRY_AGAIN_LATER, "the worker is draining")]
            assert await reserved(calls.router) == {good.worker_id: 1}
            await until_async(lambda: slow.active == [], "the slow worker's abandoned session gone")
            said = [r.getMessage() for r in caplog.records if r.name == "gateway.calls"]
            assert said.count("worker did not start the session; claiming another") == 3, said
            await call.end()


async def test_when_no_worker_starts_the_session_the_call_is_refused_with_each_workers_reason(registry):
    """When every worker refuses, the front end hears no_capacity (a busy signal or a 503, with a retry time)
    whose detail names each worker and why, and nothing stays claimed."""
    async with FakeWorker(slots=0, worker_id="w-full") as full, FakeWorker(worker_id="w-draining") as draining, \
            in_process_calls(registry, full, draining) as calls:
        draining.draining = True
        await calls.router.heartbeat(full.state(capacity=2))
        refused = await refusal(calls.start("call-nobody", *route(registry, ACME)))
        assert refused.reason == "no_capacity" and refused.retry_after_seconds > 0
        assert "w-full: 4503 all 0 slots are in use" in refused.detail
        assert "w-draining: 1013 the worker is draining" in refused.detail
        assert calls.live == {} and await reserved(calls.router) == {}
        assert starts(calls, "no_capacity") == 1


async def test_with_no_worker_registered_a_call_is_refused_no_capacity_at_once(registry):
    """A gateway whose workers are all gone refuses calls straight away (no_capacity) instead of ringing out."""
    async with in_process_calls(registry) as calls:
        refused = await refusal(calls.start("call-empty", *route(registry, ACME)))
        assert refused.reason == "no_capacity" and calls.live == {}


async def test_a_gateway_without_the_planes_secret_is_refused_by_every_worker_and_says_why(registry):
    """A gateway whose worker_secret is missing or wrong gets no session (401 before the upgrade, nothing taken
    on the worker): the refusal names the credential, not a vague failure."""
    async with FakeWorker() as worker:
        for auth, why in ((WorkerAuth(), "none was sent"), (WorkerAuth(secret="x" * 20), "not one it accepts")):
            async with in_process_calls(registry, worker, auth=auth) as calls:
                refused = await refusal(calls.start("call-no-secret", *route(registry, ACME)))
                assert refused.reason == "no_capacity"
                assert f"{worker.worker_id}: {int(UNAUTHORIZED)}" in refused.detail and why in refused.detail
                assert await reserved(calls.router) == {}
        assert worker.unauthorized == 2 and worker.sessions == {}


async def test_a_persona_the_worker_refuses_is_a_clear_error_tried_on_one_worker_only(registry):
    """A persona no worker can prime (4422) is a configuration error for the tenant's admin: the call fails at
    once with the persona's name and the worker's reason, no other worker is tried, and no slot is held."""
    tenant, persona = route(registry, ACME)
    async with FakeWorker() as first, FakeWorker() as second, in_process_calls(registry, first, second) as calls:
        for worker in (first, second):
            worker.refuse_personas[persona.prompt] = "prompt is 5000 characters long; at most 4000 allowed"
        with pytest.raises(PersonaRejected) as info:
            await calls.start("call-broken", tenant, persona)
        assert "acme/claims" in str(info.value) and "at most 4000" in info.value.reason
        assert len(first.refusals) + len(second.refusals) == 1
        assert calls.live == {} and await reserved(calls.router) == {}
        assert starts(calls, "persona_rejected") == 1


async def test_a_tenant_at_its_limit_is_refused_until_one_of_its_calls_ends(registry):
    """A tenant's concurrent-call limit is enforced at admission (tenant_limit), other tenants are not held back,
    and the tenant gets its call again as soon as one ends."""
    async with FakeWorker(slots=4) as worker, in_process_calls(registry, worker) as calls:
        first = await calls.start("tight-1", *route(registry, TIGHT))
        refused = await refusal(calls.start("tight-2", *route(registry, TIGHT)))
        assert refused.reason == "tenant_limit" and "tight" in refused.detail
        other = await calls.start("acme-1", *route(registry, ACME))
        await first.end()
        again = await calls.start("tight-3", *route(registry, TIGHT))
        await asyncio.gather(other.end(), again.end())
        assert starts(calls, "tenant_limit") == 1 and await reserved(calls.router) == {}


async def test_a_caller_who_hangs_up_while_the_persona_primes_leaves_no_slot_behind(registry):
    """Cancelling a call's set-up (the caller hung up during priming) ends it as cancelled: the worker's
    half-started session is dropped and the slot is free for the next caller."""
    async with FakeWorker(priming_delay=60) as worker, in_process_calls(registry, worker) as calls:
        claimed = asyncio.Event()
        starting = asyncio.create_task(calls.start("call-gone", *route(registry, ACME), on_claimed=claimed.set))
        await asyncio.wait_for(claimed.wait(), scaled(5))
        await until_async(lambda: worker.active == ["call-gone"], "the worker priming")
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert calls.live == {} and await reserved(calls.router) == {}
        assert starts(calls, "cancelled") == 1
        await until_async(lambda: worker.active == [], "the worker's session dropped")


# ------------------------------------------------------------------------------------ ends and drains


async def test_the_worker_ending_the_session_ends_the_call_with_its_verdict(registry):
    """When the worker itself ends a session (1000), the call ends worker_ended (the front end hangs up) and
    is not moved to another worker; its slot is freed."""
    async with FakeWorker() as worker, FakeWorker() as other, in_process_calls(registry, worker, other) as calls:
        call = await calls.start("call-verdict", *route(registry, ACME))
        owner = worker if call.worker_id == worker.worker_id else other
        await owner.end_session("call-verdict", CloseCode.NORMAL, "session ended: max_duration")
        assert await asyncio.wait_for(call.wait_ended(), scaled(5)) == "worker_ended"
        assert call.rehomes == [] and await reserved(calls.router) == {}


async def test_a_draining_gateway_refuses_new_calls_and_ends_the_last_ones_at_its_deadline(registry):
    """On SIGTERM the gateway refuses new calls (draining, readiness fails), lets calls in progress go on until
    the drain deadline, then ends them with shutdown, and each worker session is ended cleanly."""
    async with FakeWorker() as worker, in_process_calls(registry, worker) as calls:
        call = await calls.start("call-straggler", *route(registry, ACME))
        draining = asyncio.create_task(calls.drain(0.2))
        await until_async(lambda: calls.draining, "draining")
        ready, details = calls.readiness()
        assert not ready and details["reason"] == "draining"
        refused = await refusal(calls.start("call-too-late", *route(registry, ACME)))
        assert refused.reason == "draining"
        assert await asyncio.wait_for(draining, scaled(5)) == ["call-straggler"]
        assert call.end_reason == "shutdown" and await reserved(calls.router) == {}
        await until_async(lambda: worker.sessions["call-straggler"].ended == "client_end", "the session ended")


@pytest.mark.parametrize("ready_without_store", [True, False])
async def test_an_unreachable_routing_store_refuses_calls_and_fails_readiness_only_when_asked(
        registry, monkeypatch, ready_without_store):
    """While the routing store cannot be reached, new calls are refused (unavailable: the front ends answer 503 with
    Retry-After) and /readyz's details and the reachability gauge say so. By default (ready_without_routing_store)
    the gateway stays ready, so that a Redis failover does not take every gateway out of its load balancer at once;
    with the setting false it reports not ready, as before. Once the store answers, both come back."""
    async with FakeWorker() as worker, in_process_calls(registry, worker, reap_seconds=0.05) as calls:
        calls.ready_without_store = ready_without_store
        gauge = "personagate_gateway_routing_store_reachable"
        ready, details = calls.readiness()
        assert ready and details["routing_store"] == "reachable"
        assert calls.metrics.registry.get_sample_value(gauge) == 1

        async def away(*args: object, **kwargs: object) -> None:
            raise Refusal("unavailable", "the routing store cannot be reached (connection refused)", 5.0)

        real = {name: getattr(calls.router, name) for name in ("claim", "reap", "workers", "renew")}
        for name in real:
            monkeypatch.setattr(calls.router, name, away)
        refused = await refusal(calls.start("call-store-away", *route(registry, ACME)))
        assert refused.reason == "unavailable" and refused.retry_after_seconds == 5.0
        assert starts(calls, "unavailable") == 1
        ready, details = calls.readiness()
        assert details["routing_store"] == "unreachable" and calls.metrics.registry.get_sample_value(gauge) == 0
        if ready_without_store:
            assert ready and "reason" not in details
        else:
            assert not ready and details["reason"] == "the routing store cannot be reached"

        for name, method in real.items():
            monkeypatch.setattr(calls.router, name, method)
        await until_async(lambda: calls.readiness()[1]["routing_store"] == "reachable", "the store reachable again")
        assert calls.readiness()[0] and calls.metrics.registry.get_sample_value(gauge) == 1
        call = await calls.start("call-store-back", *route(registry, ACME))
        await call.end()


async def test_a_drain_with_no_calls_left_returns_at_once(registry):
    """A drain finishes as soon as the last call has ended: a gateway with no calls stops without waiting out
    its deadline."""
    async with FakeWorker() as worker, in_process_calls(registry, worker) as calls:
        call = await calls.start("call-ends-itself", *route(registry, ACME))
        draining = asyncio.create_task(calls.drain(60))
        await until_async(lambda: calls.draining, "draining")
        await call.end()
        assert await asyncio.wait_for(draining, scaled(5)) == []


# ------------------------------------------------------------------------------------ a worker lost mid-call


async def test_a_worker_that_vanishes_mid_call_is_replaced_with_comfort_noise_in_between(registry):
    """When the caller's worker dies (its connections drop, no close frame), the call moves to another worker:
    the caller hears comfort noise, never silence, then the new worker's agent; the slot moves with the call."""
    async with FakeWorker(worker_id="w-first", slots=1) as first, FakeWorker(worker_id="w-second") as second, \
            in_process_calls(registry, first) as calls:
        call = await calls.start("call-move", *route(registry, ACME))
        assert call.worker_id == "w-first"
        await calls.router.heartbeat(second.state())
        events = aiter(call.frames())
        call.send(frame(1))
        await next_audio(events)
        await first.vanish()
        assert (await next_audio(events, filler=None)).filler  # comfort noise first
        await until_async(lambda: call.state is SessionState.LIVE and call.rehomes, "the call re-homed")
        (move,) = call.rehomes
        assert (move.from_worker, move.to_worker) == ("w-first", "w-second") and "1006" in move.cause
        call.send(frame(2))
        call.send(frame(3))
        assert (await next_audio(events)).pcm in (SILENCE, frame(2))  # the new session's echo
        assert second.active == ["call-move"] and await reserved(calls.router) == {"w-second": 1}
        assert calls.metrics.registry.get_sample_value("personagate_routing_calls_rehomed_total") == 1
        await call.end()
        assert await reserved(calls.router) == {}


async def test_a_worker_shutting_down_mid_call_hands_the_call_to_another(registry):
    """A worker that reaches its drain deadline closes its sessions with 1001 (going away): the call is moved,
    not ended, because another worker can carry on."""
    async with FakeWorker(worker_id="w-leaving", slots=1) as leaving, FakeWorker(worker_id="w-staying") as staying, \
            in_process_calls(registry, leaving) as calls:
        call = await calls.start("call-1001", *route(registry, ACME))
        await calls.router.heartbeat(staying.state())
        await leaving.end_session("call-1001", CloseCode.GOING_AWAY, "the worker is shutting down")
        await until_async(lambda: call.rehomes, "the call re-homed")
        assert call.worker_id == "w-staying" and call.state is SessionState.LIVE
        assert "1001" in call.rehomes[0].cause
        await call.end()


async def test_a_worker_lost_with_no_other_to_take_the_call_ends_it_no_worker(registry):
    """When the caller's worker dies and no other worker has room, the call ends no_worker (the front end
    plays its apology) after comfort noise, and the slot is released."""
    async with FakeWorker() as worker, in_process_calls(registry, worker, rehome_deadline=0.5) as calls:
        call = await calls.start("call-orphan", *route(registry, ACME))
        events = aiter(call.frames())
        await worker.vanish()
        assert (await next_audio(events, filler=None)).filler
        assert await asyncio.wait_for(call.wait_ended(), scaled(5)) == "no_worker"
        assert [s for s, _ in call.history][-3:] == ["rehoming", "ending", "ended"]
        assert calls.live == {} and await reserved(calls.router) == {}


async def test_a_new_worker_that_refuses_the_persona_while_re_homing_ends_the_call_persona_rejected(registry):
    """If the only worker left cannot prime the call's persona, the call ends persona_rejected (an admin must
    fix the persona) instead of trying forever; no slot is left behind."""
    tenant, persona = route(registry, ACME)
    async with FakeWorker(slots=1) as first, FakeWorker() as picky, in_process_calls(registry, first) as calls:
        call = await calls.start("call-picky", tenant, persona)
        picky.refuse_personas[persona.prompt] = "unknown voice preset 'NATF0'"
        await calls.router.heartbeat(picky.state())
        await first.vanish()
        assert await asyncio.wait_for(call.wait_ended(), scaled(5)) == "persona_rejected"
        assert await reserved(calls.router) == {}


async def test_a_hung_worker_the_store_reaps_is_given_up_once_it_misses_a_ping(registry, caplog):
    """A worker that hangs (its socket open, nothing answered) stops heartbeating; once the store reaps it the
    gateway pings the call's session and, with no answer, gives the worker up: with no other, no_worker."""
    caplog.set_level(logging.INFO, logger="gateway.calls")
    async with FakeWorker() as worker, in_process_calls(registry, worker_ttl=1.0, reap_seconds=0.1,
                                                rehome_deadline=0.5) as calls:
        await calls.router.heartbeat(worker.state())
        call = await calls.start("call-hung", *route(registry, ACME))
        worker.stall()  # and no more heartbeats: the store reaps it within a second
        assert await asyncio.wait_for(call.wait_ended(), scaled(10)) == "no_worker"
        (lost,) = [r for r in caplog.records if r.getMessage() == "call lost its worker; re-homing"]
        assert "reaped" in lost.cause and "no answer to a ping" in lost.cause
        assert calls.live == {} and await reserved(calls.router) == {}


async def test_a_worker_the_store_reaps_but_that_still_answers_keeps_its_calls(registry):
    """A worker whose heartbeats stop reaching the store (the store's trouble, not the worker's) keeps its calls:
    the gateway pings the session, gets an answer, and leaves the call where it is, its audio flowing."""
    async with FakeWorker() as worker, in_process_calls(registry, worker_ttl=1.0, reap_seconds=0.1) as calls:
        await calls.router.heartbeat(worker.state())
        call = await calls.start("call-alive", *route(registry, ACME))
        await until_async(lambda: _gone(calls.router, worker.worker_id), "the worker reaped")
        await asyncio.sleep(0.3)  # a few reaper passes: each pings the session
        assert call.state is SessionState.LIVE and call.rehomes == [] and call.worker_id == worker.worker_id
        events = aiter(call.frames())
        call.send(frame(1))
        assert not (await next_audio(events, filler=None)).filler
        await call.end()


async def _gone(router: Router, worker_id: str) -> bool:
    return worker_id not in {w.worker_id for w in await router.workers()}


# ------------------------------------------------------------------------------------ the worker client


async def test_a_session_opens_with_the_call_id_and_reports_a_primed_persona_the_second_time():
    """`WorkerSession.open` starts a session under the caller's id; a persona the worker has primed before starts
    cached (what routing prefers), and ending the session closes it 1000 `session ended: client_end`."""
    async with FakeWorker() as worker:
        for cached in (False, True):
            async with await WorkerSession.open(worker.url, PERSONA, session_id=f"s-{cached}",
                                                auth=WORKER_AUTH) as session:
                assert (session.id, session.persona_cached) == (f"s-{cached}", cached)
                await session.send(frame(1))
                await session.end()
                events = [e async for e in session.events()]
                assert events == [AgentAudio(SILENCE)]
                assert (session.close_code, session.close_reason) == (1000, "session ended: client_end")


@pytest.mark.parametrize(("setup", "code", "reason"), [
    ("full", CloseCode.NO_FREE_SLOT, "all 0 slots are in use"),
    ("draining", CloseCode.TRY_AGAIN_LATER, "the worker is draining"),
    ("voice", CloseCode.PERSONA_REJECTED, "unknown voice preset 'tiny-low'"),
])
async def test_a_refused_session_raises_with_the_workers_close_code_and_reason(setup, code, reason):
    """A worker's refusal reaches the caller of `WorkerSession.open` as WorkerRefused with the protocol's close
    code and the worker's own words, which the gateway logs and acts on (try another worker, or not)."""
    async with FakeWorker(slots=0 if setup == "full" else 1, voices=["NATF0"] if setup == "voice" else None) as worker:
        worker.draining = setup == "draining"
        with pytest.raises(WorkerRefused) as info:
            await WorkerSession.open(worker.url, PERSONA, auth=WORKER_AUTH)
        assert (info.value.code, info.value.reason) == (code, reason)


async def test_a_refused_credential_is_reported_as_such_and_never_as_a_crash():
    """A worker that answers the upgrade 401 gives WorkerRefused with UNAUTHORIZED (4401) and says whether a
    secret was sent at all: what an operator needs to fix worker_secret."""
    async with FakeWorker() as worker:
        for auth, says in ((None, "none was sent"), (WorkerAuth(secret="y" * 20), "not one it accepts")):
            with pytest.raises(WorkerRefused) as info:
                await WorkerSession.open(worker.url, PERSONA, auth=auth)
            assert info.value.code == UNAUTHORIZED and says in info.value.reason


async def test_agent_text_and_audio_come_as_events_and_a_wrong_sized_frame_is_refused_locally():
    """The agent's text arrives after the audio frame it belongs to, and the client refuses to send anything but
    an 80 ms frame (a bug on our side, not the worker's to find)."""
    async with FakeWorker(echo=False, texts=[" claim"]) as worker, \
            await WorkerSession.open(worker.url, PERSONA, auth=WORKER_AUTH) as session:
        with pytest.raises(ValueError, match="3840"):
            await session.send(b"\0" * 100)
        await session.send(frame(1))
        events = aiter(session.events())
        assert await next_event(events) == AgentAudio(TONE)
        assert await next_event(events) == AgentText(" claim")


async def test_a_stalled_worker_misses_its_ping_and_an_aborted_session_reads_1006():
    """The client can tell a hung worker (no answer to a ping within the timeout) from a slow one, and dropping
    such a session ends its events at once with 1006."""
    async with FakeWorker() as worker, await WorkerSession.open(worker.url, PERSONA, auth=WORKER_AUTH) as session:
        assert await session.ping(scaled(2))
        worker.stall()
        assert not await session.ping(0.2)
        session.abort()
        assert [e async for e in session.events()] == [] and session.close_code == 1006


async def test_talk_plays_audio_in_real_time_and_reports_what_came_back():
    """`talk` (what `personagate session --play` runs) sends the caller's audio at 80 ms a frame and reports each
    frame answered and the worker's close."""
    async with FakeWorker() as worker:
        report, agent = await talk(worker.url, PERSONA, caller_audio=np.zeros(4800, np.float32), seconds=0.4,
                                   auth=WORKER_AUTH)
        assert report["frames_sent"] == report["frames_received"] == 5
        assert report["close"] == [1000, "session ended: client_end"] and len(agent) == 5 * 1920
