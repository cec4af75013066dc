"""Where a decoder step's time goes: the serving engine's step loop, timed in parts.

    python benchmarks/step_profile.py --bundle models/default --batch 1
    python benchmarks/step_profile.py --bundle models/default --batch 8 --ort-profile
    python benchmarks/step_profile.py --bundle /tmp/marian-small --precision int8 --threads 2

Decodes batches of random source sentences with ``service.engine.Engine`` (the production
step: ``Engine.step`` → ``Runtime.step_inplace`` or ``Runtime.step`` → onnxruntime), restarting
a batch whenever its rows finish, and times three nested parts of every step, with the wall
clock and with the CPU time of this thread:

- **session run**: onnxruntime's ``run_with_iobinding`` (or ``run``) of the decoder graph;
- **runtime**: the rest of the runtime's step, i.e. binding inputs and outputs and copying
  them back;
- **engine**: the rest of ``Engine.step``, i.e. the batch bookkeeping, argmax and per-row results.

Encoder runs (at a batch's start) are not counted. On a shared, loaded machine the wall clock
includes the time this process waited for a core; the CPU time does not, and with one intra-op
thread (the default here) every kernel runs on this thread, so the CPU column is what to compare
there. ``--ort-profile`` adds onnxruntime's own profile of the decoder: per operator type, the
sum over its nodes of each node's median kernel time, and what of a run lies outside kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from service.bundle import load_bundle  # noqa: E402
from service.engine import DecodeBatch, Engine, SentenceJob  # noqa: E402
from service.runtime import Runtime, RuntimeConfig  # noqa: E402

PARTS = ("session run", "runtime", "engine")


class Clock:
    """Wall and thread-CPU seconds spent inside wrapped calls, per name."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - w
                self.cpu[name] += time.thread_time() - c

        return timed


def instrument(engine: Engine, rt: Runtime, clock: Clock) -> None:
    """Times the session run, the runtime's step and the engine's step (instance attributes
    over the real methods: nothing else changes)."""
    session = rt.decoder
    for name in ("run_with_iobinding", "run"):
        setattr(session, name, clock.wrap("session run", getattr(session, name)))
    for name in ("step_inplace", "step"):
        setattr(rt, name, clock.wrap("runtime", getattr(rt, name)))
    engine.step = clock.wrap("engine", engine.step)  # type: ignore[method-assign]


def jobs(rt: Runtime, batch: int, src_len: int, limit: int, seed: int) -> list[SentenceJob]:
    rng = np.random.default_rng(seed)
    low = 4 if rt.pad_id < 4 else 0
    high = int(rt.bundle.model["vocab_size"])
    return [
        SentenceJob([int(t) for t in rng.integers(low, high, src_len) if t != rt.pad_id], limit)
        for _ in range(batch)
    ]


def profile(engine: Engine, rt: Runtime, args: argparse.Namespace) -> tuple[Clock, int]:
    """Runs --steps decoder steps (after --warmup), restarting batches as their rows finish."""
    clock = Clock()
    steps, seed, warm = 0, 0, args.warmup
    batch: DecodeBatch | None = None
    while steps < args.steps:
        if batch is None:
            seed += 1
            batch = engine.start(jobs(rt, args.batch, args.src_len, args.limit, seed))
        if warm:
            _, batch, _ = engine.step(batch)
            warm -= 1
            if not warm:
                instrument(engine, rt, clock)
            continue
        _, batch, _ = engine.step(batch)
        steps += 1
    return clock, steps


def report(clock: Clock, steps: int) -> list[str]:
    """Per-step microseconds of each part, and its share of the whole step."""
    lines = ["| part | wall µs/step | share | CPU µs/step | share |", "|---|---:|---:|---:|---:|"]
    own = {}
    for table in ("wall", "cpu"):
        t = getattr(clock, table)
        own[table] = {
            "session run": t["session run"],
            "runtime": t["runtime"] - t["session run"],
            "engine": t["engine"] - t["runtime"],
        }
    total = {k: getattr(clock, k)["engine"] for k in ("wall", "cpu")}
    for part in PARTS:
        w, c = own["wall"][part], own["cpu"][part]
        lines.append(
            f"| {part} | {1e6 * w / steps:.1f} | {w / total['wall']:.0%} "
            f"| {1e6 * c / steps:.1f} | {c / total['cpu']:.0%} |"
        )
    lines.append(
        f"| whole step | {1e6 * total['wall'] / steps:.1f} | 100% "
        f"| {1e6 * total['cpu'] / steps:.1f} | 100% |"
    )
    return lines


