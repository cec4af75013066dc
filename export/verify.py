"""Export verification: the service's own onnxruntime code against PyTorch.

Every check runs the bundle through ``service.runtime.Runtime`` and ``service.engine.Engine``,
the code that serves it, so that what is verified is what is served.

1. A grid of shapes — batch 1, 3, 8 × source length 1, 7 and the maximum — runs the encoder and
   several decoder steps in both and compares cross K/V, logits and cross-attention
   probabilities; one more case puts rows with different past lengths into one batch and checks
   each row against that row decoded alone.
2. Greedy decoding through the engine must give exactly PyTorch's greedy tokens on the whole
   test split.
The optional graphs are checked on their own: ``decoder_kv.onnx`` (rows of mixed ages over
in-place caches, then greedy tokens) and ``encoder_packed.onnx`` (sentences of mixed lengths
packed into one row, each against itself encoded alone, then greedy tokens with every batch
encoded packed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from export.data import Pair
from export.model import KV, EncoderOutput, ModelConfig, StepOutput, Transformer
from export.tokenizer import Tokenizer
from export.train import score, translate_ids
from service.bundle import Bundle, Limits
from service.cacheops import to_host
from service.engine import DecodeOptions, Engine, SentenceJob
from service.runtime import Runtime, RuntimeConfig

LOGIT_TOLERANCE = 1e-4
OPTIONAL_GRAPHS = ("decoder_kv", "encoder_packed")

# Reference greedy decoding: tokenized sentences and each one's output limit → output ids
# (eos excluded). Default: PyTorch's (export.train.translate_ids) on our own model.
GreedyFn = Callable[[list[list[int]], list[int]], list[list[int]]]


class StepModel(Protocol):
    """What the grid compares the graphs with: our Transformer, or an imported model's own
    library behind the same two calls (export.marian)."""

    cfg: ModelConfig

    def eval(self) -> Any: ...

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput: ...

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        past: list[KV],
        self_mask: torch.Tensor,
        cross_kv: list[KV],
        src_mask: torch.Tensor,
    ) -> StepOutput: ...

    def empty_past(self, batch: int, device: torch.device | None = None) -> list[KV]: ...


class SentenceEncoder(Protocol):
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


def _greedy(model: StepModel, greedy: GreedyFn | None) -> GreedyFn:
    if greedy is not None:
        return greedy
    if not isinstance(model, Transformer):
        raise TypeError("a reference other than our Transformer needs its own greedy function")
    return partial(translate_ids, model)


def served(bundle: Bundle, precision: str = "fp32", **settings: Any) -> Runtime:
    """The bundle's sessions as the service opens them, on the CPU; settings of RuntimeConfig
    (kv_cache, packing) pick the graphs."""
    return Runtime(bundle, RuntimeConfig("cpu", precision, **settings))


def engine_translate(
    rt: Runtime,
    limits: Limits,
    encoded: Sequence[Sequence[int]],
    batch_size: int = 64,
    by_length: bool = True,
) -> list[list[int]]:
    """Greedy tokens of every sentence through the service's engine, in batches of sentences of
    similar length (by_length) or in the given order (mixed lengths in each batch)."""
    engine = Engine(rt, limits, capacity=batch_size)
    jobs = [
        SentenceJob(list(ids), limits.target_limit(len(ids)) if ids else 0, DecodeOptions())
        for ids in encoded
    ]
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].source_ids))
    if not by_length:
        order = list(range(len(jobs)))
    out: list[list[int]] = [[] for _ in jobs]
    for start in range(0, len(order), batch_size):
        group = [i for i in order[start : start + batch_size] if jobs[i].limit > 0]
        index = {id(jobs[i]): i for i in group}
        batch = engine.start([jobs[i] for i in group]) if group else None
        while batch is not None:
            done, batch, _ = engine.step(batch)
            for job, res in done:
                out[index[id(job)]] = res.token_ids
    return out


def greedy_agreement(
    model: StepModel,
    rt: Runtime,
    tok: SentenceEncoder,
    pairs: list[Pair],
    limits: Limits,
    batch_size: int = 64,
    by_length: bool = True,
    greedy: GreedyFn | None = None,
) -> dict[str, Any]:
    """The reference's (PyTorch's by default) and the engine's greedy tokens on every test
    sentence: the share of sentences with identical tokens, and the first mismatches."""
    encoded = tok.encode_batch([p.source for p in pairs])
    ref = _greedy(model, greedy)(encoded, [limits.target_limit(len(e)) for e in encoded])
    got = engine_translate(rt, limits, encoded, batch_size, by_length)
    same = [a == b for a, b in zip(ref, got, strict=True)]
    mismatches = [
        {"index": i, "source": pairs[i].source, "torch": ref[i], "onnxruntime": got[i]}
        for i, ok in enumerate(same)
        if not ok
    ][:5]
    return {
        "sentences": len(pairs),
        "greedy_identical_share": sum(same) / max(len(same), 1),
        "mismatches": mismatches,
    }


def served_metrics(
    rt: Runtime, tok: Tokenizer, pairs: list[Pair], limits: Limits, bleu_tokenize: str
) -> dict[str, Any]:
    """Test-split metrics of the engine's translations, and the seconds they took."""
    encoded = tok.encode_batch([p.source for p in pairs])
    t = time.monotonic()
    ids = engine_translate(rt, limits, encoded)
    seconds = time.monotonic() - t
    metrics = score([tok.decode(r) for r in ids], pairs, bleu_tokenize)
    metrics["seconds"] = round(seconds, 2)
    return metrics


