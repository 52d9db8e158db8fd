"""Per-packet cost of the call audio path, per direction (not a test: timings depend on the machine).

    .venv/bin/python -m personagate_bench.audio [--seconds 60] [--line-rates 8000,16000,48000] [--quality HQ]
                                            [--engines fir,soxr]

Inbound: one 20 ms line packet through ``LineToModel`` (resample to 24 kHz, cut 80 ms frames, to bytes).
Outbound: one 80 ms agent frame through ``ModelToLine`` and its packets through the ``OutboundPacer``
(``put`` on the producer side, ``get`` as the clock does), divided by the packets it makes.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gateway.audio.framing import MODEL_FRAME_SAMPLES, LineToModel, ModelToLine
from gateway.audio.pacing import OutboundPacer


def bench_audio_path(line_rate: int = 8000, seconds: float = 60.0, quality: str = "HQ",
                     engine: str = "fir") -> dict[str, float | int | str]:
    """Microseconds per 20 ms packet, each direction, over ``seconds`` of call audio."""
    rng = np.random.default_rng(0)
    packet_samples = line_rate // 50
    packets = int(seconds * 50)
    line_audio = rng.integers(-8000, 8000, packet_samples * packets, dtype=np.int16)
    agent_audio = rng.integers(-8000, 8000, MODEL_FRAME_SAMPLES * (packets // 4), dtype=np.int16)
    agent_frames = [agent_audio[i:i + MODEL_FRAME_SAMPLES].tobytes()
                    for i in range(0, len(agent_audio), MODEL_FRAME_SAMPLES)]

    inbound = LineToModel(line_rate, quality=quality, engine=engine)
    started = time.perf_counter()
    for i in range(packets):
        inbound.push(line_audio[i * packet_samples:(i + 1) * packet_samples])
    inbound_us = (time.perf_counter() - started) / packets * 1e6

    outbound = ModelToLine(line_rate, quality=quality, engine=engine)
    pacer = OutboundPacer(packet_samples)
    out = np.empty(packet_samples, dtype=np.int16)
    started = time.perf_counter()
    for frame in agent_frames:
        for packet in outbound.push(frame):
            pacer.put(packet)
        for _ in range(4):
            pacer.get(out)
    outbound_us = (time.perf_counter() - started) / (4 * len(agent_frames)) * 1e6
    return {"line_rate": line_rate, "engine": engine, "quality": quality, "packets": packets,
            "inbound_us_per_packet": round(inbound_us, 2), "outbound_us_per_packet": round(outbound_us, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personagate_bench.audio", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="call audio per measurement (default 60)")
    parser.add_argument("--line-rates", default="8000,16000,48000")
    parser.add_argument("--quality", default="HQ", choices=["HQ", "VHQ"])
    parser.add_argument("--engines", default="fir,soxr", help="resampler engines to measure (default fir,soxr)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    args = parser.parse_args(argv)
    results = [bench_audio_path(int(rate), args.seconds, args.quality, engine)
               for engine in args.engines.split(",") for rate in args.line_rates.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['line_rate']} Hz {r['engine']} {r['quality']}: inbound {r['inbound_us_per_packet']:.1f} µs per 20 ms packet, "
                  f"outbound {r['outbound_us_per_packet']:.1f} µs per 20 ms packet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
