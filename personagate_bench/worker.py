"""``personagate bench worker``: what one worker can carry, measured in one run.

- tick step time p50/p99 with B slots all live (Mimi encode + LM step + Mimi decode, per 80 ms frame);
- real-time capacity: the most slots whose p99 tick stays within the 80 ms frame;
- batching gain: B sessions stepped together against B independent sessions stepped one by one,
  as a throughput ratio (B x t(1) / t(B));
- session start: the reference's step-per-frame priming against this runtime's parallel prefill
  (persona not yet cached) and snapshot restore (persona cached), as ratios; and the start latency a
  caller sees through a running pool with a cached persona.

``--random-weights`` (with ``--model personaplex``, benchmarks only): PersonaPlex-7B's exact
architecture with seeded random weights, for machines without the checkpoint. A step costs the same
whatever the weights hold, so the figures are real speed figures; nothing the model says means
anything, and the report says so.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from moshi.models import LMGen

from agent_runtime.batch import SlotBatch, kv_bytes_per_slot
from agent_runtime.config import Sampling, WorkerSettings
from agent_runtime.model import LOADERS, ModelBundle
from agent_runtime.pool import PoolConfig, SessionPool
from agent_runtime.priming import PrimePlan, Primer, plan_priming
from agent_runtime.voice_prompt import load_voice, prompt_tokens
from personagate_common.persona import Persona
from personagate_common.protocol import FRAME_SAMPLES

from .random_weights import load_personaplex_random

FRAME_MS = 80.0
RANDOM_WEIGHTS_NOTE = (
    "random weights (seeded), PersonaPlex-7B's architecture: speed figures only; the model's output is noise"
)
BENCH_PROMPT = (
    "You work for Harbor Mutual Insurance, which handles car and home claims, and your name is Sam. "
    "Information: claims are registered by phone around the clock; an adjuster calls back within two "
    "business days; callers need their policy number. Be warm, brief and precise."
)


def run_worker_bench(
    settings: WorkerSettings, sizes: list[int], *, ticks: int, warmup: int, as_json: bool, max_slots: int = 128,
    random_weights: bool = False,
) -> int:
    """``random_weights``: PersonaPlex's architecture with random weights instead of ``settings``'
    model (whose ``model``/``weights`` are then ignored)."""
    if random_weights:
        _progress(RANDOM_WEIGHTS_NOTE)
    bundle = _load(settings, random_weights)
    _progress(f"model {bundle.name} on {bundle.device}: {_weights_bytes(bundle) / 2**30:.2f} GiB of weights")
    sampling = settings.sampling
    voice_name = min(bundle.voices) if bundle.voices else None
    if voice_name is None:
        print("personagate: the model has no voice presets to prime with", file=sys.stderr)
        return 2
    persona = Persona(prompt=BENCH_PROMPT, voice=voice_name)
    primer = Primer(bundle, sampling.lm_gen_kwargs())
    plan = plan_priming(bundle, load_voice(bundle, persona, primer.mimi), prompt_tokens(bundle, persona.prompt))
    primed = primer.prime(plan, persona.content_hash())

    memory: dict[int, dict[str, float]] = {}
    ticks_by_size = {b: _tick_times(bundle, sampling, primed, b, ticks, warmup, memory) for b in sizes}
    single = ticks_by_size.get(1) or _tick_times(bundle, sampling, primed, 1, ticks, warmup)
    rows = [_row(b, times, single) | memory.get(b, {}) for b, times in sorted(ticks_by_size.items())]

    # Session start before the capacity search: the search is the longest part and the least needed.
    realtime_sizes = [b for b, t in ticks_by_size.items() if t and _pct(t, 99) <= FRAME_MS]
    load_calls = min(32, max(realtime_sizes, default=0))
    start = _session_start(bundle, sampling, primer, plan, primed, persona, load_calls)
    realtime_calls = _realtime_capacity(bundle, sampling, primed, ticks_by_size, ticks, warmup, max_slots)
    lm = bundle.lm
    report = {
        "weights": "random" if bundle.random_weights else "checkpoint",
        **({"note": RANDOM_WEIGHTS_NOTE} if random_weights else {}),
        "machine": _machine(bundle),
        "model": {"name": bundle.name, "dim": lm.dim, "layers": len(lm.transformer.layers),
                  "depth_steps": {"generated": lm.dep_q, "in_weights": len(lm.linears)},
                  "context_frames": int(lm.context or 0),
                  "dtype": str(bundle.dtype).removeprefix("torch."),
                  "weights_gib": round(_weights_bytes(bundle) / 2**30, 2)},
        "sampling": "greedy" if sampling.greedy else "per-slot sampling (temperature, top-k)",
        "prompt_frames": primed.position,
        "attention_cache_mib_per_slot": round(kv_bytes_per_slot(bundle) / 2**20, 1),
        "primed_persona_mib": round(sum(t.numel() * t.element_size() for t in primed.kv) / 2**20, 2),
        "ticks_measured": ticks,
        "ticks": rows,
        "realtime_calls": realtime_calls,
        "session_start": start,
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _row(slots: int, times: list[float], single: list[float]) -> dict[str, Any]:
    if not times:
        return {"batch": slots, "error": "does not fit in device memory", "realtime": False}
    p50, p99 = _pct(times, 50), _pct(times, 99)
    return {
        "batch": slots,
        "tick_p50_ms": round(p50, 2),
        "tick_p99_ms": round(p99, 2),
        "realtime": p99 <= FRAME_MS,
        "batched_vs_independent_throughput": round(slots * _pct(single, 50) / p50, 2),
    }


def _realtime_capacity(bundle, sampling, primed, measured: dict[int, list[float]], ticks: int, warmup: int,
                       max_slots: int) -> int:
    """The most slots with p99 tick <= 80 ms: grow past the largest measured size by doubling, then
    bisect between the last size that kept real time and the first that did not."""
    fits = {b: bool(t) and _pct(t, 99) <= FRAME_MS for b, t in measured.items()}  # empty: did not fit in memory

    def fit(slots: int) -> bool:
        if slots not in fits:
            times = _tick_times(bundle, sampling, primed, slots, ticks, warmup)
            fits[slots] = bool(times) and _pct(times, 99) <= FRAME_MS
        return fits[slots]

    good = max((b for b, ok in fits.items() if ok), default=0)
    bad = min((b for b, ok in fits.items() if not ok and b > good), default=None)
    while bad is None and good < max_slots:
        probe = min(max(1, good) * 2, max_slots)
        if fit(probe):
            good = probe
        else:
            bad = probe
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if fit(middle):
            good = middle
        else:
            bad = middle
    return good


def _load(settings: WorkerSettings, random_weights: bool = False) -> ModelBundle:
    if random_weights:
        return load_personaplex_random(settings.seed, settings.device)
    if settings.model == "personaplex":
        return LOADERS["personaplex"](settings.weights, settings.device)
    return LOADERS["tiny"](settings.seed, settings.device or "cpu")


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _weights_bytes(bundle: ModelBundle) -> int:
    tensors = [*bundle.lm.parameters(), *bundle.lm.buffers(), *bundle.mimi.parameters(), *bundle.mimi.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _sync(bundle: ModelBundle) -> None:
    if bundle.device.type == "cuda":
        torch.cuda.synchronize(bundle.device)


def _release_memory(bundle: ModelBundle) -> None:
    """Hand a closed batch's memory (attention cache, CUDA graph pools) back to the device, so that the
    next size's memory check sees it as free."""
    gc.collect()
    if bundle.device.type == "cuda":
        torch.cuda.empty_cache()


