"""Fairness between calls: a single-sentence call's latency while a 256-sentence call decodes.

    python benchmarks/fairness.py --bundle models/default [--rounds 5] [--probes 10]

Starts ``python -m service serve`` on a free loopback port (default settings), then in each
round: a single-sentence call on the idle server (the baseline), then a 256-sentence call and,
20 ms after it was sent, single-sentence probe calls one after another until it returns. Prints
each round's median probe latency and the median over rounds with its range.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from service.client import wait_serving
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def sentences(n: int) -> list[str]:
    with open(REPO / "service" / "data" / "numbers_en_de.tsv", encoding="utf-8") as f:
        rows = [r[0] for r in csv.reader(f, delimiter="\t")]
    return [rows[i % len(rows)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_round(
    target: str, big: list[str], probe: str, probes: int
) -> tuple[float, float, float, float, float]:
    """Seconds: idle latency; the first, median and slowest probe's; the big call's."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.TranslatorStub(ch)
        t = time.perf_counter()
        await stub.Translate(pb.TranslateRequest(sentences=[probe]), timeout=30)
        idle = time.perf_counter() - t
        t_big = time.perf_counter()
        big_call = asyncio.ensure_future(
            stub.Translate(pb.TranslateRequest(sentences=big), timeout=120)
        )
        await asyncio.sleep(0.02)
        lat: list[float] = []
        while not big_call.done() and len(lat) < probes:
            t = time.perf_counter()
            await stub.Translate(pb.TranslateRequest(sentences=[probe]), timeout=30)
            lat.append(time.perf_counter() - t)
        resp = await big_call
        big_s = time.perf_counter() - t_big
        assert len(resp.results) == len(big)
        if not lat:
            sys.exit("the big call finished before the first probe: use a larger model")
        return idle, lat[0], statistics.median(lat), max(lat), big_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--big", type=int, default=256, help="sentences in the big call")
    ap.add_argument("serve_args", nargs="*", help="extra `serve` flags, after --")
    args = ap.parse_args()
    port = free_port()
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "service", "serve", "--bundle", args.bundle,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           *args.serve_args]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        wait_serving(target, proc)  # raises if the server exits or never gets ready
        big = sentences(args.big)
        probe = "seven hundred and twelve"
        rows = []
        for r in range(args.rounds):
            row = asyncio.run(one_round(target, big, probe, args.probes))
            rows.append(row)
            print(f"round {r + 1}: idle {row[0] * 1e3:.1f} ms; beside the big call "
                  f"({row[4] * 1e3:.0f} ms): probes first {row[1] * 1e3:.1f} ms, median "
                  f"{row[2] * 1e3:.1f} ms, slowest {row[3] * 1e3:.1f} ms")  # fmt: skip

        def summary(k: int) -> str:
            xs = [row[k] * 1e3 for row in rows]
            return f"{statistics.median(xs):.1f} ms (range {min(xs):.1f}–{max(xs):.1f})"

        print(f"over {args.rounds} rounds, a single-sentence call beside a {args.big}-sentence "
              f"call: first probe {summary(1)}, median probe {summary(2)}, slowest probe "
              f"{summary(3)}; idle {summary(0)}; the big call {summary(4)}")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
