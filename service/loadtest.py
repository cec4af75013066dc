"""The load tester: ``python -m service loadtest``.

    python -m service loadtest --target 127.0.0.1:50051 --concurrency 32 --duration 30
    python -m service loadtest --target 127.0.0.1:50051 --rate 500 --requests 10000 --json out.json
    python -m service loadtest --target 127.0.0.1:50051,127.0.0.1:50052 --concurrency 64

Closed loop (``--concurrency N``: N clients, each sends its next call when the last returns) or
open loop (``--rate R``: Poisson arrivals at R calls/s whatever the server does; latency is
measured from each call's *scheduled* send time, so a slow server cannot hide its queueing —
no coordinated omission). Bounded by ``--duration`` seconds or ``--requests`` calls; the first
``--warmup`` seconds are left out of the figures. Sentences come from ``--corpus`` (a TSV of
source and reference, or one source per line) or the built-in English→German number corpus.

Reports calls/s, sentences/s, generated tokens/s, latency p50/p90/p99/p99.9/max, errors by
gRPC status code and — where the corpus has references — exact match, BLEU and chrF of the
answers, so speed never silently trades away correctness. As a Markdown table (stdout), JSON
(``--json``) and PNGs of latency over time and its histogram (``--png PREFIX``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service.channels import (
    add_tls_args,
    add_token_arg,
    credentials,
    server_name_option,
    token_of,
)
from service.client import resolve_target
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc

BUILTIN_CORPUS = Path(__file__).parent / "data" / "numbers_en_de.tsv"
QUANTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class Corpus:
    sources: list[str]
    references: list[str] | None  # None when the corpus has no references
    # sacreBLEU tokenizer: "char" for the built-in corpus, whose German numbers are one word
    bleu_tokenize: str = "13a"


def load_corpus(path: str | None) -> Corpus:
    """One source per line, or "source<TAB>reference" on every line (then the answers are
    scored). A corpus with references on some lines only is refused, naming the lines without:
    it would otherwise lose its quality check for the whole run without a word."""
    lines = (Path(path) if path else BUILTIN_CORPUS).read_text(encoding="utf-8").splitlines()
    rows = [(n, line.split("\t")) for n, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no sentences")
    tokenize = "13a" if path else "char"
    bare = [n for n, r in rows if len(r) < 2]
    if not bare:
        return Corpus([r[0] for _, r in rows], [r[1] for _, r in rows], tokenize)
    if len(bare) < len(rows):
        shown = ", ".join(map(str, bare[:10])) + (" …" if len(bare) > 10 else "")
        raise ValueError(f"{path}: {len(bare)} line(s) without a tab and reference ({shown}); "
                         "give every line a reference, or none")  # fmt: skip
    return Corpus([r[0] for _, r in rows], None, tokenize)


def percentiles(values: list[float], qs: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    """Linear-interpolation percentiles (numpy's default) and the maximum."""
    if not values:
        return {**{f"p{q:g}": float("nan") for q in qs}, "max": float("nan")}
    a = np.asarray(values, dtype=np.float64)
    out = {f"p{q:g}": float(np.percentile(a, q)) for q in qs}
    out["max"] = float(a.max())
    return out


@dataclass
class Record:
    scheduled: float  # seconds since the start of the run
    latency: float  # seconds, from the scheduled send time
    code: str
    indices: list[int]
    translations: list[str]
    tokens: int


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0


@dataclass(frozen=True)
class Settings:
    targets: str
    concurrency: int = 0  # closed loop when > 0
    rate: float = 0.0  # open loop when > 0
    duration: float = 0.0
    requests: int = 0
    warmup: float = 0.0
    sentences_per_request: int = 1
    timeout: float = 30.0
    seed: int = 1
    progress: bool = True
    tls_ca: str | None = None  # TLS (and mutual TLS) as the translate command has it
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = None  # sent as authorization: Bearer <token>

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.rate > 0):
            raise ValueError("give either --concurrency (closed loop) or --rate (open loop)")
        if self.duration <= 0 and self.requests <= 0:
            raise ValueError("give --duration or --requests to bound the run")
        if self.sentences_per_request < 1:
            raise ValueError("--sentences-per-request must be ≥ 1")


async def _call(
    stub: pb_grpc.TranslatorStub,
    timeout: float,
    metadata: tuple[tuple[str, str], ...],
    corpus: Corpus,
    run: Run,
    scheduled_at: float,
    idx: list[int],
) -> None:
    """One Translate call of the sentences idx, recorded with its latency from its scheduled
    send time."""
    request = pb.TranslateRequest(sentences=[corpus.sources[i] for i in idx])
    try:
        resp = await stub.Translate(request, timeout=timeout, metadata=metadata)
        code, texts = "OK", [r.translation for r in resp.results]
        tokens = sum(len(r.token_ids) for r in resp.results)
    except grpc.aio.AioRpcError as e:
        code, texts, tokens = e.code().name, [], 0
    now = time.monotonic()
    run.records.append(
        Record(scheduled_at - run.started, now - scheduled_at, code, idx, texts, tokens)
    )