def ort_profile(rt: Runtime, args: argparse.Namespace) -> list[str]:
    """onnxruntime's profiler over the same decoding, summarised per operator type."""
    import onnxruntime as ort

    opts = rt.decoder_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="step-profile-")) / "ort")
    part = "decoder_kv" if rt.inplace else "decoder"
    graph = rt.bundle.graph(rt.cfg.precision, part).read_bytes()
    rt.decoder = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    engine = Engine(rt, rt.bundle.limits, capacity=args.batch)
    profile(engine, rt, argparse.Namespace(**{**vars(args), "steps": min(args.steps, 300)}))
    trace = Path(rt.decoder.end_profiling())
    events = json.loads(trace.read_text())
    shutil.rmtree(trace.parent, ignore_errors=True)
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    runs = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"])
            op_of[e["name"]] = e["args"]["op_name"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs.append(e["dur"])
    by_op: dict[str, float] = collections.defaultdict(float)
    nodes: collections.Counter[str] = collections.Counter()
    for name, durations in per_node.items():
        by_op[op_of[name]] += statistics.median(durations)
        nodes[op_of[name]] += 1
    kernels, run = sum(by_op.values()), statistics.median(runs)
    parts = matmul_parts(events, vocab=rt.bundle.target_vocab_size, peak=args.peak_gflops)
    lines = [
        f"onnxruntime profile of {part} ({len(per_node)} nodes; wall µs, median per node):",
        "| operator | nodes | µs/run | share of kernels |",
        "|---|---:|---:|---:|",
    ]
    for op, us in sorted(by_op.items(), key=lambda x: -x[1]):
        lines.append(f"| {op} | {nodes[op]} | {us:.1f} | {us / kernels:.0%} |")
    lines.append(f"median run {run:.0f} µs, of which kernels {kernels:.0f} µs and "
                 f"{run - kernels:.0f} µs between them (executor, allocation)")  # fmt: skip
    return [*lines, "", *parts]


MATMULS = ("MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul")


def matmul_parts(events: list[dict[str, Any]], vocab: int, peak: float) -> list[str]:
    """The matrix products of the step by part of the model (output layer: N = the vocabulary;
    feed-forward: K or N the widest inner size; attention projections: the rest), each with the
    FLOP rate it reached, from every kernel event's own input shapes (rows that finished are
    not counted), against the machine's fp32 peak (all intra-op threads together)."""
    products = []  # (µs, rows, K, N) of every kernel event of a projection
    for e in events:
        a = e.get("args", {})
        if e.get("cat") != "Node" or a.get("op_name") not in MATMULS:
            continue
        inputs = [next(iter(d.values())) for d in a.get("input_type_shape", [])]
        outputs = [next(iter(d.values())) for d in a.get("output_type_shape", [])]
        if len(inputs) != 1 or not outputs:
            # onnxruntime lists only the activations of a product with a prepacked weight;
            # two of them (attention scores) are no projection
            continue
        x, y = inputs[0], outputs[0]
        products.append((float(e["dur"]), int(np.prod(x[:-1])), x[-1], y[-1]))
    widest = max((max(k, n) for _, _, k, n in products if n != vocab), default=0)
    us: dict[str, float] = collections.defaultdict(float)
    flops: dict[str, float] = collections.defaultdict(float)
    for dur, rows, k, n in products:
        part = (
            "output layer" if n == vocab
            else "feed-forward" if widest in (k, n)
            else "attention projections"
        )  # fmt: skip
        us[part] += dur
        flops[part] += 2.0 * rows * k * n
    total = sum(us.values()) or 1.0
    lines = [
        "matrix products by part (GFLOP/s from each kernel's own shapes):",
        "| part | share of their time | GFLOP/s | % of fp32 peak |",
        "|---|---:|---:|---:|",
    ]
    for part in ("attention projections", "feed-forward", "output layer"):
        if us[part]:
            rate = flops[part] / us[part] / 1e3
            share = us[part] / total
            lines.append(f"| {part} | {share:.0%} | {rate:.1f} | {100 * rate / peak:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--steps", type=int, default=2000, help="timed decoder steps")
    ap.add_argument("--warmup", type=int, default=50, help="untimed steps first")
    ap.add_argument("--src-len", type=int, default=12)
    ap.add_argument("--limit", type=int, default=64, help="output tokens per row at most")
    ap.add_argument("--kv-cache", default="auto", choices=["auto", "inplace", "concat"])
    ap.add_argument("--ort-profile", action="store_true", help="onnxruntime's per-op profile too")
    ap.add_argument(
        "--decoder-threads", type=int, default=0,
        help="the decoder's intra-op threads (default 0: the runtime's choice: one for a small "
        "model, else --threads)",
    )  # fmt: skip
    ap.add_argument(
        "--spin",
        action="store_true",
        help="let the decoder's idle intra-op threads spin (offline decoding; the server does not)",
    )
    ap.add_argument(
        "--peak-gflops", type=float, default=156.5, help="the machine's fp32 peak (2-core Zen 3)"
    )
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    cfg = RuntimeConfig("cpu", args.precision, args.threads, kv_cache=args.kv_cache, spin=args.spin,
                        decoder_threads=args.decoder_threads)  # fmt: skip
    rt = Runtime(bundle, cfg)
    clock, steps = profile(Engine(rt, bundle.limits, capacity=args.batch), rt, args)
    print(f"{args.bundle} ({args.precision}, {rt.describe()}), batch {args.batch}, {steps} steps")
    print("\n".join(report(clock, steps)))
    if args.ort_profile:
        print()
        print("\n".join(ort_profile(Runtime(bundle, cfg), args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
