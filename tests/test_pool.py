"""The session pool in real time: its clock, shedding, slots and priming cache."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from agent_runtime.config import Sampling, SessionSampling
from agent_runtime.model import load_tiny
from agent_runtime.pool import FRAME_SECONDS, PoolConfig, PoolFull, SessionPool
from personagate_common.persona import Persona, PersonaError
from personagate_common.protocol import FRAME_BYTES

pytestmark = pytest.mark.slow  # the tiny model on CPU: seconds per test and per module set-up

CLAIMS = Persona(prompt="You are a claims agent at Harbor Mutual Insurance.", voice="tiny-low")
BANK = Persona(prompt="You work for Northwind Bank card services.", voice="tiny-high")
FRAME = (np.random.default_rng(0).standard_normal(FRAME_BYTES // 2) * 2000).astype("<i2").tobytes()


@pytest.fixture
async def pool():
    pool = SessionPool(load_tiny(), PoolConfig(capacity=3, input_backlog_frames=3))
    pool.start()
    yield pool
    pool.stop()


def _value(pool: SessionPool, name: str, **labels: str) -> float:
    return pool.metrics.registry.get_sample_value(name, labels) or 0.0


async def _feed(session, frames: int) -> None:
    for _ in range(frames):
        session.push_audio(FRAME)
        await asyncio.sleep(FRAME_SECONDS)


async def _count(session, seconds: float) -> int:
    got = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(session.receive(), left)
        except TimeoutError:
            break
        got += 1
    return got


async def test_a_silent_caller_never_stalls_the_others(pool):
    """One caller sending nothing (or a client that stopped reading) does not slow anyone else:
    the caller who talks gets an agent frame for each of their frames, in real time."""
    talking = await pool.open_session(CLAIMS)
    silent = await pool.open_session(BANK)
    feed = asyncio.create_task(_feed(talking, 25))
    got_talking, got_silent = await asyncio.gather(_count(talking, 2.6), _count(silent, 2.6))
    await feed
    assert got_talking >= 22
    assert got_silent == 0


async def test_stale_caller_audio_is_dropped_not_queued(pool):
    """A burst of late audio does not build up lag: the pool keeps only the newest few frames."""
    session = await pool.open_session(CLAIMS)
    for _ in range(20):
        session.push_audio(FRAME)
    produced = await _count(session, 1.0)
    assert produced <= 4
    assert _value(pool, "personagate_worker_input_frames_shed_total") >= 16


async def test_an_overrunning_tick_resynchronises(pool):
    """When a step takes longer than the frame (a GPU hiccup), the pool skips ahead instead of
    accumulating lag: deadline misses are counted, stale audio is dropped, real time resumes."""
    session = await pool.open_session(CLAIMS)
    real_step = pool.batch.step
    stalls = {"left": 3}

    def slow_step(*args, **kwargs):
        if stalls["left"] > 0:
            stalls["left"] -= 1
            time.sleep(0.3)
        return real_step(*args, **kwargs)

    pool.batch.step = slow_step
    feed = asyncio.create_task(_feed(session, 40))
    await _count(session, 1.5)
    assert _value(pool, "personagate_worker_tick_deadline_misses_total") >= 1
    assert _value(pool, "personagate_worker_tick_resyncs_total") >= 1
    assert _value(pool, "personagate_worker_input_frames_shed_total") >= 1
    assert len(session._inbound) <= pool.config.input_backlog_frames
    recovered = await _count(session, 1.0)  # back to one frame per 80 ms
    await feed
    assert recovered >= 9


async def test_full_pool_refuses_and_a_closed_call_frees_its_slot_at_once(pool):
    """When every slot is busy a new call is refused immediately (the gateway tries elsewhere);
    a call that ends frees its slot for the next caller straight away."""
    sessions = [await pool.open_session(CLAIMS) for _ in range(3)]
    with pytest.raises(PoolFull):
        await pool.open_session(CLAIMS)
    sessions[1].close("client_gone")
    await asyncio.sleep(0.05)
    assert pool.free_slots == 1
    again = await pool.open_session(BANK)
    assert again.slot == sessions[1].slot
    assert _value(pool, "personagate_worker_sessions_ended_total", reason="client_gone") == 1


async def test_a_cached_persona_starts_without_priming(pool):
    """The second call to a persona reuses its primed state (content-addressed), no priming again."""
    first = await pool.open_session(CLAIMS)
    second = await pool.open_session(CLAIMS)
    assert (first.cached, second.cached) == (False, True)
    assert _value(pool, "personagate_worker_persona_prime_seconds_count") == 1
    assert _value(pool, "personagate_worker_session_start_seconds_count", persona_cache="hit") == 1


async def test_each_session_samples_with_its_own_settings(pool):
    """A session's sampling settings reach its slot and stay with that session only: sessions of one
    persona with different sampling share its primed state (sampling is no part of priming), a
    session that gives none gets the worker's defaults, and the next session in a freed slot gets its
    own settings, not the previous session's."""
    careful = SessionSampling(temperature=0.3, top_k=20, text_temperature=0.4, text_top_k=5)
    lively = SessionSampling(temperature=1.2)
    first = await pool.open_session(CLAIMS, sampling=careful)
    second = await pool.open_session(CLAIMS)
    assert (first.cached, second.cached) == (False, True)
    assert first.sampling == careful and pool.batch.slot_sampling(first.slot) == careful
    assert second.sampling == pool.config.sampling.session_defaults() == SessionSampling()
    assert pool.batch.slot_sampling(second.slot) == SessionSampling()
    first.close("client_end")
    await asyncio.sleep(0.05)
    third = await pool.open_session(BANK, sampling=lively)
    assert third.slot == first.slot and pool.batch.slot_sampling(third.slot) == lively