def verify_fp32(
    model: StepModel,
    bundle: Bundle,
    tok: SentenceEncoder,
    pairs: list[Pair],
    limits: Limits,
    greedy: GreedyFn | None = None,
) -> dict[str, Any]:
    """The whole verification of a bundle's fp32 graphs: the grid and greedy tokens through
    the concatenating decoder, then each optional graph the bundle has."""
    rt = served(bundle, kv_cache="concat", packing="off")
    grid = compare_grid(model, rt, limits.max_source_tokens)
    agreement = greedy_agreement(model, rt, tok, pairs, limits, greedy=greedy)
    optional = {
        part: verify_graph(part, model, bundle, tok, pairs, limits, greedy)
        if bundle.has_graph("fp32", part)
        else None  # a bundle exported before a graph existed has no record of it
        for part in OPTIONAL_GRAPHS
    }
    return {
        "tolerance": LOGIT_TOLERANCE,
        "max_abs_logit_diff": grid["max_abs_logit_diff"],
        **agreement,
        "grid": grid["cases"],
        **optional,
        "passed": grid["max_abs_logit_diff"] <= LOGIT_TOLERANCE
        and agreement["greedy_identical_share"] == 1.0
        and all(v is None or v["passed"] for v in optional.values()),
    }


def verify_graph(
    part: str,
    model: StepModel,
    bundle: Bundle,
    tok: SentenceEncoder,
    pairs: list[Pair],
    limits: Limits,
    greedy: GreedyFn | None = None,
) -> dict[str, Any]:
    """One optional graph against PyTorch, then greedy tokens on the whole test split with it.

    decoder_kv: rows of mixed ages share in-place steps (logits and cross attention of each row
    against that row decoded alone). encoder_packed: sentences of mixed lengths packed into one
    row, each against itself encoded alone; the greedy check decodes batches of 8 sentences in
    the split's order (mixed lengths, as a running batch admits them), every one packed."""
    if part == "decoder_kv":
        rt = served(bundle, kv_cache="inplace", packing="off")
        figures = compare_cached_mixed_ages(model, rt)
        worst = max(figures["logits"], figures["cross_attention"])
        agreement = greedy_agreement(model, rt, tok, pairs, limits, greedy=greedy)
    elif part == "encoder_packed":
        rt = served(bundle, kv_cache="concat", packing="always")
        figures = compare_packed(model, rt, limits.max_source_tokens)
        worst = figures["cross_kv"]
        agreement = greedy_agreement(model, rt, tok, pairs, limits, 8, False, greedy)
    else:
        raise ValueError(f"no verification for graph {part!r}")
    return {
        **figures,
        "greedy_identical_share": agreement["greedy_identical_share"],
        "mismatches": agreement["mismatches"],
        "passed": worst <= LOGIT_TOLERANCE and agreement["greedy_identical_share"] == 1.0,
    }


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    """max |a - b|, where -inf on both sides (a suppressed id) counts as equal."""
    if not a.size:
        return 0.0
    ref = b.numpy()
    both = np.isneginf(a) & np.isneginf(ref)
    return float(np.abs(np.where(both, 0.0, a - np.where(both, 0.0, ref))).max())