def poisson_schedule(rate: float, seed: int) -> Iterator[float]:
    """The open loop's send times, in seconds from the start of the run: a Poisson process of
    `rate` calls/s (independent exponential gaps of mean 1/rate), the same for the same seed.
    Its own random stream, so the schedule does not depend on which sentences are picked."""
    rng = random.Random(f"arrivals-{seed}")
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def _progress(run: Run, s: Settings, now: float) -> str:
    done = len(run.records)
    bound = f"{now - run.started:.0f}/{s.duration:g}s" if s.duration else f"{done}/{s.requests}"
    return f"{bound}  calls {done}  errors {sum(r.code != 'OK' for r in run.records)}"


async def run_load(s: Settings, corpus: Corpus) -> Run:
    rng = random.Random(s.seed)
    n_src = len(corpus.sources)
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if "," in s.targets:
        options.append(("grpc.lb_policy_name", "round_robin"))
    run = Run()
    sent = 0
    last_report = 0.0

    def pick() -> list[int]:
        return [rng.randrange(n_src) for _ in range(s.sentences_per_request)]

    def more(now: float) -> bool:
        if s.requests and sent >= s.requests:
            return False
        return not (s.duration and now - run.started >= s.duration)

    options += server_name_option(s.tls_server_name)
    creds = credentials(s.tls_ca, s.tls_cert, s.tls_key)
    target = resolve_target(s.targets)
    channel = (
        grpc.aio.secure_channel(target, creds, options=options)
        if creds is not None
        else grpc.aio.insecure_channel(target, options=options)
    )
    metadata = (("authorization", f"Bearer {s.token}"),) if s.token else ()
    async with channel as ch:
        call = partial(_call, pb_grpc.TranslatorStub(ch), s.timeout, metadata, corpus, run)

        def report(now: float) -> None:
            nonlocal last_report
            if s.progress and now - last_report >= 1.0:
                last_report = now
                print(f"\r{_progress(run, s, now)}", end="", file=sys.stderr)

        run.started = time.monotonic()
        if s.concurrency:

            async def worker() -> None:
                nonlocal sent
                while more(time.monotonic()):
                    sent += 1
                    await call(time.monotonic(), pick())
                    report(time.monotonic())

            await asyncio.gather(*(worker() for _ in range(s.concurrency)))
        else:
            pending: set[asyncio.Task[None]] = set()
            for offset in poisson_schedule(s.rate, s.seed):
                t = run.started + offset
                if not more(t):
                    break
                delay = t - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent += 1
                task = asyncio.create_task(call(t, pick()))
                pending.add(task)
                task.add_done_callback(pending.discard)
                report(time.monotonic())
            await asyncio.gather(*pending)
        run.ended = time.monotonic()
        if s.progress:
            print(file=sys.stderr)
    return run


def _window(run: Run, s: Settings) -> float:
    """Seconds the throughput is counted over, after the warm-up: a closed loop's whole run;
    an open loop's sending period (its schedule), not the wait for the last late answers,
    which would make a slow server's throughput look lower than what it was offered."""
    end = run.ended - run.started
    if s.rate > 0:
        end = s.duration or max((r.scheduled for r in run.records), default=0.0) + 1 / s.rate
    return max(end - s.warmup, 1e-9)


def summarize(run: Run, s: Settings, corpus: Corpus) -> dict[str, Any]:
    """The figures, over the calls scheduled after the warm-up."""
    measured = [r for r in run.records if r.scheduled >= s.warmup]
    ok = [r for r in measured if r.code == "OK"]
    failed = [r.latency * 1000 for r in measured if r.code != "OK"]
    window = _window(run, s)
    out: dict[str, Any] = {
        "mode": "closed" if s.concurrency else "open",
        "concurrency": s.concurrency or None,
        "offered_rate": s.rate or None,
        "targets": s.targets.split(","),
        "sentences_per_request": s.sentences_per_request,
        "warmup_s": s.warmup,
        "measured_s": round(window, 3),
        "calls": len(measured),
        "calls_excluded_as_warmup": len(run.records) - len(measured),
        "calls_per_s": len(ok) / window,
        "sentences_per_s": sum(len(r.indices) for r in ok) / window,
        "tokens_per_s": sum(r.tokens for r in ok) / window,
        # answered calls only: fast refusals under overload would make latency look better
        "latency_ms": percentiles([r.latency * 1000 for r in ok]),
        "failed_latency_ms": percentiles(failed) if failed else None,
        "errors": dict(Counter(r.code for r in measured if r.code != "OK")),
    }
    if corpus.references is not None and ok:
        hyps = [t for r in ok for t in r.translations]
        refs = [corpus.references[i] for r in ok for i in r.indices]
        quality: dict[str, Any] = {
            "sentences": len(hyps),
            "exact_match": sum(h.strip() == g.strip() for h, g in zip(hyps, refs, strict=True))
            / len(hyps),
        }
        try:
            import sacrebleu

            tokenize = corpus.bleu_tokenize
            quality["bleu"] = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score
            quality["bleu_tokenize"] = tokenize
            quality["chrf"] = sacrebleu.corpus_chrf(hyps, [refs]).score
        except ImportError:
            quality["note"] = "BLEU/chrF need sacrebleu (pip install sacrebleu)"
        out["quality"] = quality
    return out


