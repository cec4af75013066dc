"""The trainer: token-budget batches, Adam + inverse-square-root warm-up, label smoothing,
periodic dev evaluation with greedy decoding, best-checkpoint keeping, resume.

Run through the CLI::

    python -m export train --run runs/default            # built-in English → German numbers
    python -m export train --run runs/mine --train-tsv corpus.tsv --time-budget 3600
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from itertools import takewhile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from export.checkpoint import (
    CHECKPOINT_BEST,
    CHECKPOINT_LAST,
    LoopState,
    resume_training,
    save_checkpoint,
    training_state,
)
from export.data import Pair
from export.model import ModelConfig, Transformer, greedy_decode, make_model
from export.tokenizer import Tokenizer
from service.bundle import Limits


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how a model is trained; saved in every checkpoint."""

    seed: int = 1
    batch_tokens: int = 4000  # padded tokens (rows × longest side) per batch
    lr: float = 1.5e-3  # peak learning rate, reached at the end of warm-up
    warmup_steps: int = 300
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_steps: int = 0  # 0: no step limit
    time_budget_s: float = 0.0  # 0: no time limit
    target_exact_match: float = 0.0  # stop once the dev exact match reaches this (0: never)
    target_patience: int = 3  # ... in this many consecutive evaluations
    eval_every: int = 200  # steps between dev evaluations
    eval_max_sentences: int = 0  # dev sentences per evaluation (0: all)
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0: all cores this process may use)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The paper's schedule, d^-0.5·min(s^-0.5, s·w^-1.5), rescaled so its peak (at s = w) is
    cfg.lr: linear warm-up, then decay with the inverse square root of the step."""
    s = max(step, 1)
    w = max(cfg.warmup_steps, 1)
    return cfg.lr * min(s / w, math.sqrt(w / s))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def usable_cores() -> int:
    """Cores this process may run on (affinity), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Encoded:
    """A corpus tokenized once: ids without BOS/EOS."""

    src: list[list[int]]
    tgt: list[list[int]]


def encode_pairs(tok: Tokenizer, pairs: Sequence[Pair]) -> Encoded:
    return Encoded(
        tok.encode_batch([p.source for p in pairs]), tok.encode_batch([p.target for p in pairs])
    )