def _tick_times(bundle: ModelBundle, sampling: Sampling, primed, slots: int, ticks: int, warmup: int,
                memory: dict[int, dict[str, float]] | None = None) -> list[float]:
    """Milliseconds per tick with every slot live and fed a frame of (noise) caller audio; empty
    when that many slots do not fit in device memory. On a GPU, ``memory[slots]`` gets the device
    memory in use with the batch installed and its peak over the ticks."""
    cuda = bundle.device.type == "cuda"
    _release_memory(bundle)
    if cuda:
        torch.cuda.reset_peak_memory_stats(bundle.device)
    try:
        batch = SlotBatch(bundle, slots, sampling)
    except (MemoryError, torch.OutOfMemoryError) as exc:
        _progress(f"{slots} slots: do not fit ({exc})")
        _release_memory(bundle)
        return []
    times: list[float] = []
    try:
        for slot in range(slots):
            batch.install(slot, primed)
        rng = np.random.default_rng(0)
        executing = np.ones(slots, dtype=bool)
        times = []
        for i in range(warmup + ticks):
            pcm = (rng.standard_normal((slots, FRAME_SAMPLES)) * 0.05).astype(np.float32)
            _sync(bundle)
            started = time.perf_counter()
            batch.step(pcm, executing)  # returns host arrays, so the device work is done
            elapsed = (time.perf_counter() - started) * 1000
            if i >= warmup:
                times.append(elapsed)
        if cuda and memory is not None:
            memory[slots] = {"gpu_allocated_gib": round(torch.cuda.memory_allocated(bundle.device) / 2**30, 2),
                             "gpu_peak_gib": round(torch.cuda.max_memory_allocated(bundle.device) / 2**30, 2)}
    except torch.OutOfMemoryError as exc:
        _progress(f"{slots} slots: out of memory while stepping ({exc})")
        times = []
    finally:
        batch.close()
        del batch
        _release_memory(bundle)
    if times:
        _progress(f"{slots} slots: tick p50 {_pct(times, 50):.1f} ms, p99 {_pct(times, 99):.1f} ms")
    return times


