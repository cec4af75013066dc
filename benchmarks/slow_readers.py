"""Server memory under TranslateStream clients that never read their results.

    python benchmarks/slow_readers.py --bundle models/default [--streams 100] [--seconds 10]

Starts ``python -m service serve`` (default settings) on a free loopback port, then opens
``--streams`` streams of ``--sentences`` long sentences (~56 tokens each), asking for every
layer's attention, and never reads them (a stream refused because the queue is full is opened
again, for ``--seconds``).
Samples the server's resident memory every 0.25 s, and prints its peak against the idle
figure, how the streams ended (still open, or refused), and the sentences the server decoded
(its /metrics). Then cancels them all and times an ordinary call.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from benchmarks.fairness import free_port, sentences
from service.client import wait_serving
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metric(metrics_port: int, prefix: str) -> float:
    """The sum of the server's samples whose line starts with prefix."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def decoded(metrics_port: int) -> float:
    return metric(metrics_port, "nmtserve_sentences_total{")


def long_sentences(n: int) -> list[str]:
    """n sentences of ~56 tokens each (four of the shipped data's longest numbers), so that
    n = 64 stays within the default per-call limit of 4,096 source tokens."""
    rows = sorted(sentences(20000), key=len, reverse=True)
    return [" ".join(rows[(4 * i + k) % len(rows)] for k in range(4)) for i in range(n)]


async def run(
    target: str,
    pid: int,
    metrics_port: int,
    streams: int,
    n: int,
    seconds: float,
    connections: int,
) -> None:
    request = pb.TranslateRequest(
        sentences=long_sentences(n), options=pb.TranslateOptions(attention=pb.ATTENTION_ALL_LAYERS)
    )
    idle = rss_mib(pid)
    before = decoded(metrics_port)
    # Without BDP probing a client's flow-control window stays at 64 KiB, so the server's writes
    # block once it is full, as they do for a client that stopped reading its socket (with
    # probing, grpc's client transport takes megabytes for the application to read later).
    channels = [
        grpc.aio.insecure_channel(
            target, options=[("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(connections)
    ]  # a local subchannel pool each: one TCP connection per channel
    stubs = [pb_grpc.TranslatorStub(ch) for ch in channels]
    try:
        stub = stubs[0]
        # Streams that are refused (the queue is full while others decode) are opened again,
        # as a client that retries would, until `seconds` have passed.
        calls = [stubs[k % connections].TranslateStream(request) for k in range(streams)]
        refused: dict[str, int] = {}
        peak = idle
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(0.25)
            peak = max(peak, rss_mib(pid))
            for k, c in enumerate(calls):
                if c.done():
                    code = (await c.code()).name
                    refused[code] = refused.get(code, 0) + 1
                    calls[k] = stubs[k % connections].TranslateStream(request)
        reserved = metric(metrics_port, "nmtserve_result_buffer_bytes ") / 2**20
        print(
            f"{streams} unread streams over {connections} connections, {n} long sentences "
            f"with every layer's attention, refused ones opened again for {seconds:.0f} s: server "
            f"RSS {idle:.0f} MiB idle, peak {peak:.0f} MiB (+{peak - idle:.0f}); sentences decoded "
            f"{decoded(metrics_port) - before:.0f}; refusals on the way: {refused}; reserved by "
            f"the streams at the end: {reserved:.0f} MiB (0 where the server has no such bound)"
        )
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as own:
            t = time.perf_counter()
            await pb_grpc.TranslatorStub(own).Translate(
                pb.TranslateRequest(sentences=["seven"]), timeout=30
            )
            print(
                "meanwhile, an ordinary call on a connection of its own took "
                f"{(time.perf_counter() - t) * 1e3:.0f} ms (while the refused streams are "
                "opened again)"
            )
        for c in calls:
            c.cancel()
        t = time.perf_counter()
        ok = await stub.Translate(pb.TranslateRequest(sentences=["seven"]), timeout=30)
        print(
            f"after cancelling them: an ordinary call took {(time.perf_counter() - t) * 1e3:.0f} "
            f"ms ({ok.results[0].translation!r}); RSS {rss_mib(pid):.0f} MiB"
        )
    finally:
        for ch in channels:
            await ch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--sentences", type=int, default=64, help="per stream")
    ap.add_argument("--connections", type=int, default=8, help="the streams spread over them")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("serve_args", nargs="*", help="extra `serve` flags, after --")
    args = ap.parse_args()
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "service", "serve", "--bundle", args.bundle,
           "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
           "--log-level", "warning", *args.serve_args]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        wait_serving(target, proc)
        asyncio.run(
            run(
                target,
                proc.pid,
                metrics_port,
                args.streams,
                args.sentences,
                args.seconds,
                args.connections,
            )
        )
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
