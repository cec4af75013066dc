"""Command line of the PyTorch side.

    python -m export train    --run runs/default                  # train on the built-in corpus
    python -m export evaluate --run runs/default --split test     # BLEU / chrF / exact match
    python -m export export   --run runs/default --out models/default [--int8] [--force]
    python -m export verify   --run runs/default --bundle models/default
    python -m export import-marian /path/to/opus-mt-en-de --out models/opus-mt-en-de [--int8]

A *run directory* holds everything training made: ``run.json`` (corpus, model, training and
length settings), ``tokenizer.model``, ``data/{dev,test}.jsonl``, ``checkpoint_{best,last}.pt``
and ``train_log.jsonl``. ``export`` turns a run into a model bundle (see README).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from export.data import (
    SUPPORTED_LANGS,
    CorpusError,
    NumberCorpusConfig,
    Pair,
    Splits,
)
from export.model import ModelConfig, make_model
from export.rundir import (
    RUN_FILE,
    TOKENIZER_FILE,
    build_corpus,
    load_run,
    load_split,
    save_split,
)

log = logging.getLogger("export")

# The default model: sized so the built-in corpus trains to ≥ 99% exact match on 2 CPU cores
# well inside ten minutes (see README, "Training the default model").
DEFAULT_MODEL = {
    "d_model": 128,
    "n_heads": 4,
    "d_ff": 512,
    "n_encoder_layers": 2,
    "n_decoder_layers": 2,
    "dropout": 0.0,
    "norm": "pre",
}


def corpus_spec(args: argparse.Namespace) -> dict[str, Any]:
    def side(tsv: str | None, src: str | None, tgt: str | None, name: str) -> Any:
        if tsv and (src or tgt):
            raise SystemExit(f"error: give --{name} or --{name}-src/--{name}-tgt, not both")
        if bool(src) != bool(tgt):
            raise SystemExit(f"error: --{name}-src and --{name}-tgt go together")
        if tsv:
            return str(Path(tsv).resolve())
        return [str(Path(src).resolve()), str(Path(tgt).resolve())] if src and tgt else None

    train = side(args.train, args.train_src, args.train_tgt, "train")
    if train is None:
        return {
            "kind": "numbers",
            "config": asdict(
                NumberCorpusConfig(
                    lang=args.lang,
                    max_digits=args.max_digits,
                    train_size=args.train_size,
                    dev_per_digits=args.dev_per_digits,
                    test_per_digits=args.test_per_digits,
                    seed=args.seed,
                )
            ),
        }
    return {
        "kind": "user",
        "train": train,
        "dev": side(args.dev, args.dev_src, args.dev_tgt, "dev"),
        "test": side(args.test, args.test_src, args.test_tgt, "test"),
        "held_out_fraction": args.held_out_fraction,
        "seed": args.seed,
        "max_chars": args.max_chars,
        "on_error": args.on_error,
    }


# ----------------------------------------------------------------------------- train


def _resumed_run(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """run.json of the run to continue, with the stopping settings given again."""
    from export.checkpoint import CHECKPOINT_LAST

    run = load_run(run_dir)
    if not (run_dir / CHECKPOINT_LAST).is_file():
        raise SystemExit(f"error: --resume: {run_dir / CHECKPOINT_LAST} is missing")
    overrides = {
        k: v
        for k, v in {
            "max_steps": args.max_steps,
            "time_budget_s": args.time_budget,
            "target_exact_match": args.target_exact_match,
        }.items()
        if v is not None
    }
    run["train"].update(overrides)
    return run


def _new_run(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """run.json of a new run, from the flags (an existing run is replaced only with --force)."""
    from export.train import TrainConfig
    from service.bundle import Limits

    if (run_dir / RUN_FILE).exists() and not args.force:
        raise SystemExit(
            f"error: {run_dir} already holds a run; --resume to continue it, --force to start over"
        )
    if run_dir.exists() and args.force:
        shutil.rmtree(run_dir)
    spec = corpus_spec(args)
    run: dict[str, Any] = {
        "corpus": spec,
        "bleu_tokenize": args.bleu_tokenize or ("char" if spec["kind"] == "numbers" else "13a"),
        "tokenizer": {
            "vocab_size": args.vocab_size or (400 if spec["kind"] == "numbers" else 8000),
            "model_type": args.tokenizer_type,
        },
        "model": {
            "d_model": args.d_model,
            "n_heads": args.heads,
            "d_ff": args.d_ff,
            "n_encoder_layers": args.encoder_layers,
            "n_decoder_layers": args.decoder_layers,
            "dropout": args.dropout,
            "norm": args.norm,
            "tie_embeddings": not args.no_tie_embeddings,
            "max_positions": args.max_positions,
        },
        "limits": asdict(
            Limits(args.max_source_tokens, args.max_target_tokens, args.len_a, args.len_b)
        ),
        "train": TrainConfig(
            seed=args.seed,
            batch_tokens=args.batch_tokens,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            label_smoothing=args.label_smoothing,
            clip_norm=args.clip_norm,
            max_steps=args.max_steps or 0,
            time_budget_s=args.time_budget or 0.0,
            target_exact_match=args.target_exact_match or 0.0,
            target_patience=args.target_patience,
            eval_every=args.eval_every,
            eval_max_sentences=args.eval_max_sentences,
            device=args.device,
            threads=args.threads,
        ).to_dict(),
    }
    limits_ = run["limits"]
    if max(limits_["max_source_tokens"], limits_["max_target_tokens"]) + 1 > args.max_positions:
        raise SystemExit(
            "error: --max-positions must exceed --max-source-tokens and --max-target-tokens"
        )
    return run


def _corpus_and_tokenizer(
    args: argparse.Namespace, run_dir: Path, run: dict[str, Any], seed: int
) -> Splits:
    """The run's corpus, its dev and test splits saved and its tokenizer trained (new runs)."""
    from export.tokenizer import Tokenizer

    t_start = time.monotonic()
    log.info("building the corpus (%s)", run["corpus"]["kind"])
    try:
        splits = build_corpus(run["corpus"])
    except CorpusError as e:
        raise SystemExit(f"error: {e}") from e
    for p in splits.problems:
        log.warning("skipped corpus line: %s", p)
    log.info(
        "corpus: %d train, %d dev, %d test pairs (%.1fs)",
        len(splits.train),
        len(splits.dev),
        len(splits.test),
        time.monotonic() - t_start,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_path = run_dir / TOKENIZER_FILE
    if not args.resume:
        save_split(splits.dev, run_dir / "data" / "dev.jsonl")
        save_split(splits.test, run_dir / "data" / "test.jsonl")
        t = time.monotonic()
        Tokenizer.train(
            [p.source for p in splits.train] + [p.target for p in splits.train],
            tok_path,
            vocab_size=run["tokenizer"]["vocab_size"],
            model_type=run["tokenizer"]["model_type"],
            seed=seed,
        )
        log.info("tokenizer trained in %.1fs", time.monotonic() - t)
    return splits


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from export.tokenizer import Tokenizer
    from export.train import TrainConfig, time_to, train
    from service.bundle import Limits

    run_dir = Path(args.run)
    run = _resumed_run(args, run_dir) if args.resume else _new_run(args, run_dir)
    cfg = TrainConfig.from_dict(run["train"])
    limits = Limits(**run["limits"])
    splits = _corpus_and_tokenizer(args, run_dir, run, cfg.seed)
    tok_path = run_dir / TOKENIZER_FILE
    tok = Tokenizer(tok_path)
    model_cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        pad_id=tok.pad_id,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        **run["model"],
    )
    run["model_config"] = model_cfg.to_dict()
    run["corpus_summary"] = splits.summary
    (run_dir / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    n_params = sum(p.numel() for p in make_model(model_cfg).parameters())
    log.info(
        "model: %s parameters, %s; training on %s with %d threads",
        f"{n_params:,}",
        {k: v for k, v in model_cfg.to_dict().items() if k in run["model"]},
        cfg.device,
        cfg.threads or torch.get_num_threads(),
    )
    result = train(
        run_dir,
        model_cfg,
        cfg,
        tok,
        splits.train,
        splits.dev,
        limits,
        resume=args.resume,
        progress=not args.no_progress,
        log=log.info,
        bleu_tokenize=run["bleu_tokenize"],
    )
    summary = {
        "steps": result.steps,
        "train_seconds": round(result.elapsed_s, 1),
        "stop_reason": result.stop_reason,
        "time_to_dev_exact_0.95_s": time_to(result.history, 0.95),
        "time_to_dev_exact_0.99_s": time_to(result.history, 0.99),
        "best_dev": result.best,
    }
    print(json.dumps(summary, indent=2))
    if not args.skip_test:
        evaluate_run(run_dir, "test", "best", samples=run_dir / "samples_test.tsv")
    return 0


# ----------------------------------------------------------------------------- evaluate


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    print(f"{title}: {metrics['sentences']} sentences")
    print(f"  exact match  {metrics['exact_match'] * 100:7.2f} %")
    print(
        f"  BLEU         {metrics['bleu']:7.2f}   (sacreBLEU, tokenize={metrics['bleu_tokenize']})"
    )
    print(f"  chrF         {metrics['chrf']:7.2f}")
    for group, value in metrics.get("exact_match_by_group", {}).items():
        print(f"  exact match {group:>10}  {value * 100:7.2f} %")


def evaluate_run(
    run_dir: Path,
    split: str,
    checkpoint: str,
    samples: Path | None = None,
    limit: int = 0,
) -> dict[str, Any]:
    from export.checkpoint import model_from_checkpoint
    from export.tokenizer import Tokenizer
    from export.train import evaluate_pairs
    from service.bundle import Limits

    run = load_run(run_dir)
    ckpt = checkpoint_path(run_dir, checkpoint)
    model, _ = model_from_checkpoint(ckpt)
    tok = Tokenizer(run_dir / TOKENIZER_FILE)
    pairs = load_split(run_dir, split)
    if limit:
        pairs = pairs[:limit]
    t = time.monotonic()
    metrics, hyps = evaluate_pairs(model, tok, pairs, Limits(**run["limits"]), run["bleu_tokenize"])
    metrics["seconds"] = round(time.monotonic() - t, 2)
    print_metrics(f"{split} split, {ckpt.name}", metrics)
    (run_dir / f"metrics_{split}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if samples:
        write_samples(samples, pairs, hyps)
        print(f"  translations written to {samples}")
    return metrics


def write_samples(path: Path, pairs: list[Pair], hyps: list[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write("ok\tsource\treference\ttranslation\n")
        for p, h in zip(pairs, hyps, strict=True):
            f.write(f"{int(h.strip() == p.target.strip())}\t{p.source}\t{p.target}\t{h}\n")


def checkpoint_path(run_dir: Path, which: str) -> Path:
    from export.checkpoint import CHECKPOINT_BEST, CHECKPOINT_LAST

    path = {"best": run_dir / CHECKPOINT_BEST, "last": run_dir / CHECKPOINT_LAST}.get(
        which, Path(which)
    )
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} is missing")
    return path


def cmd_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    samples = Path(args.samples) if args.samples else run_dir / f"samples_{args.split}.tsv"
    evaluate_run(run_dir, args.split, args.checkpoint, samples, args.limit)
    return 0


# ----------------------------------------------------------------------------- export / verify


def cmd_export(args: argparse.Namespace) -> int:
    from export.pipeline import ExportError, export_bundle

    try:
        manifest = export_bundle(
            Path(args.run),
            Path(args.out),
            checkpoint=checkpoint_path(Path(args.run), args.checkpoint),
            int8=args.int8,
            force=args.force,
            opset=args.opset,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ver = manifest["verification"]
    print(f"bundle written to {args.out}")
    print(
        f"  verification: max |Δ logits| {ver['max_abs_logit_diff']:.2e} "
        f"(≤ {ver['tolerance']:g}), identical greedy tokens "
        f"{ver['greedy_identical_share'] * 100:.2f} % of {ver['sentences']} test sentences"
    )
    for precision, metrics in manifest["metrics"].items():
        print_metrics(f"test split through onnxruntime, {precision}", metrics)
    return 0


def cmd_import_marian(args: argparse.Namespace) -> int:
    from export.marian import import_marian
    from export.pipeline import ExportError

    try:
        manifest = import_marian(Path(args.dir), Path(args.out), args.int8, args.force, args.opset)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a checkpoint this importer's checks missed: no traceback, exit 1
        log.debug("import failed", exc_info=True)
        print(f"error: import failed ({type(e).__name__}: {e}); nothing written", file=sys.stderr)
        return 1
    ver = manifest["verification"]
    tok = ver["tokenizer"]
    print(f"bundle written to {args.out}")
    print(
        f"  verification against transformers: max |Δ logits| {ver['max_abs_logit_diff']:.2e} "
        f"(≤ {ver['tolerance']:g}), greedy tokens identical to generate() on "
        f"{ver['greedy_identical_share'] * 100:.2f} % of {ver['sentences']} sentences, "
        f"tokenizer ids identical to MarianTokenizer on {tok['identical']} of {tok['cases']} cases"
    )
    return 0


def cmd_ct2(args: argparse.Namespace) -> int:
    from export.ct2 import convert, greedy_agreement

    run_dir = Path(args.run)
    ckpt = checkpoint_path(run_dir, args.checkpoint)
    try:
        out = convert(ckpt, run_dir / TOKENIZER_FILE, Path(args.out), force=args.force)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    share, n = greedy_agreement(out, ckpt, run_dir)
    print(f"CTranslate2 model written to {out}")
    print(f"  identical greedy tokens with PyTorch: {share * 100:.2f} % of {n} test sentences")
    return 0 if share == 1.0 else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from export.pipeline import verify_bundle
    from service.bundle import BundleError

    try:
        report = verify_bundle(
            Path(args.bundle),
            Path(args.run),
            checkpoint_path(Path(args.run), args.checkpoint),
        )
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


# ----------------------------------------------------------------------------- argparse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _corpus_args(p: argparse.ArgumentParser) -> None:
    """train: the built-in corpus and the user's own."""
    ncc = NumberCorpusConfig()
    g = p.add_argument_group("built-in corpus")
    g.add_argument("--lang", default=ncc.lang, choices=SUPPORTED_LANGS, help="target language")
    g.add_argument("--max-digits", type=int, default=ncc.max_digits, help="longest number")
    g.add_argument("--train-size", type=int, default=ncc.train_size, help="training pairs drawn")
    g.add_argument(
        "--dev-per-digits", type=int, default=ncc.dev_per_digits, help="dev numbers per length"
    )
    g.add_argument(
        "--test-per-digits", type=int, default=ncc.test_per_digits, help="test numbers per length"
    )
    g = p.add_argument_group("your own corpus (TSV 'source<TAB>target', or two aligned files)")
    for name in ("train", "dev", "test"):
        g.add_argument(f"--{name}", help=f"{name} split as a TSV file")
        g.add_argument(f"--{name}-src", help=f"{name} split, source side (one sentence a line)")
        g.add_argument(f"--{name}-tgt", help=f"{name} split, target side, line-aligned")
    g.add_argument(
        "--held-out-fraction",
        type=float,
        default=0.05,
        help="share of training pairs split off for dev and for test when they are not given",
    )
    g.add_argument("--max-chars", type=int, default=1000, help="longest allowed side of a pair")
    g.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default="fail",
        help="malformed lines: fail listing every one, or skip them with a warning each",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    """train: tokenizer, model shape and the output-length rule."""
    from service.bundle import Limits

    ll = Limits()
    g = p.add_argument_group("tokenizer and model")
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="SentencePiece vocabulary, an upper bound (default: 400 for the number corpus, "
        "whose small vocabulary keeps pieces at morpheme size so unseen numbers compose from "
        "seen parts; 8000 otherwise)",
    )
    g.add_argument(
        "--tokenizer-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece model"
    )
    g.add_argument("--d-model", type=int, default=DEFAULT_MODEL["d_model"], help="model width")
    g.add_argument("--heads", type=int, default=DEFAULT_MODEL["n_heads"], help="attention heads")
    g.add_argument("--d-ff", type=int, default=DEFAULT_MODEL["d_ff"], help="feed-forward width")
    g.add_argument(
        "--encoder-layers", type=int, default=DEFAULT_MODEL["n_encoder_layers"], help="layers"
    )
    g.add_argument(
        "--decoder-layers", type=int, default=DEFAULT_MODEL["n_decoder_layers"], help="layers"
    )
    g.add_argument("--dropout", type=float, default=DEFAULT_MODEL["dropout"], help="dropout")
    g.add_argument(
        "--norm",
        choices=["post", "pre"],
        default=DEFAULT_MODEL["norm"],
        help="LayerNorm after each residual (paper) or before each sub-layer",
    )
    g.add_argument(
        "--no-tie-embeddings",
        action="store_true",
        help="separate source, target and output embeddings (default: one shared matrix)",
    )
    g.add_argument("--max-positions", type=int, default=256, help="positional table size")
    g.add_argument(
        "--max-source-tokens", type=int, default=ll.max_source_tokens, help="longest source"
    )
    g.add_argument(
        "--max-target-tokens", type=int, default=ll.max_target_tokens, help="longest output"
    )
    g.add_argument("--len-a", type=float, default=ll.a, help="output limit a·source_tokens + b: a")
    g.add_argument("--len-b", type=float, default=ll.b, help="output limit a·source_tokens + b: b")


def _training_args(p: argparse.ArgumentParser) -> None:
    """train: the optimisation and its budget."""
    from export.train import TrainConfig

    tc = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=tc.seed, help="seed for data, init and order")
    g.add_argument("--batch-tokens", type=int, default=tc.batch_tokens, help="tokens per batch")
    g.add_argument("--lr", type=float, default=tc.lr, help="peak learning rate (after warm-up)")
    g.add_argument("--warmup-steps", type=int, default=tc.warmup_steps, help="warm-up steps")
    g.add_argument("--label-smoothing", type=float, default=tc.label_smoothing, help="ε")
    g.add_argument("--clip-norm", type=float, default=tc.clip_norm, help="gradient clip norm")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    g.add_argument("--time-budget", type=float, default=540.0, help="stop after this many s")
    g.add_argument(
        "--target-exact-match",
        type=float,
        default=1.0,
        help="stop once dev exact match reaches this (0 to disable)",
    )
    g.add_argument(
        "--target-patience",
        type=int,
        default=tc.target_patience,
        help="stop only after this many evaluations in a row at the target",
    )
    g.add_argument("--eval-every", type=int, default=tc.eval_every, help="steps between evals")
    g.add_argument(
        "--eval-max-sentences", type=int, default=0, help="dev sentences per eval (0: all)"
    )
    g.add_argument(
        "--bleu-tokenize",
        default=None,
        help="sacreBLEU tokenizer (default: 'char' for the number corpus, '13a' otherwise)",
    )
    g.add_argument("--device", default=tc.device, choices=["auto", "cpu", "cuda"], help="device")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: usable cores)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--skip-test", action="store_true", help="do not evaluate on test at the end")


def _checkpoint_commands(sub: Any) -> None:
    """evaluate, export, verify and ct2: what is done with a trained run."""
    p = sub.add_parser(
        "evaluate",
        help="BLEU / chrF / exact match of a checkpoint on a split",
        formatter_class=_Formatter,
        description="Greedy-decodes a split with PyTorch, prints BLEU, chrF and exact match "
        "(per digit count for the number corpus), writes metrics_<split>.json and a TSV of "
        "translations.",
    )
    p.add_argument("--run", default="runs/default", help="run directory")
    p.add_argument("--split", default="test", choices=["dev", "test"], help="which split")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--samples", default=None, help="TSV of translations (default: in the run)")
    p.add_argument("--limit", type=int, default=0, help="only the first N sentences (0: all)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "export",
        help="export a run to a verified model bundle",
        formatter_class=_Formatter,
        description="Exports encoder.onnx and decoder.onnx, checks them with onnx.checker, "
        "verifies them through the service's runtime and engine against PyTorch (shape grid and "
        "greedy tokens on the test split), measures test metrics the same way and writes the "
        "bundle with its manifest. "
        "Nothing is written to --out unless everything passes.",
    )
    p.add_argument("--run", default="runs/default", help="run directory")
    p.add_argument("--out", default="models/default", help="bundle directory to write")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--int8", action="store_true", help="also write dynamically quantized graphs")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "verify",
        help="re-verify a bundle against its run's PyTorch checkpoint",
        formatter_class=_Formatter,
        description="Checks the bundle's manifest and checksums, then compares the service's "
        "runtime with PyTorch on the shape grid and greedy tokens on the test split. Exit 1 on "
        "failure.",
    )
    p.add_argument("--bundle", default="models/default", help="bundle directory")
    p.add_argument("--run", default="runs/default", help="run directory with the checkpoint")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser(
        "ct2",
        help="convert a run's checkpoint to a CTranslate2 model (for the engine benchmark)",
        formatter_class=_Formatter,
        description="Converts with CTranslate2's spec API (pip install ctranslate2), then checks "
        "that CTranslate2's greedy tokens equal PyTorch's on the test split. Exit 1 otherwise.",
    )
    p.add_argument("--run", default="runs/default", help="run directory")
    p.add_argument("--out", default="models/default-ct2", help="CTranslate2 model directory")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_ct2)


