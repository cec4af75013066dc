"""How far a bundle's int8 graphs drift from its fp32 graphs: logits step by step on the same
prefixes, and the greedy tokens each decodes on its own.

    python benchmarks/int8_drift.py --bundle /tmp/bench-marian-base-XXXX/bundle
    python benchmarks/int8_drift.py --bundle models/default --sentences 64 --tokens 24

Random source sentences (seeded, --src-len ids each), both precisions through the service's
own runtime (``Runtime.encode`` and ``Runtime.step_inplace``, one intra-op thread each):

- **teacher-forced logits**: every step feeds both precisions the fp32 greedy token of the
  step before, so each step's logits compare on the same prefix: max and mean |Δ| over all
  rows, steps and vocabulary entries, the same relative to the spread (standard deviation) of
  the fp32 logits, and the share of steps whose top token agrees;
- **free-running greedy**: each precision decodes alone, --tokens steps per row (EOS not
  allowed to end a row early, as in benchmarks/engines.py): the share of rows with exactly the
  same tokens, and of tokens equal position by position.

Suppressed ids (Marian's pad, -inf in both) are left out of the differences. The bundle must
have int8 graphs (``--int8`` at export or import). For the test-split exact match of the
default model in both precisions, the export prints it (``python -m export export --int8``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from service.bundle import load_bundle  # noqa: E402
from service.runtime import Runtime, RuntimeConfig  # noqa: E402


@dataclass
class Drift:
    max_abs: float  # max |Δ logit|
    mean_abs: float
    logit_std: float  # spread of the reference's logits
    top1_agree: float  # share of teacher-forced steps with the same top token
    rows_same: float  # free-running: share of rows with identical tokens
    tokens_same: float  # free-running: share of positions with the same token


class Decoder:
    """One precision's step loop over a batch: encoder once, then in-place cache steps."""

    def __init__(self, rt: Runtime, ids: np.ndarray, tokens: int) -> None:
        self.rt, n = rt, len(ids)
        self.mask = np.ones_like(ids)
        self.cross = rt.encode(ids, self.mask)
        self.caches = rt.cache_buffers(n, max(rt.cache_length, tokens + 1))
        self.positions = np.zeros(n, np.int64)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Logits (B, V) after feeding `tokens`; EOS never wins (every row runs its length)."""
        logits, _ = self.rt.step_inplace(tokens, self.positions, self.mask, self.caches, self.cross)
        self.positions += 1
        out = logits.copy()
        out[:, self.rt.eos_id] = -np.inf
        return out


def greedy(rt: Runtime, ids: np.ndarray, tokens: int) -> np.ndarray:
    dec, prev = Decoder(rt, ids, tokens), np.full(len(ids), rt.bos_id, np.int64)
    out = []
    for _ in range(tokens):
        prev = dec.step(prev).argmax(axis=-1)
        out.append(prev)
    return np.stack(out, axis=1)


def drift(ref: Runtime, other: Runtime, ids: np.ndarray, tokens: int) -> Drift:
    """`other` against `ref` on the source rows `ids` (B, S)."""
    a, b = Decoder(ref, ids, tokens), Decoder(other, ids, tokens)
    prev = np.full(len(ids), ref.bos_id, np.int64)
    diffs, refs, agree = [], [], []
    for _ in range(tokens):
        la, lb = a.step(prev), b.step(prev)
        keep = np.isfinite(la) & np.isfinite(lb)
        diffs.append(np.abs(la[keep] - lb[keep]))
        refs.append(la[keep])
        agree.append(la.argmax(axis=-1) == lb.argmax(axis=-1))
        prev = la.argmax(axis=-1)
    d = np.concatenate(diffs)
    ga, gb = greedy(ref, ids, tokens), greedy(other, ids, tokens)
    return Drift(
        max_abs=float(d.max()),
        mean_abs=float(d.mean()),
        logit_std=float(np.concatenate(refs).std()),
        top1_agree=float(np.concatenate(agree).mean()),
        rows_same=float((ga == gb).all(axis=1).mean()),
        tokens_same=float((ga == gb).mean()),
    )


def sources(rt: Runtime, n: int, length: int, seed: int) -> np.ndarray:
    """n rows of `length` random ids, none of them special (pad, EOS, BOS, suppressed)."""
    rng = np.random.default_rng(seed)
    special = {rt.pad_id, rt.eos_id, rt.bos_id, *rt.suppressed.tolist()}
    pool = np.array([i for i in range(rt.vocab_size) if i not in special], np.int64)
    return rng.choice(pool, (n, length))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a bundle with int8 graphs")
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--src-len", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per row")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    fp32, int8 = (
        Runtime(bundle, RuntimeConfig("cpu", p, 1, kv_cache="inplace")) for p in ("fp32", "int8")
    )
    ids = sources(fp32, args.sentences, args.src_len, args.seed)
    d = drift(fp32, int8, ids, args.tokens)
    print(f"{args.bundle}: int8 against fp32, {args.sentences} random sentences of "
          f"{args.src_len} ids, {args.tokens} output tokens each (seed {args.seed})")  # fmt: skip
    print("| max abs Δ logit | mean abs Δ logit | fp32 logit std | mean Δ / std | "
          "top-1 agree (teacher-forced) | rows identical | tokens identical |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {d.max_abs:.4f} | {d.mean_abs:.4f} | {d.logit_std:.3f} | "
          f"{d.mean_abs / d.logit_std:.4f} | {d.top1_agree:.2%} | {d.rows_same:.2%} | "
          f"{d.tokens_same:.2%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
