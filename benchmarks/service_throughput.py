"""Service throughput against offline batched decoding of the same sentences, in one run.

    python benchmarks/service_throughput.py --bundle models/default     # or: make bench-service
    python benchmarks/service_throughput.py --models default,small,base  # bigger models too

For each model:
1. Offline: the bundle's graphs through ``service.engine.decode_all_lanes`` (no scheduler, no
   gRPC), sentences grouped by length, decoded in as many parallel lanes as the server runs,
   two ways:
   - *same batch*: 64 sentences in flight in all, as the server's --max-batch-rows 64 allows
     (ceil(64 / lanes) rows per lane). A service at concurrency 64 never has more than 64
     sentences to batch, so this is the offline batched decode it is measured against
     (the target ratio, "× offline").
   - *64 per lane*: each lane with its own 64 rows (128 in flight on two lanes) — the fastest
     offline decoding there is here, with batches the service at concurrency 64 cannot have
     ("× best").
   Measured again before every concurrency and once after the last (passes over the sentence
   set for at least --offline-seconds each): each concurrency's ratios are against the mean of
   the offline figures taken just before and just after it, because these shared machines
   drift by 20-30% over minutes.
2. Scheduler: the same engine behind ``service.scheduler`` in this process, N closed-loop
   callers submitting single sentences (no gRPC): what continuous batching itself costs.
3. Service: ``python -m service serve`` in its own process, driven by the project's load
   tester (``service.loadtest``, closed loop) with single-sentence calls from N concurrent
   clients, for N = 1, 8, 32, 64.
And once per run, a gRPC server that answers without translating, driven by the same client:
the most calls/s this machine carries with client and server on the same cores. With it, each
row's *bound* at concurrency 32 and up, where the decode lanes use every core (as by default;
with fewer lanes × threads than cores no bound is printed):
client, gRPC and decoding share the same CPUs; at high concurrency the no-op calls (E calls/s)
and the offline decode (O sentences/s) each saturate them, so a served sentence costs at least
the CPU of one of each, and the service cannot pass E·O / (E + O) sentences/s: E / (E + O) of
offline. A model whose offline rate comes near the no-op call rate cannot reach 0.8 on this
machine whatever the server does. That bound leaves out the server's own work per call
(tokenizer, validation, scheduler hand-off, results); "bound, our server" puts it in, with E
the calls/s of ``python -m service serve`` itself when every sentence tokenizes to nothing
(answered without the model).

Steps 2 and 3 run for --duration seconds per concurrency and count the sentences finished
between the end of the warm-up and the end of sending (steady state: neither the ramp-up nor
the drain of the last calls). "default" is the trained bundle (--bundle); "small" and "base"
are random-weight bundles of those sizes (benchmarks/bundles.py) with the same tokenizer and
length limits — speed does not depend on the weights, only on the shapes and on how many tokens
each sentence generates, which is the same for all three paths. Prints sentences/s, generated
tokens/s and latency percentiles, and each figure's ratio to the offline figure of the same
run. The machine is shared: compare ratios.
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
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import sentencepiece as spm  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from service.bundle import load_bundle  # noqa: E402
from service.engine import Engine, SentenceJob, SentenceResult, decode_all_lanes  # noqa: E402
from service.loadtest import Corpus, Settings, run_load  # noqa: E402
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb  # noqa: E402
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc  # noqa: E402
from service.runtime import Runtime, RuntimeConfig, plan_lanes, usable_cores  # noqa: E402
from service.scheduler import Scheduler, SchedulerConfig  # noqa: E402


def number_sentences(n: int, seed: int) -> list[str]:
    from num2words import num2words

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d = rng.randint(1, 6)
        out.append(num2words(rng.randrange(10 ** (d - 1) if d > 1 else 0, 10**d), lang="en"))
    return out


class Offline:
    """Offline batched decoding of the sentence set in decode lanes (one engine each, one set of
    sessions), measurable many times."""

    def __init__(self, bundle_dir: str, sentences: list[str], threads: int, lanes: int) -> None:
        bundle = load_bundle(bundle_dir)
        sp = spm.SentencePieceProcessor(model_file=str(bundle.tokenizer_path))
        lanes, cfg = plan_lanes(lanes, RuntimeConfig("cpu", "fp32", threads))
        rt = Runtime(bundle, cfg)
        self.engines = [Engine(rt, bundle.limits) for _ in range(lanes)]
        self.ids = [list(sp.encode(s)) for s in sentences]
        self.limits = bundle.limits
        decode_all_lanes(self.engines, self.jobs()[: 64 * lanes])  # warm-up

    def jobs(self) -> list[SentenceJob]:
        return [SentenceJob(ids, self.limits.target_limit(len(ids))) for ids in self.ids]

    def measure_into(self, same: list[dict], best: list[dict], min_seconds: float) -> None:
        """Appends a same-batch measurement (the server's 64 rows split over the lanes) to
        `same` and a 64-per-lane one to `best`."""
        same.append(self.measure(min_seconds, -(-64 // len(self.engines))))
        best.append(self.measure(min_seconds, 64))

    def measure(self, min_seconds: float, rows_per_lane: int) -> dict:
        """Whole passes over the sentence set until min_seconds have passed, at most
        rows_per_lane sentences in each lane's batch: their rates."""
        seconds = 0.0
        sentences = tokens = 0
        while seconds < min_seconds or not sentences:
            t = time.perf_counter()
            results = decode_all_lanes(self.engines, self.jobs(), max_rows=rows_per_lane)
            seconds += time.perf_counter() - t
            sentences += len(results)
            tokens += sum(len(r.token_ids) for r in results)
        return {"seconds": seconds, "sentences_s": sentences / seconds,
                "tokens_s": tokens / seconds}  # fmt: skip


def around(runs: list[dict], i: int) -> dict:
    """The offline figures measured just before (runs[i]) and just after (runs[i + 1]) the
    i-th concurrency, averaged."""
    a, b = runs[i], runs[i + 1]
    return {k: (a[k] + b[k]) / 2 for k in ("sentences_s", "tokens_s")}


def scheduler_closed_loop(
    bundle_dir: str, sentences: list[str], threads: int, concurrency: int, duration: float,
    warmup: float, max_wait_ms: float, lanes: int = 0,
) -> dict:  # fmt: skip
    """`concurrency` callers in this process, each submitting one sentence to the scheduler as
    soon as its previous one finished; no gRPC. Steady-state figures as in closed_loop."""
    bundle = load_bundle(bundle_dir)
    sp = spm.SentencePieceProcessor(model_file=str(bundle.tokenizer_path))
    lanes, cfg = plan_lanes(lanes, RuntimeConfig("cpu", "fp32", threads))
    sched_cfg = SchedulerConfig(max_batch_rows=64, max_wait_ms=max_wait_ms, lanes=lanes)
    sched = Scheduler.over(Runtime(bundle, cfg), sched_cfg)
    sched.start()
    ids = [list(sp.encode(x)) for x in sentences]
    rng = random.Random(1)
    lock = threading.Lock()
    finished: list[tuple[float, float, int]] = []  # (sent, done, tokens), seconds from start
    t0 = time.monotonic()
    stop_at = t0 + duration
    all_done = threading.Event()
    in_flight = [0]

    def send() -> None:
        with lock:
            if time.monotonic() >= stop_at:
                in_flight[0] -= 1
                if in_flight[0] == 0:
                    all_done.set()
                return
            src = ids[rng.randrange(len(ids))]
        sent = time.monotonic() - t0
        job = SentenceJob(src, bundle.limits.target_limit(len(src)))
        fut = sched.submit([job]).futures[0]
        fut.add_done_callback(lambda f: done(f, sent))

    def done(fut: Future[SentenceResult], sent: float) -> None:
        res = fut.result()
        with lock:
            finished.append((sent, time.monotonic() - t0, len(res.token_ids)))
        send()

    in_flight[0] = concurrency
    for _ in range(concurrency):
        send()
    all_done.wait()
    sched.stop()
    return steady(
        [(a, b - a, n) for a, b, n in finished], warmup, duration,
    )  # fmt: skip


def steady(calls: list[tuple[float, float, int]], warmup: float, duration: float) -> dict:
    """Figures over the window [warmup, duration] from (sent, latency, tokens) per sentence,
    seconds from the start: sentences finished in the window per second, latency of those."""
    inside = [(a, lat, n) for a, lat, n in calls if warmup <= a + lat <= duration]
    window = duration - warmup
    lat_ms = sorted(lat * 1000 for _, lat, _ in inside)

    def pct(q: float) -> float:
        return lat_ms[min(len(lat_ms) - 1, int(q * len(lat_ms)))] if lat_ms else float("nan")

    return {
        "seconds": window,
        "sentences": len(inside),
        "sentences_s": len(inside) / window,
        "tokens_s": sum(n for _, _, n in inside) / window,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


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


# Zero width space: tokenizes to no pieces, so it is answered with an empty translation
# without running the model (as an empty string is; the load tester skips blank lines).
NOTHING = "\u200b"


def bound(calls: list[dict], i: int, offline: dict) -> str:
    """The ratio to offline a service cannot pass on the same cores at the i-th concurrency,
    given the calls/s of a server that does not translate (see the module docstring); "-"
    without one, and below concurrency 32, where neither saturates the CPUs."""
    if not calls or calls[i]["concurrency"] < 32:
        return "-"
    e, o = calls[i]["sentences_s"], offline["sentences_s"]
    return f"{e / (e + o):.2f}"


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


async def closed_loop(target: str, sentences: list[str], concurrency: int, duration: float,
                      warmup: float) -> dict:  # fmt: skip
    """The project's load tester (service.loadtest), closed loop: `concurrency` clients send
    single-sentence calls drawn from `sentences` for `duration` seconds; steady-state figures
    over [warmup, duration] (the load tester's own summary also counts the drain)."""
    settings = Settings(
        target, concurrency=concurrency, duration=duration, progress=False, timeout=60
    )
    run = await run_load(settings, Corpus(sentences, None))
    errors = [r.code for r in run.records if r.code != "OK"]
    if errors:
        raise RuntimeError(f"errors under load: {errors[:5]} ({len(errors)} in all)")
    return steady([(r.scheduled, r.latency, r.tokens) for r in run.records], warmup, duration)


def model_bundles(names: list[str], default: str, work: Path) -> dict[str, str]:
    """name → bundle directory: the trained bundle for "default", random weights otherwise."""
    from benchmarks.bundles import random_model, tokenizer_vocab, write_bundle

    trained = load_bundle(default)
    out = {}
    for name in names:
        if name == "default":
            out[name] = default
            continue
        model = random_model(name, tokenizer_vocab(trained.tokenizer_path))
        limits = dict(trained.manifest["limits"])
        write_bundle(model, work / name, trained.tokenizer_path, limits)
        out[name] = str(work / name)
    return out


def describe(bundle_dir: str) -> str:
    m = load_bundle(bundle_dir).model
    return (
        f"d_model {m['d_model']}, {m['n_encoder_layers']}+{m['n_decoder_layers']} layers, "
        f"{m['n_heads']} heads, FFN {m['d_ff']}, vocabulary {m['vocab_size']}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default="models/default", help='the trained bundle ("default")')
    ap.add_argument("--models", default="default", help="comma list of default, small, base")
    ap.add_argument("--sentences", type=int, default=1024, help="the sentence set")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds left out of each")
    ap.add_argument(
        "--threads", type=int, default=0, help="onnxruntime threads per lane (0: as serve's)"
    )
    ap.add_argument(
        "--lanes", type=int, default=0, help="decode lanes, offline and served (0: as serve's)"
    )
    ap.add_argument(
        "--offline-seconds",
        type=float,
        default=4.0,
        help="each offline measurement: whole passes for at least this long",
    )
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument(
        "--no-echo",
        action="store_true",
        help="skip the two servers that do not translate (and the bounds)",
    )
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    if args.echo_server:
        asyncio.run(echo_server(args.echo_server))
        return 0
    if args.duration <= args.warmup:
        ap.error("--duration must be longer than --warmup")
    sentences = number_sentences(args.sentences, seed=7)
    concurrency = [int(x) for x in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    bundles = model_bundles(args.models.split(","), args.bundle, work)

    def start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_ready(f"127.0.0.1:{port}", proc, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            stop(proc)
            raise
        return proc

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    def load(port: int, c: int, corpus: list[str] = sentences) -> dict:
        target = f"127.0.0.1:{port}"
        return {
            "concurrency": c,
            **asyncio.run(closed_loop(target, corpus, c, args.duration, args.warmup)),
        }

    def serve_cmd(bundle: str, port: int) -> list[str]:
        return [
            *(sys.executable, "-m", "service", "serve", "--bundle", bundle, "--port", str(port)),
            *("--provider", "cpu", "--threads", str(args.threads), "--max-batch-rows", "64"),
            *("--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"),
            *("--lanes", str(args.lanes)),
        ]

    results: dict[str, dict] = {}
    for name, bundle in bundles.items():
        port = free_port()
        base = Offline(bundle, sentences, args.threads, args.lanes)
        off: list[dict] = []  # same batch: 64 sentences in flight
        best: list[dict] = []  # 64 per lane
        sched: list[dict] = []
        service: list[dict] = []
        # The server idles (no spinning threads) while the other two run
        proc = start(serve_cmd(bundle, port), port)
        try:
            for c in concurrency:
                base.measure_into(off, best, args.offline_seconds)
                sched.append({"concurrency": c, **scheduler_closed_loop(
                    bundle, sentences, args.threads, c, args.duration, args.warmup,
                    args.max_wait_ms, args.lanes,
                )})  # fmt: skip
                service.append(load(port, c))
            base.measure_into(off, best, args.offline_seconds)
        finally:
            stop(proc)
        results[name] = {
            "bundle": bundle,
            "model": describe(bundle),
            "offline": off,
            "offline_best": best,
            "scheduler": sched,
            "service": service,
        }
    lanes, cfg = plan_lanes(args.lanes, RuntimeConfig("cpu", "fp32", args.threads))
    echo: list[dict] = []  # the no-op gRPC server
    front: list[dict] = []  # our server, with sentences that never reach the model
    if not args.no_echo:
        port = free_port()
        proc = start([sys.executable, __file__, "--echo-server", str(port)], port)
        try:
            echo = [load(port, c) for c in concurrency]
        finally:
            stop(proc)
        port = free_port()
        proc = start(serve_cmd(args.bundle, port), port)
        try:  # a sentence that tokenizes to nothing: every step of a call but the model
            front = [load(port, c, [NOTHING]) for c in concurrency]
        finally:
            stop(proc)

    print(f"\n{len(sentences)} number sentences, single-sentence calls, closed loop, "
          f"{args.duration:g} s per row ({args.warmup:g} s warm-up left out), {lanes} decode "
          f"lane(s) of {cfg.threads} onnxruntime thread(s) offline and served, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    # The bounds hold only where offline decoding keeps every core busy
    saturated = lanes * cfg.threads >= usable_cores()
    echo_b, front_b = (echo, front) if saturated else ([], [])
    for name, r in results.items():
        offs, bests = r["offline"], r["offline_best"]
        print(f"\n### {name}: {r['model']}\n")
        for label, runs in (("same batch (64 in flight)", offs), ("64 per lane", bests)):
            print(
                f"offline batched decode, {label}, measured before each concurrency and after "
                "the last: "
                + ", ".join(f"{o['tokens_s']:.0f}" for o in runs)
                + " tokens/s ("
                + ", ".join(f"{o['sentences_s']:.0f}" for o in runs)
                + " sentences/s)"
            )
        print(
            "\n| concurrency | offline tokens/s (mean around) | scheduler, no gRPC: tokens/s "
            "| × offline | service: sentences/s | tokens/s | × offline | × best | bound "
            "| bound, our server | p50 ms | p99 ms |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for i, (sc, sv) in enumerate(zip(r["scheduler"], r["service"], strict=True)):
            mean, top = around(offs, i), around(bests, i)
            print(f"| {sv['concurrency']} | {mean['tokens_s']:.0f} | {sc['tokens_s']:.0f} | "
                  f"{sc['tokens_s'] / mean['tokens_s']:.2f} | {sv['sentences_s']:.0f} | "
                  f"{sv['tokens_s']:.0f} | **{sv['tokens_s'] / mean['tokens_s']:.2f}** | "
                  f"{sv['tokens_s'] / top['tokens_s']:.2f} | {bound(echo_b, i, mean)} | "
                  f"{bound(front_b, i, mean)} | "
                  f"{sv['p50_ms']:.1f} | {sv['p99_ms']:.1f} |")  # fmt: skip
    if echo:
        print("\nNo-op gRPC server (answers without translating), same client, calls/s: "
              + ", ".join(f"{e['sentences_s']:.0f} at {e['concurrency']}" for e in echo)
              + "\n— the most single-sentence calls/s this machine carries with the client "
              "on the same cores.\nThe server itself, sentences that tokenize to nothing (every "
              "step of a call but the model), calls/s: "
              + ", ".join(f"{f['sentences_s']:.0f} at {f['concurrency']}" for f in front)
          )  # fmt: skip

    def last_ratio(r: dict, key: str) -> float:
        return r["service"][-1]["tokens_s"] / around(r[key], len(concurrency) - 1)["tokens_s"]

    print(
        f"\nAt concurrency {concurrency[-1]}, service × offline (same batch): "
        + ", ".join(f"{n} {last_ratio(r, 'offline'):.2f}" for n, r in results.items())
        + "; × best (64 per lane): "
        + ", ".join(f"{n} {last_ratio(r, 'offline_best'):.2f}" for n, r in results.items())
        + (
            "; bound (CPU shared with gRPC and client): "
            + ", ".join(
                f"{n} {bound(echo_b, -1, around(r['offline'], len(concurrency) - 1))}"
                for n, r in results.items()
            )
            + "; with our server's own work per call: "
            + ", ".join(
                f"{n} {bound(front_b, -1, around(r['offline'], len(concurrency) - 1))}"
                for n, r in results.items()
            )
            if echo_b
            else ""
        )
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"models": results, "noop_grpc": echo, "server_no_model": front}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