def _flat(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [t for pair in kv for t in pair]


@torch.no_grad()
def compare_packed(
    model: StepModel,
    rt: Runtime,
    max_source: int,
    seed: int = 0,
    lengths: Sequence[int] = (5, 1, 0, 12, 3),
) -> dict[str, Any]:
    """Sentences of the given lengths (0: an empty sentence, its one masked position; the
    longest source is added) packed into one row through Runtime.encode_packed: each one's
    cross K/V must equal that sentence encoded alone in PyTorch."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    lengths = [min(n, max_source) for n in (*lengths, max_source)]
    rows = [torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    sizes = [max(len(r), 1) for r in rows]  # an empty sentence keeps one (pad) position
    tokens = np.array([t for r, n in zip(rows, sizes, strict=True) for t in (r or [cfg.pad_id])])
    positions = np.concatenate([np.arange(n) for n in sizes])
    segments = np.repeat(np.arange(len(rows)), sizes)
    outs = [o[0] for o in to_host(rt.encode_packed(tokens, positions, segments))]  # (H, T, Dh)
    kv_diff = 0.0
    for i, (row, n) in enumerate(zip(rows, sizes, strict=True)):
        ids = torch.tensor([row or [cfg.pad_id]])
        mask = torch.ones(1, n, dtype=torch.long)  # an empty one: its pad position, unmasked
        ref = model.encode(ids, mask)
        at = segments == i
        for o, r in zip(outs, _flat(ref.cross_kv), strict=True):
            kv_diff = max(kv_diff, _max_diff(o[:, at], r[0]))
    return {"graph": "encoder_packed", "source_lengths": lengths, "cross_kv": kv_diff}


@torch.no_grad()
def compare_cached_mixed_ages(
    model: StepModel,
    rt: Runtime,
    seed: int = 0,
    ages: Sequence[int] = (5, 2, 0, 9),
    steps: int = 3,
) -> dict[str, Any]:
    """Rows of different ages, each row's history at the start of its own cache row, share
    Runtime.step_inplace steps; every row's logits and cross attention must equal that row
    decoded alone in PyTorch (decode_step, the graph decoder.onnx is checked against)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    b, s, m = len(ages), 6, max(ages) + steps + 2
    ids = torch.randint(4, cfg.vocab_size, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 3:] = 0
    enc = model.encode(ids, mask)
    caches = rt.cache_buffers(b, m)
    pasts = []
    for i, age in enumerate(ages):  # each row's own history, decoded alone
        past = model.empty_past(1)
        cross = [(k[i : i + 1], v[i : i + 1]) for k, v in enc.cross_kv]
        for t in range(age):
            tok = torch.randint(4, cfg.target_vocab, (1,), generator=gen)
            past = model.decode_step(
                tok, torch.tensor([t]), past, torch.ones(1, t + 1, dtype=torch.long), cross,
                mask[i : i + 1],
            ).present  # fmt: skip
        for j, tensor in enumerate(_flat(past)):
            caches[j][i, :, :age] = tensor[0].numpy()
        pasts.append(past)
    logit_diff = attn_diff = 0.0
    positions = np.array(ages, np.int64)
    cross_np = [t.numpy() for t in _flat(enc.cross_kv)]
    for _ in range(steps):
        tokens = torch.randint(4, cfg.target_vocab, (b,), generator=gen)
        logits, attention = rt.step_inplace(
            tokens.numpy(), positions, mask.numpy(), caches, cross_np
        )
        for i in range(b):
            p = int(positions[i])
            ref = model.decode_step(
                tokens[i : i + 1], torch.tensor([p]), pasts[i],
                torch.ones(1, p + 1, dtype=torch.long),
                [(k[i : i + 1], v[i : i + 1]) for k, v in enc.cross_kv], mask[i : i + 1],
            )  # fmt: skip
            pasts[i] = ref.present
            logit_diff = max(logit_diff, _max_diff(logits[i], ref.logits[0]))
            for o, r in zip(attention, ref.cross_attentions, strict=True):
                attn_diff = max(attn_diff, _max_diff(o[i], r[0]))
        positions = positions + 1
    return {
        "graph": "decoder_kv",
        "past_lengths": list(ages),
        "steps": steps,
        "logits": logit_diff,
        "cross_attention": attn_diff,
    }


@torch.no_grad()
def compare_grid(
    model: StepModel,
    rt: Runtime,
    max_source: int,
    batches: Sequence[int] = (1, 3, 8),
    steps: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Runtime.encode and Runtime.step (the concatenating decoder) vs PyTorch on a grid of
    shapes; returns the max differences per case."""
    model = model.eval()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    cases = []
    worst = 0.0
    for b in batches:
        for s in sorted({1, 7, max_source}):
            ids = torch.randint(4, cfg.vocab_size, (b, s), generator=gen)
            mask = torch.ones(b, s, dtype=torch.long)
            for i in range(1, b):  # rows of several lengths; row 0 keeps the full length
                n = int(torch.randint(1, s + 1, (1,), generator=gen))
                ids[i, n:], mask[i, n:] = cfg.pad_id, 0
            enc = model.encode(ids, mask)
            cross = to_host(rt.encode(ids.numpy(), mask.numpy()))
            diffs = {
                "cross_kv": max(
                    _max_diff(o, t) for o, t in zip(cross, _flat(enc.cross_kv), strict=True)
                ),
            }
            past_t = model.empty_past(b)
            past_o: list[Any] = rt.empty_past(b)
            tokens = torch.full((b,), cfg.start_id, dtype=torch.long)
            logit_diff = attn_diff = 0.0
            for t in range(steps):
                pos = torch.full((b,), t, dtype=torch.long)
                smask = torch.ones(b, t + 1, dtype=torch.long)
                ref = model.decode_step(tokens, pos, past_t, smask, enc.cross_kv, mask)
                logits, past_o, attention, _ = rt.step(
                    tokens.numpy(), pos.numpy(), smask.numpy(), mask.numpy(), past_o, list(cross)
                )
                logit_diff = max(logit_diff, _max_diff(logits, ref.logits))
                for o, r in zip(attention, ref.cross_attentions, strict=True):
                    attn_diff = max(attn_diff, _max_diff(o, r))
                past_t = ref.present  # each side feeds its own cache
                tokens = torch.randint(4, cfg.target_vocab, (b,), generator=gen)
            diffs |= {"logits": logit_diff, "cross_attention": attn_diff}
            worst = max(worst, logit_diff)
            cases.append({"batch": b, "source_length": s, "steps": steps, **diffs})
    mixed = compare_mixed_ages(model, rt, gen)
    worst = max(worst, mixed["logits"])
    cases.append(mixed)
    return {"cases": cases, "max_abs_logit_diff": worst}


@torch.no_grad()
def compare_mixed_ages(
    model: StepModel, rt: Runtime, gen: torch.Generator, ages: Sequence[int] = (5, 2, 0)
) -> dict[str, Any]:
    """Rows with past lengths `ages` share one Runtime.step, their caches left-padded and
    masked; each row's logits must equal that row decoded alone in PyTorch."""
    cfg = model.cfg
    p_max = max(ages)
    n = rt.n_layers
    rows_past: list[list[np.ndarray]] = []
    rows_cross: list[list[np.ndarray]] = []
    masks, srcs, toks, refs = [], [], [], []
    s = 6
    for age in ages:
        ids = torch.randint(4, cfg.vocab_size, (1, s), generator=gen)
        mask = torch.ones(1, s, dtype=torch.long)
        enc = model.encode(ids, mask)
        past = model.empty_past(1)
        history = torch.randint(4, cfg.target_vocab, (age + 1,), generator=gen)
        history[0] = cfg.start_id
        for t in range(age):  # build the row's own cache alone
            past = model.decode_step(
                history[t : t + 1], torch.tensor([t]), past,
                torch.ones(1, t + 1, dtype=torch.long), enc.cross_kv, mask,
            ).present  # fmt: skip
        ref = model.decode_step(
            history[age : age + 1], torch.tensor([age]), past,
            torch.ones(1, age + 1, dtype=torch.long), enc.cross_kv, mask,
        )  # fmt: skip
        refs.append(ref.logits[0])
        pad = p_max - age
        rows_past.append(
            [np.pad(t.numpy(), ((0, 0), (0, 0), (pad, 0), (0, 0))) for t in _flat(past)]
        )
        rows_cross.append([t.numpy() for t in _flat(enc.cross_kv)])
        masks.append([0] * pad + [1] * (age + 1))
        srcs.append(mask.numpy()[0])
        toks.append(int(history[age]))
    logits, _, _, _ = rt.step(
        np.array(toks, np.int64),
        np.array(list(ages), np.int64),
        np.array(masks, np.int64),
        np.stack(srcs),
        [np.concatenate([r[j] for r in rows_past]) for j in range(2 * n)],
        [np.concatenate([r[j] for r in rows_cross]) for j in range(2 * n)],
    )
    diff = max(_max_diff(logits[i], refs[i]) for i in range(len(ages)))
    return {"batch": len(ages), "past_lengths": list(ages), "logits": diff}