async def test_the_worker_defaults_are_what_sessions_without_sampling_get():
    """An operator's sampling settings are the defaults of every session that does not give its own."""
    defaults = Sampling(temperature=0.5, top_k=40, text_temperature=0.6, text_top_k=8)
    pool = SessionPool(load_tiny(), PoolConfig(capacity=1, sampling=defaults))
    pool.start()
    try:
        session = await pool.open_session(BANK)
        assert pool.batch.slot_sampling(session.slot) == defaults.session_defaults()
    finally:
        pool.stop()


async def test_concurrent_first_calls_prime_a_persona_once(pool):
    """Several calls arriving together for a new persona share one priming."""
    sessions = await asyncio.gather(*(pool.open_session(BANK) for _ in range(3)))
    assert len({s.slot for s in sessions}) == 3
    assert _value(pool, "personagate_worker_persona_prime_seconds_count") == 1


async def test_a_bad_persona_does_not_leak_a_slot(pool):
    """A persona that cannot be primed is refused with its reason, and the slot it held is free."""
    with pytest.raises(PersonaError, match="unknown voice preset 'nobody'"):
        await pool.open_session(Persona(prompt="Hi", voice="nobody"))
    await asyncio.sleep(0.05)
    assert pool.free_slots == 3


async def test_a_caller_hanging_up_during_priming_frees_the_slot(pool):
    """A caller who hangs up while their persona is still being primed leaves no ghost session."""
    opening = asyncio.create_task(pool.open_session(Persona(prompt="Long day at the bank. " * 40, voice="tiny-low")))
    await asyncio.sleep(0)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    await asyncio.sleep(0.3)
    assert pool.free_slots == 3


async def test_priming_new_personas_does_not_interrupt_live_calls(pool):
    """While new personas are being primed for arriving calls, a call in progress keeps getting an
    agent frame every 80 ms: priming runs beside the pool's clock, never in front of it."""
    live = await pool.open_session(CLAIMS)
    arrivals: list[float] = []

    async def listen() -> None:
        while len(arrivals) < 30:
            await live.receive()
            arrivals.append(time.monotonic())

    listener = asyncio.create_task(listen())
    feeder = asyncio.create_task(_feed(live, 32))
    await asyncio.sleep(0.4)
    for i in range(4):
        newcomer = await pool.open_session(Persona(prompt=f"You are agent number {i} at the bank. " * 6,
                                                   voice="tiny-high"))
        assert not newcomer.cached
        newcomer.close("client_end")
    await asyncio.wait_for(listener, 10)
    await feeder
    # Priming one of these the reference's way (a step per prompt frame) takes over a second here;
    # frames keep coming at 80 ms with at most a short hiccup on a busy 2-core machine.
    assert max(np.diff(arrivals)) < 0.4
    assert float(np.median(np.diff(arrivals))) < 0.1


async def test_a_stopped_pool_refuses_instead_of_hanging():
    """A call offered to a pool that is not stepping is refused at once, never left waiting."""
    from agent_runtime.pool import PoolStopped

    stopped = SessionPool(load_tiny(), PoolConfig(capacity=1))
    try:
        with pytest.raises(PoolStopped):
            await asyncio.wait_for(stopped.open_session(CLAIMS), 2)
    finally:
        stopped.stop()


async def test_a_client_that_stops_reading_loses_old_frames_not_the_others(pool):
    """A gateway that stops reading one call's audio gets only its newest frames later (no growing
    lag), and the other calls are not slowed."""
    stuck = await pool.open_session(CLAIMS)
    fine = await pool.open_session(BANK)
    feeders = [asyncio.create_task(_feed(stuck, 25)), asyncio.create_task(_feed(fine, 25))]
    got_fine = await _count(fine, 2.4)
    await asyncio.gather(*feeders)
    assert got_fine >= 22
    assert stuck._outbound.qsize() <= pool.config.output_backlog_frames
    assert _value(pool, "personagate_worker_output_frames_shed_total") >= 10