def markdown(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    mode = (
        f"closed loop, {summary['concurrency']} clients"
        if summary["mode"] == "closed"
        else f"open loop, {summary['offered_rate']:g} calls/s offered"
    )
    rows = [
        f"Load test: {mode}, {summary['sentences_per_request']} sentence(s) per call, "
        f"{summary['measured_s']:.1f} s measured after {summary['warmup_s']:g} s warm-up, "
        f"targets {', '.join(summary['targets'])}",
        "",
        "| calls | calls/s | sentences/s | tokens/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| errors |",  # latency: answered calls
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {summary['calls']} | {summary['calls_per_s']:.1f} | {summary['sentences_per_s']:.1f} "
        f"| {summary['tokens_per_s']:.1f} | {lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} "
        f"| {lat['p99.9']:.1f} | {lat['max']:.1f} | "
        + (", ".join(f"{k} {v}" for k, v in sorted(summary["errors"].items())) or "none")
        + " |",
    ]
    failed = summary.get("failed_latency_ms")
    if failed:
        rows += ["", f"Failed calls (not in the latency columns): p50 {failed['p50']:.1f} ms, "
                 f"p99 {failed['p99']:.1f} ms, max {failed['max']:.1f} ms"]  # fmt: skip
    q = summary.get("quality")
    if q:
        extra = (
            f", BLEU {q['bleu']:.2f} ({q['bleu_tokenize']}), chrF {q['chrf']:.2f}"
            if "bleu" in q
            else ""
        )
        rows += ["", f"Quality of the answers: exact match {q['exact_match'] * 100:.2f}%{extra}"]
    return "\n".join(rows)


def plot(run: Run, s: Settings, prefix: str) -> list[str]:
    from matplotlib.figure import Figure

    xs = [r.scheduled for r in run.records]
    ys = [r.latency * 1000 for r in run.records]
    paths = []
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.scatter(xs, ys, s=2, alpha=0.5)
    ax.axvline(s.warmup, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("scheduled send time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    fig.savefig(f"{prefix}-latency-over-time.png", dpi=120, bbox_inches="tight")
    paths.append(f"{prefix}-latency-over-time.png")
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.hist([y for x, y in zip(xs, ys, strict=True) if x >= s.warmup], bins=60)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("calls")
    fig.savefig(f"{prefix}-latency-histogram.png", dpi=120, bbox_inches="tight")
    paths.append(f"{prefix}-latency-histogram.png")
    return paths


def add_loadtest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port, or a comma list "
                   "(client-side round_robin over all of them)")  # fmt: skip
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--concurrency", type=int, default=0, help="closed loop: N clients")
    g.add_argument("--rate", type=float, default=0.0, help="open loop: calls/s, Poisson")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run")
    p.add_argument("--requests", type=int, default=0, help="calls to send")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds left out of the figures")
    p.add_argument("--corpus", help="TSV source<TAB>reference, or one source per line "
                   "(default: the built-in English→German numbers)")  # fmt: skip
    p.add_argument("--sentences-per-request", type=int, default=1, help="sentences per call")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    p.add_argument("--seed", type=int, default=1, help="seed for sentence choice and arrivals")
    p.add_argument("--json", help="write the summary as JSON to this file")
    p.add_argument("--png", metavar="PREFIX", help="write PREFIX-latency-*.png (matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    add_tls_args(p)
    add_token_arg(p)


def run_loadtest(args: argparse.Namespace) -> int:
    try:
        s = Settings(
            targets=args.target,
            concurrency=args.concurrency,
            rate=args.rate,
            duration=args.duration,
            requests=args.requests,
            warmup=args.warmup,
            sentences_per_request=args.sentences_per_request,
            timeout=args.timeout,
            seed=args.seed,
            progress=not args.no_progress,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            token=token_of(args),
        )
        corpus = load_corpus(args.corpus)
        credentials(s.tls_ca, s.tls_cert, s.tls_key)  # unreadable PEM files: refused up front
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = asyncio.run(run_load(s, corpus))
    summary = summarize(run, s, corpus)
    if not summary["calls"]:
        print(f"error: no call was measured: all {len(run.records)} were sent within the "
              f"{s.warmup:g} s warm-up; lower --warmup or send more", file=sys.stderr)  # fmt: skip
        return 1
    print(markdown(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.png:
        for path in plot(run, s, args.png):
            print(f"wrote {path}", file=sys.stderr)
    return 0
