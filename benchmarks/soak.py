"""Soak test: a long steady load at ~70% of capacity against `python -m service serve`.

    python benchmarks/soak.py --bundle models/default --minutes 10      # or: make soak

1. Measures capacity: closed loop, 64 concurrent single-sentence calls, 20 s.
2. Offers 70% of it as an open loop (Poisson arrivals) for --minutes; latency is measured from
   each call's scheduled send time, so a stalled server cannot hide its queueing.
3. Reports per minute: calls, errors by code, p50/p90/p99/max latency, and the server's RSS;
   then whether it passed: zero errors, RSS growth after the first minute under 5% (the RSS
   of the server and its decode process together).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.service_throughput import (  # noqa: E402
    closed_loop,
    free_port,
    number_sentences,
    wait_ready,
)
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb  # noqa: E402
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of the server and its child processes (the decode process), MiB."""
    total = 0.0
    for p in (pid, *children(pid)):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:  # exited between listing and reading
            pass
    return total or float("nan")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


async def open_loop(
    target: str, sentences: list[str], rate: float, seconds: float, pid: int
) -> list[dict]:
    rng = random.Random(3)
    minutes: list[dict] = []
    lat: list[float] = []
    codes: Counter[str] = Counter()
    start = time.monotonic()
    minute_end = start + 60
    pending: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.TranslatorStub(ch)

        async def one(scheduled: float, s: str) -> None:
            try:
                await stub.Translate(pb.TranslateRequest(sentences=[s]), timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
            lat.append(time.monotonic() - scheduled)

        def close_minute() -> None:
            a = np.array(lat or [0.0]) * 1000
            minutes.append(
                {
                    "minute": len(minutes) + 1,
                    "calls": sum(codes.values()),
                    "errors": {k: v for k, v in codes.items() if k != "OK"},
                    "p50_ms": round(float(np.percentile(a, 50)), 1),
                    "p90_ms": round(float(np.percentile(a, 90)), 1),
                    "p99_ms": round(float(np.percentile(a, 99)), 1),
                    "max_ms": round(float(a.max()), 1),
                    "rss_mib": round(rss_mib(pid), 1),
                }
            )
            print(json.dumps(minutes[-1]), flush=True)
            lat.clear()
            codes.clear()

        t = start
        while t < start + seconds:
            t += rng.expovariate(rate)
            delay = t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if t >= minute_end:
                close_minute()
                minute_end += 60
            task = asyncio.create_task(one(t, rng.choice(sentences)))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        close_minute()
    return minutes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=0.7, help="share of measured capacity")
    ap.add_argument("--json", help="write the per-minute figures here")
    args = ap.parse_args()
    sentences = number_sentences(2000, seed=11)
    port = free_port()
    cmd = [sys.executable, "-m", "service", "serve", "--bundle", args.bundle,
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    target = f"127.0.0.1:{port}"
    try:
        wait_ready(target, proc, 1)
        cap = asyncio.run(closed_loop(target, sentences, 64, duration=10.0, warmup=3.0))
        rate = args.load * cap["sentences_s"]
        print(f"capacity {cap['sentences_s']:.0f} calls/s; offering {rate:.0f} calls/s "
              f"for {args.minutes:g} min", flush=True)  # fmt: skip
        minutes = asyncio.run(open_loop(target, sentences, rate, args.minutes * 60, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    errors = sum(sum(m["errors"].values()) for m in minutes)
    base = minutes[0]["rss_mib"]
    growth = (max(m["rss_mib"] for m in minutes[1:]) / base - 1) if len(minutes) > 1 else 0.0
    print("\n| minute | calls | errors | p50 ms | p90 ms | p99 ms | max ms | RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in minutes:
        print(f"| {m['minute']} | {m['calls']} | {sum(m['errors'].values())} | {m['p50_ms']} | "
              f"{m['p90_ms']} | {m['p99_ms']} | {m['max_ms']} | {m['rss_mib']} |")  # fmt: skip
    print(f"\nerrors {errors}; RSS growth after minute 1: {growth * 100:.1f}%; "
          f"server exit code {code}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"capacity": cap, "rate": rate,
                                               "minutes": minutes}, indent=2))  # fmt: skip
    ok = errors == 0 and growth < 0.05 and code == 0
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
