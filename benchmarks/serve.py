"""Generation service throughput and latency, batched vs one-at-a-time, over the real broker.

    python -m benchmarks.serve [--quick | --smoke] [--out DIR]

An aggregator (one cluster adapter in its global model) serves requests from 1, 8 and 32
concurrent requesters; each requester is a real enrolled device connection that sends a
sealed request and waits for its encrypted images before sending the next. Each mode runs
in the same process against the same model; ratios, not absolute times, are the claim.
Writes benchmarks/results/serve.json and serve.png.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aggregator.broker import ensure_broker  # noqa: E402
from aggregator.config import AggregatorConfig  # noqa: E402
from aggregator.service import AggregatorService  # noqa: E402
from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from edge_sdk.protocol.envelope import MessageType  # noqa: E402
from models.text import PromptEncoder  # noqa: E402

CONCURRENCY = (1, 8, 32)
MODES = ("one_at_a_time", "batched")


def _requester_loop(device, encoding, stop_at: float, latencies: list, lock: threading.Lock) -> None:
    while time.monotonic() < stop_at:
        sent = time.monotonic()
        device.generate(encoding, {0: 1.0}, n=1, seed=len(latencies))
        with lock:
            latencies.append(time.monotonic() - sent)


def run_mode(mqtt_url: str, batched: bool, concurrency: int, seconds: float, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AggregatorConfig(aggregator_id=f"serve-{uuid.uuid4().hex[:6]}", mqtt_url=mqtt_url, state_dir=Path(tmp),
                               tokens=(DEMO_TOKEN,), expected_devices=1, serve_max_batch=64 if batched else 1,
                               serve_max_wait_s=0.02 if batched else 0.0,
                               serve_device_rate=None)  # throughput, not metering: no per-device limit
        service = AggregatorService(cfg).start()
        service.generation.service.steps = steps
        service.global_model.set_cluster(0, service.initial, 0)
        devices = [LiteDevice(mqtt_url).start() for _ in range(concurrency)]
        for d in devices:
            d.enrol()
            d.wait_for(MessageType.ENROL_ACK)
        encoding = PromptEncoder().encode(["a chunky 7"])[0]
        latencies: list[float] = []
        lock = threading.Lock()
        started = time.monotonic()
        stop_at = started + seconds
        threads = [threading.Thread(target=_requester_loop, args=(d, encoding, stop_at, latencies, lock))
                   for d in devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        calls = len(service.generation.service.batches)
        for d in devices:
            d.stop()
        service.stop()
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "seconds": elapsed, "requests_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "sampling_calls": calls, "images_per_call": len(latencies) / max(1, calls)}


def plot(result: dict, out: Output) -> None:
    m = result["modes"]
    conc = sorted(int(c) for c in m)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for mode in MODES:
        axes[0].plot(conc, [m[str(c)][mode]["requests_per_s"] for c in conc], marker="o", label=mode)
        axes[1].plot(conc, [m[str(c)][mode]["p95_ms"] for c in conc], marker="o", label=mode)
    axes[0].set(xscale="log", xlabel="concurrent requesters", ylabel="requests / s", title="throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent requesters", ylabel="p95 latency (ms)", title="latency")
    axes[0].legend(fontsize=8)
    out.save_figure(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per request")
    add_arguments(parser)
    args = parser.parse_args()
    out = Output.of(parser, args, "serve")
    broker = ensure_broker(args.mqtt_url)
    concurrency, seconds, steps = ((1, 4), 1.0, 2) if args.smoke else (CONCURRENCY, 8.0 if args.quick else 25.0,
                                                                        args.steps)
    result: dict = {"steps": steps, "seconds_per_mode": seconds, "modes": {}}
    try:
        for c in concurrency:
            for mode in MODES:
                r = run_mode(args.mqtt_url, mode == "batched", c, seconds, steps)
                result["modes"].setdefault(str(c), {})[mode] = r
                print(c, mode, {k: round(v, 2) for k, v in r.items()}, flush=True)
    finally:
        if broker is not None:
            broker.close()
    m = result["modes"]
    result["requests_per_s"] = {c: {mode: v["requests_per_s"] for mode, v in d.items()} for c, d in m.items()}
    result["p95_ms"] = {c: {mode: v["p95_ms"] for mode, v in d.items()} for c, d in m.items()}
    top = str(max(concurrency))
    speedup = m[top]["batched"]["requests_per_s"] / m[top]["one_at_a_time"]["requests_per_s"]
    result[f"batched_speedup_at_{top}"] = speedup
    out.write(result)
    plot(result, out)
    print(f"batched speedup at {top} requesters: {speedup:.2f}x")


if __name__ == "__main__":
    main()