def _import_command(sub: Any) -> None:
    """import-marian: a pretrained checkpoint into a verified bundle."""
    p = sub.add_parser(
        "import-marian",
        help="import a Marian / OPUS-MT (MarianMTModel) directory into a verified bundle",
        formatter_class=_Formatter,
        description="Reads a local MarianMTModel directory (save_pretrained output or a hub "
        "snapshot; nothing is downloaded), maps it onto our Transformer, exports the same graphs "
        "as for our own models and verifies them through the service's runtime, engine and "
        "tokenizer against transformers (logits, greedy tokens of generate(), MarianTokenizer "
        "ids). Needs the import extra (transformers). Exit 1, and nothing in --out, on any "
        "problem.",
    )
    p.add_argument("dir", help="the MarianMTModel directory")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--int8", action="store_true", help="also write dynamically quantized graphs")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=cmd_import_marian)


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="python -m export", description=__doc__, formatter_class=_Formatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a model (built-in number corpus or your own)",
        formatter_class=_Formatter,
        description="Trains a Transformer in a run directory, then evaluates the best "
        "checkpoint on the test split. Without --train it uses the built-in corpus: English "
        "number words → number words of --lang.",
    )
    p.add_argument("--run", default="runs/default", help="run directory to create (or resume)")
    p.add_argument("--resume", action="store_true", help="continue the run from checkpoint_last.pt")
    p.add_argument("--force", action="store_true", help="delete an existing run directory first")
    _corpus_args(p)
    _model_args(p)
    _training_args(p)
    p.set_defaults(func=cmd_train)
    _checkpoint_commands(sub)
    _import_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))