@torch.no_grad()
def _prime_step_by_step(bundle: ModelBundle, sampling: Sampling, plan: PrimePlan) -> float:
    """The reference server's way: one full model step (temporal + depth transformer) per prompt
    frame, forcing the prompt tokens. Returns seconds. (Token-for-token equality with the fast path
    is tests/test_priming.py's job; this only measures the cost.)"""
    columns = plan.columns
    forced: dict[str, torch.Tensor | None] = {"text": None, "audio": None}

    def on_text(tokens: torch.Tensor) -> None:
        if forced["text"] is not None:
            tokens[:] = forced["text"]

    def on_audio(tokens: torch.Tensor) -> None:
        if forced["audio"] is not None:
            tokens[:] = forced["audio"]

    lm = bundle.lm
    lm_gen = LMGen(lm, on_text_hook=on_text, on_audio_hook=on_audio, **sampling.lm_gen_kwargs())
    device = bundle.device
    steps = plan.length
    sine = bundle.sine_codes.view(1, 8, 1)
    _sync(bundle)
    started = time.perf_counter()
    with lm_gen.streaming(1):
        for c in range(steps):
            nxt = columns[:, min(c + 1, columns.shape[1] - 1)].to(device)
            forced["text"] = nxt[:1]
            forced["audio"] = nxt[1:9][None]
            lm_gen.step(sine)
    _sync(bundle)
    return time.perf_counter() - started


