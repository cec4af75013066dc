"""Service throughput against offline batched decoding of the same sentences, in one run.

    python benchmarks/service_throughput.py --bundle models/default     # or: make bench-service

1. Offline: the bundle's graphs through ``service.engine.Engine.decode_all`` (no scheduler, no
   gRPC), batches of up to 64 sentences grouped by length — the best case for the hardware.
2. Service: ``python -m service serve`` in its own process, driven by the project's load
   tester (``service.loadtest``, closed loop) with single-sentence calls from N concurrent
   clients, for N = 1, 8, 32, 64.

Prints sentences/s, generated tokens/s and latency percentiles, and the ratio of each service
figure to the offline figure measured in the same run. The machine is shared: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import sentencepiece as spm  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from service.bundle import load_bundle  # noqa: E402
from service.engine import Engine, SentenceJob  # noqa: E402
from service.loadtest import Corpus, Settings, run_load, summarize  # noqa: E402
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb  # noqa: E402
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc  # noqa: E402
from service.runtime import Runtime, RuntimeConfig  # noqa: E402


def number_sentences(n: int, seed: int) -> list[str]:
    from num2words import num2words

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d = rng.randint(1, 6)
        out.append(num2words(rng.randrange(10 ** (d - 1) if d > 1 else 0, 10**d), lang="en"))
    return out


def offline(bundle_dir: str, sentences: list[str], threads: int, repeats: int) -> dict:
    bundle = load_bundle(bundle_dir)
    sp = spm.SentencePieceProcessor(model_file=str(bundle.tokenizer_path))
    engine = Engine(Runtime(bundle, RuntimeConfig("cpu", "fp32", threads)), bundle.limits)

    def jobs() -> list[SentenceJob]:
        return [
            SentenceJob(ids, bundle.limits.target_limit(len(ids)))
            for ids in (list(sp.encode(s)) for s in sentences)
        ]

    engine.decode_all(jobs()[:64])  # warm-up
    best = None
    for _ in range(repeats):
        t = time.perf_counter()
        results = engine.decode_all(jobs(), max_rows=64)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    tokens = sum(len(r.token_ids) for r in results)
    assert best is not None
    return {"seconds": best, "sentences_s": len(sentences) / best, "tokens_s": tokens / best}


class _Echo(pb_grpc.TranslatorServicer):
    """Answers without translating: the cost of the gRPC round trip alone."""

    async def Translate(self, request, context):
        return pb.TranslateResponse(
            results=[pb.TranslationResult(translation=request.sentences[0], token_ids=[5, 6, 7])]
        )


async def echo_server(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_TranslatorServicer_to_server(_Echo(), server)
    health = __import__("grpc_health.v1.health", fromlist=["aio"]).aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(target: str, proc: subprocess.Popen[bytes], status_ok: int) -> None:
    """Polls the health service until it reports status_ok."""
    with grpc.insecure_channel(target) as ch:
        hs = health_pb2_grpc.HealthStub(ch)
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if hs.Check(health_pb2.HealthCheckRequest(), timeout=1).status == status_ok:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{target} never became ready")


async def closed_loop(target: str, sentences: list[str], concurrency: int) -> dict:
    """The project's load tester (service.loadtest), closed loop: len(sentences) single-sentence
    calls drawn from `sentences` by `concurrency` clients, no warm-up."""
    settings = Settings(
        target, concurrency=concurrency, requests=len(sentences), progress=False, timeout=60
    )
    corpus = Corpus(sentences, None)
    summary = summarize(await run_load(settings, corpus), settings, corpus)
    if summary["errors"]:
        raise RuntimeError(f"errors under load: {summary['errors']}")
    return {
        "seconds": summary["measured_s"],
        "sentences_s": summary["sentences_per_s"],
        "tokens_s": summary["tokens_per_s"],
        "p50_ms": summary["latency_ms"]["p50"],
        "p99_ms": summary["latency_ms"]["p99"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--sentences", type=int, default=1024)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all usable)")
    ap.add_argument("--repeats", type=int, default=3, help="offline repeats (best is kept)")
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    if args.echo_server:
        asyncio.run(echo_server(args.echo_server))
        return 0
    sentences = number_sentences(args.sentences, seed=7)
    off = offline(args.bundle, sentences, args.threads, args.repeats)

    concurrency = [int(x) for x in args.concurrency.split(",")]

    def measure(cmd: list[str], port: int, health_ok: int) -> list[dict]:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rows = []
        try:
            target = f"127.0.0.1:{port}"
            wait_ready(target, proc, health_ok)
            asyncio.run(closed_loop(target, sentences[:64], 8))  # warm-up
            for c in concurrency:
                n = len(sentences) if c > 1 else max(64, len(sentences) // 8)
                res = asyncio.run(closed_loop(target, sentences[:n], c))
                rows.append({"concurrency": c, **res})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        return rows

    port = free_port()
    serve = [
        *(sys.executable, "-m", "service", "serve", "--bundle", args.bundle, "--port", str(port)),
        *("--provider", "cpu", "--threads", str(args.threads), "--max-batch-rows", "64"),
        *("--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"),
    ]
    rows = measure(serve, port, 1)
    port = free_port()
    echo = measure([sys.executable, __file__, "--echo-server", str(port)], port, 1)
    print(f"\nbundle {args.bundle}, {len(sentences)} single-sentence requests, "
          f"onnxruntime threads {args.threads or 'all usable'}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"offline batched decode: {off['sentences_s']:.0f} sentences/s, "
          f"{off['tokens_s']:.0f} tokens/s\n")  # fmt: skip
    print("| concurrency | sentences/s | tokens/s | × offline (tokens/s) | p50 ms | p99 ms "
          "| no-op gRPC server, calls/s |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r, e in zip(rows, echo, strict=True):
        print(f"| {r['concurrency']} | {r['sentences_s']:.0f} | {r['tokens_s']:.0f} | "
              f"{r['tokens_s'] / off['tokens_s']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
              f"| {e['sentences_s']:.0f} |")  # fmt: skip
    print(
        "\nThe last column is a gRPC server that answers without translating, driven by the "
        "same client:\nthe most single-sentence calls/s this machine carries with the client "
        "on the same cores."
    )
    if args.json:
        data = {"offline": off, "service": rows, "noop_grpc": echo}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
