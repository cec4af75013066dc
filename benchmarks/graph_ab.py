"""What a graph optimisation buys per decoder step: two bundles' decoder_kv graphs, same inputs,
timed in interleaved rounds through the service's own step (``service.runtime.InPlaceStep``).

    python benchmarks/graph_ab.py --a OLD_BUNDLE --b NEW_BUNDLE --batches 1,8,32 --rounds 30

For a before/after comparison, export the same checkpoint (or Marian directory) once with the
code before the optimisation and once after, e.g. ``git worktree add /tmp/before <commit>`` and
``python -m export export --run runs/default --out /tmp/a --int8`` in each checkout. Every
round runs each bundle's step --steps times, in an order shuffled per round; reported per batch
size: the median wall-clock and CPU µs per step of each bundle, and the median (min–max) over
rounds of the per-round ratio b/a. Before timing, the two graphs' outputs on the same inputs
are compared (max |Δ logits|: 0 for a rewrite that keeps the arithmetic, small otherwise). On a
loaded machine compare the CPU column (one intra-op thread: every kernel runs on this thread).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.engines import spread  # noqa: E402
from service.bundle import load_bundle  # noqa: E402
from service.runtime import InPlaceStep, Runtime, RuntimeConfig  # noqa: E402


class Case:
    """One bundle's decoder_kv step over a fixed batch: B rows at position `past`, S source
    positions, random caches and cross keys/values (the same for every bundle: seeded)."""

    def __init__(self, rt: Runtime, batch: int, past: int, src_len: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        shape = (batch, rt.n_heads, src_len, rt.head_dim)
        self.rt, self.step = rt, InPlaceStep(rt)
        self.caches = rt.cache_buffers(batch, rt.cache_length)
        for c in self.caches:
            c[:, :, :past] = rng.standard_normal(c[:, :, :past].shape, np.float32)
        self.cross = [rng.standard_normal(shape, np.float32) for _ in range(2 * rt.n_layers)]
        self.tokens = rng.integers(4, rt.vocab_size, batch)
        self.positions = np.full(batch, past, np.int64)
        self.mask = np.ones((batch, src_len), np.int64)

    def run(self) -> np.ndarray:
        logits, _ = self.step.run(self.tokens, self.positions, self.mask, self.caches, self.cross)
        return logits


def timed(case: Case, steps: int) -> tuple[float, float]:
    """µs per step: wall clock, CPU time of this thread."""
    w, c = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        case.run()
    return 1e6 * (time.perf_counter() - w) / steps, 1e6 * (time.thread_time() - c) / steps


def compare(runtimes: dict[str, Runtime], batch: int, args: argparse.Namespace) -> list[str]:
    cases = {k: Case(rt, batch, args.past, args.src_len, seed=batch) for k, rt in runtimes.items()}
    a, b = (c.run().copy() for c in cases.values())
    both = np.isneginf(a) & np.isneginf(b)  # an id suppressed on both sides counts as equal
    diff = float(np.abs(np.subtract(a, b, out=np.zeros_like(a), where=~both)).max())
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    for r in range(args.rounds):
        random.Random(r).shuffle(order)
        for k in order:
            w, c = timed(cases[k], args.steps)
            wall[k].append(w)
            cpu[k].append(c)
    lines = []
    for k in cases:
        lines.append(f"| {batch} | {k} | {statistics.median(wall[k]):.1f} | "
                     f"{statistics.median(cpu[k]):.1f} | | |")  # fmt: skip
    ratio_w = [b / a for a, b in zip(wall["a"], wall["b"], strict=True)]
    ratio_c = [b / a for a, b in zip(cpu["a"], cpu["b"], strict=True)]
    fmt = "{:.3f}"
    lines.append(f"| {batch} | b/a | | | {spread(ratio_w, fmt)} | {spread(ratio_c, fmt)} |")
    lines.append(f"| {batch} | max abs logit diff {diff:.2e} | | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--a", required=True, help="bundle A (e.g. before the optimisation)")
    ap.add_argument("--b", required=True, help="bundle B")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=50, help="steps per bundle per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--past", type=int, default=16, help="cached positions of every row")
    ap.add_argument("--src-len", type=int, default=12)
    args = ap.parse_args(argv)
    cfg = RuntimeConfig("cpu", args.precision, args.threads, kv_cache="inplace", packing="off")
    runtimes = {k: Runtime(load_bundle(getattr(args, k)), cfg) for k in ("a", "b")}
    print(f"a = {args.a}\nb = {args.b}\n{args.precision}, {args.threads} thread(s), "
          f"{args.rounds} rounds of {args.steps} steps\n")  # fmt: skip
    print("| batch | bundle | wall µs/step | CPU µs/step | b/a wall | b/a CPU |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        print("\n".join(compare(runtimes, batch, args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