def _session_start(bundle, sampling, primer: Primer, plan: PrimePlan, primed, persona: Persona,
                   load_calls: int = 0) -> dict[str, Any]:
    """``load_calls``: also measure starts through a pool with that many calls live (the new one
    included)."""
    naive = [_prime_step_by_step(bundle, sampling, plan) * 1000 for _ in range(3)]
    prefill = [primer.prime(plan, "bench").prime_seconds * 1000 for _ in range(5)]
    batch = SlotBatch(bundle, 1, sampling)
    restores = []
    try:
        for _ in range(20):
            _sync(bundle)
            started = time.perf_counter()
            batch.install(0, primed)
            _sync(bundle)
            restores.append((time.perf_counter() - started) * 1000)
    finally:
        batch.close()
    _release_memory(bundle)
    through_pool = asyncio.run(_starts_through_pool(bundle, sampling, persona))
    _release_memory(bundle)
    loaded: dict[str, Any] = {}
    if load_calls > 2:
        under_load = asyncio.run(_starts_through_pool(bundle, sampling, persona, busy_calls=load_calls - 1))
        _release_memory(bundle)
        loaded = {"pool_start_cached_under_load": {
            "live_calls": load_calls, "p50_ms": round(_pct(under_load, 50), 2),
            "p95_ms": round(_pct(under_load, 95), 2), "max_ms": round(max(under_load), 2)}}
        _progress(f"session start with {load_calls} calls live: p50 {_pct(under_load, 50):.1f} ms, "
                  f"p95 {_pct(under_load, 95):.1f} ms")
    naive_ms, prefill_ms, restore_ms = statistics.median(naive), statistics.median(prefill), statistics.median(restores)
    _progress(f"session start: step-by-step {naive_ms:.0f} ms, prefill {prefill_ms:.1f} ms, restore "
              f"{restore_ms:.2f} ms, through the pool p50 {_pct(through_pool, 50):.1f} ms "
              f"p95 {_pct(through_pool, 95):.1f} ms")
    return {
        "naive_step_by_step_ms": round(naive_ms, 2),
        "prefill_uncached_ms": round(prefill_ms, 2),
        "restore_cached_ms": round(restore_ms, 3),
        "naive_over_prefill": round(naive_ms / prefill_ms, 1),
        "naive_over_cached": round(naive_ms / restore_ms, 1),
        "pool_start_cached_p50_ms": round(_pct(through_pool, 50), 2),
        "pool_start_cached_p95_ms": round(_pct(through_pool, 95), 2),
        **loaded,
    }


async def _starts_through_pool(bundle: ModelBundle, sampling: Sampling, persona: Persona, busy_calls: int = 1,
                               starts: int = 40) -> list[float]:
    """Session request -> ready through a running pool (warmed up, as the worker does) while
    ``busy_calls`` other calls are live and being stepped."""
    pool = SessionPool(bundle, PoolConfig(capacity=busy_calls + 1, sampling=sampling))
    pool.warm_up(persona)
    pool.start()
    tasks: list[asyncio.Task] = []
    try:
        busy = [await pool.open_session(persona) for _ in range(busy_calls)]
        rng = np.random.default_rng(1)
        frame = (rng.standard_normal(FRAME_SAMPLES) * 1000).astype("<i2").tobytes()

        async def keep_talking(session) -> None:
            while not session.closed:
                session.push_audio(frame)
                await asyncio.sleep(FRAME_MS / 1000)

        async def drain(session) -> None:
            while not session.closed:
                await session.receive()

        tasks = [asyncio.create_task(job(s)) for s in busy for job in (keep_talking, drain)]
        times = []
        for _ in range(starts):
            while pool.free_slots == 0:  # the last call's slot is freed between ticks
                await asyncio.sleep(0.005)
            await asyncio.sleep(float(rng.uniform(0, FRAME_MS / 1000)))  # any phase of the tick
            session = await pool.open_session(persona)
            times.append(session.start_seconds * 1000)
            session.close("bench")
        for session in busy:
            session.close("bench")
        return times
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pool.stop()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _machine(bundle: ModelBundle) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(bundle.device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if bundle.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(bundle.device)
    return info


def _print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    if "note" in report:
        print(f"NOTE: {report['note']}")
    print(f"model {report['model']['name']} ({report['model']['dtype']}, {report['weights']} weights, "
          f"{report['model']['weights_gib']} GiB) on {m.get('gpu', m['device'])}, "
          f"{m['cpu_count']} CPUs, torch {m['torch']}; {report['sampling']}")
    print(f"{'slots':>5} {'p50 ms':>8} {'p99 ms':>8} {'real time':>9} {'batched/independent':>20}")
    for r in report["ticks"]:
        if "error" in r:
            print(f"{r['batch']:>5} {r['error']}")
            continue
        print(f"{r['batch']:>5} {r['tick_p50_ms']:>8} {r['tick_p99_ms']:>8} {r['realtime']!s:>9} "
              f"{r['batched_vs_independent_throughput']:>20}")
    print(f"real-time calls: {report['realtime_calls']}")
    print(f"attention cache per slot: {report['attention_cache_mib_per_slot']} MiB; "
          f"a primed persona: {report['primed_persona_mib']} MiB ({report['prompt_frames']} frames)")
    for key, value in report["session_start"].items():
        print(f"{key}: {value}")