def make_batches(data: Encoded, batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Buckets by length so rows of a batch have similar lengths (little padding); each batch
    holds at most batch_tokens padded tokens on its longer side. The order is shuffled."""
    order = sorted(
        range(len(data.src)),
        key=lambda i: (len(data.src[i]), len(data.tgt[i]), rng.random()),
    )
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = max(len(data.src[i]), len(data.tgt[i]) + 1)
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """→ ids (B, T) and mask (B, T) with 1 on real tokens."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    mask = (ids != pad_id).long()
    if any(not r for r in rows):
        # An empty source still needs one attendable slot: its padding is masked anyway.
        mask[:, 0] = 1
    return ids.to(device), mask.to(device)


def collate(
    data: Encoded, idx: Sequence[int], cfg: ModelConfig, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    src, src_mask = pad([data.src[i] for i in idx], cfg.pad_id, device)
    tgt_in, tgt_mask = pad([[cfg.start_id, *data.tgt[i]] for i in idx], cfg.pad_id, device)
    tgt_out, _ = pad([[*data.tgt[i], cfg.eos_id] for i in idx], cfg.pad_id, device)
    return src, src_mask, tgt_in, tgt_mask, tgt_out


# ----------------------------------------------------------------------------- evaluation


def translate_ids(
    model: Transformer,
    encoded: Sequence[Sequence[int]],
    limits: Sequence[int],
    batch_size: int = 64,
) -> list[list[int]]:
    """PyTorch greedy decoding of tokenized sentences, batches sorted by length; limits caps
    each sentence's output tokens."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        src, mask = pad([encoded[i] for i in idx], model.cfg.pad_id, device)
        ids, _ = greedy_decode(model, src, mask, torch.tensor([limits[i] for i in idx]))
        for i, row in zip(idx, ids, strict=True):
            out[i] = row
    return out


def translate(
    model: Transformer, tok: Tokenizer, sources: Sequence[str], limits: Limits
) -> list[list[int]]:
    """PyTorch greedy translation of sentences → token ids (no BOS/EOS)."""
    encoded = tok.encode_batch(list(sources))
    for i, ids in enumerate(encoded):
        if len(ids) > limits.max_source_tokens:
            raise ValueError(
                f"sentence {i} has {len(ids)} tokens, over the limit of {limits.max_source_tokens}"
            )
    return translate_ids(model, encoded, [limits.target_limit(len(e)) for e in encoded])


def score(hyps: Sequence[str], pairs: Sequence[Pair], bleu_tokenize: str = "13a") -> dict[str, Any]:
    """Exact match, sacreBLEU BLEU and chrF, and exact match per group (e.g. digit count).

    bleu_tokenize is sacreBLEU's tokenizer: "13a" for ordinary text; "char" where a sentence is
    one word (German number words), for which word BLEU has no n-grams beyond unigrams."""
    import sacrebleu

    refs = [p.target for p in pairs]
    exact = [h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True)]
    groups: dict[str, list[bool]] = {}
    for p, e in zip(pairs, exact, strict=True):
        if p.group:
            groups.setdefault(p.group, []).append(e)
    n = max(len(refs), 1)
    return {
        "sentences": len(refs),
        "exact_match": sum(exact) / n,
        "bleu": sacrebleu.corpus_bleu(list(hyps), [refs], tokenize=bleu_tokenize).score,
        "bleu_tokenize": bleu_tokenize,
        "chrf": sacrebleu.corpus_chrf(list(hyps), [refs]).score,
        "exact_match_by_group": {
            g: sum(v) / len(v) for g, v in sorted(groups.items(), key=lambda kv: _group_key(kv[0]))
        },
    }


def _group_key(g: str) -> tuple[str, int]:
    name, _, num = g.partition("=")
    return (name, int(num)) if num.isdigit() else (g, 0)


def evaluate_pairs(
    model: Transformer,
    tok: Tokenizer,
    pairs: Sequence[Pair],
    limits: Limits,
    bleu_tokenize: str = "13a",
) -> tuple[dict[str, Any], list[str]]:
    ids = translate(model, tok, [p.source for p in pairs], limits)
    hyps = [tok.decode(r) for r in ids]
    return score(hyps, pairs, bleu_tokenize), hyps


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    steps: int
    elapsed_s: float
    best: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    if b is None:
        return True
    # Ties go to the newer checkpoint: same dev figures, more training.
    return (a["exact_match"], a["chrf"]) >= (b["exact_match"], b["chrf"])


def _limit_reason(step: int, elapsed: float, cfg: TrainConfig) -> str:
    """Why training stops at this step for its step or time limit ("": it does not)."""
    if cfg.max_steps and step >= cfg.max_steps:
        return f"reached {cfg.max_steps} steps"
    if cfg.time_budget_s and elapsed >= cfg.time_budget_s:
        return f"reached the time budget of {cfg.time_budget_s:.0f}s"
    return ""


def _target_reason(history: Sequence[dict[str, Any]], cfg: TrainConfig) -> str:
    """Why training stops after this evaluation for reaching the target ("": it does not)."""
    target = cfg.target_exact_match
    at_target = len(list(takewhile(lambda r: r["exact_match"] >= target, reversed(history))))
    if target and at_target >= max(1, cfg.target_patience):
        # One perfect dev evaluation can be luck on a few hundred sentences; several in
        # a row mean the model has settled (and generalises better to the test split).
        return f"dev exact match ≥ {target} in {at_target} evaluations in a row"
    return ""


def _optimise(
    model: Transformer,
    opt: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    lr: float,
    cfg: TrainConfig,
) -> tuple[Tensor, int]:
    """One optimiser step on a collated batch at learning rate lr: the loss, and the source
    and target tokens it saw."""
    model.train()
    src, src_mask, tgt_in, tgt_mask, tgt_out = batch
    logits, _ = model(src, src_mask, tgt_in, tgt_mask)  # (B, T, V)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        tgt_out.reshape(-1),
        ignore_index=model.cfg.pad_id,
        label_smoothing=cfg.label_smoothing,
    )
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    opt.step()
    return loss, int(tgt_mask.sum()) + int(src_mask.sum())


class _Progress:
    """The progress bar: loss, learning rate and tokens per second every 10 steps."""

    def __init__(self, cfg: TrainConfig, step: int, enabled: bool) -> None:
        self.cfg = cfg
        self.bar = tqdm(
            total=cfg.max_steps or None,
            initial=step,
            disable=not enabled,
            unit="step",
            dynamic_ncols=True,
        )
        self.tokens, self.since = 0, time.monotonic()

    def step(self, step: int, loss: Tensor, lr: float, tokens: int, elapsed: float) -> None:
        self.tokens += tokens
        self.bar.update(1)
        if step % 10:
            return
        now = time.monotonic()
        tps = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        post = {"loss": f"{loss.item():.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:,.0f}"}
        if self.cfg.time_budget_s:
            post["eta"] = f"{max(self.cfg.time_budget_s - elapsed, 0):.0f}s"
        self.bar.set_postfix(post)


def _log_evaluation(
    run_dir: Path,
    loop: LoopState,
    write: Callable[[str], None],
    metrics: dict[str, Any],
    elapsed: float,
    loss: float,
    lr: float,
) -> bool:
    """Adds one evaluation to the history, train_log.jsonl and the screen; whether it is the
    best so far (then it becomes loop.best)."""
    record = {"step": loop.step, "elapsed_s": round(elapsed, 2), "loss": round(loss, 4), "lr": lr}
    record.update(metrics)
    loop.history.append(record)
    with (run_dir / "train_log.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    write(
        f"step {loop.step} {record['elapsed_s']:.0f}s loss {loss:.3f} "
        f"dev exact {metrics['exact_match']:.4f} BLEU {metrics['bleu']:.2f} "
        f"chrF {metrics['chrf']:.2f}"
    )
    if not _better(metrics, loop.best):
        return False
    loop.best = {"step": loop.step, "elapsed_s": record["elapsed_s"], **metrics}
    return True


def _epoch_batches(data: Encoded, cfg: TrainConfig, epoch: int) -> list[list[int]]:
    return make_batches(data, cfg.batch_tokens, random.Random(f"{cfg.seed}/{epoch}"))


def _start(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    device: torch.device,
    resume_from: Path | None,
    log: Callable[[str], None],
) -> tuple[Transformer, torch.optim.Optimizer, LoopState]:
    """The model, its optimiser and the loop state: new, or as the checkpoint resume_from left
    them."""
    model = make_model(model_cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if resume_from is None:
        return model, opt, LoopState()
    loop = resume_training(resume_from, device, model_cfg, model, opt)
    where = f"step {loop.step} (epoch {loop.epoch}, {loop.elapsed_s:.0f}s)"
    log(f"resumed from {resume_from} at {where}")
    return model, opt, loop


def train(
    run_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    tok: Tokenizer,
    train_pairs: Sequence[Pair],
    dev_pairs: Sequence[Pair],
    limits: Limits,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    bleu_tokenize: str = "13a",
) -> TrainResult:
    """Trains in run_dir, writing checkpoint_last.pt (every evaluation), checkpoint_best.pt (best
    dev exact match, then chrF) and train_log.jsonl (one line per evaluation)."""
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads or usable_cores())
    torch.manual_seed(cfg.seed)
    data = encode_pairs(tok, train_pairs)
    dev = list(dev_pairs)
    if cfg.eval_max_sentences and len(dev) > cfg.eval_max_sentences:
        dev = random.Random(cfg.seed).sample(dev, cfg.eval_max_sentences)
    last_path, best_path = run_dir / CHECKPOINT_LAST, run_dir / CHECKPOINT_BEST
    model, opt, loop = _start(model_cfg, cfg, device, last_path if resume else None, log)
    settings = {
        "model_config": model_cfg.to_dict(),
        "train_config": cfg.to_dict(),
        "limits": asdict(limits),
    }
    batches = _epoch_batches(data, cfg, loop.epoch)
    t0 = time.monotonic() - loop.elapsed_s
    status, stop_reason = _Progress(cfg, loop.step, progress), ""
    while not stop_reason:
        if loop.batch_pos >= len(batches):
            loop.epoch, loop.batch_pos = loop.epoch + 1, 0
            batches = _epoch_batches(data, cfg, loop.epoch)
        idx = batches[loop.batch_pos]
        loop.batch_pos, loop.step = loop.batch_pos + 1, loop.step + 1
        lr = lr_at(loop.step, cfg)
        loss, tokens = _optimise(model, opt, collate(data, idx, model_cfg, device), lr, cfg)
        elapsed = time.monotonic() - t0
        status.step(loop.step, loss, lr, tokens, elapsed)
        stop_reason = _limit_reason(loop.step, elapsed, cfg)
        if loop.step % cfg.eval_every and not stop_reason:
            continue
        metrics, _ = evaluate_pairs(model, tok, dev, limits, bleu_tokenize)
        elapsed = time.monotonic() - t0
        improved = _log_evaluation(
            run_dir, loop, status.bar.write, metrics, elapsed, loss.item(), lr
        )
        loop.elapsed_s = time.monotonic() - t0
        state = training_state(settings, model, opt, loop)
        save_checkpoint(last_path, state)
        if improved:
            save_checkpoint(best_path, state)
        stop_reason = _target_reason(loop.history, cfg) or stop_reason
    status.bar.close()
    log(f"stopped after {loop.step} steps: {stop_reason}")
    assert loop.best is not None
    return TrainResult(loop.step, time.monotonic() - t0, loop.best, loop.history, stop_reason)


def time_to(history: Sequence[dict[str, Any]], threshold: float) -> float | None:
    """Seconds of training until dev exact match first reached threshold (None if never)."""
    for rec in history:
        if rec["exact_match"] >= threshold:
            return float(rec["elapsed_s"])
    return None
