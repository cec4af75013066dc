"""Run directory → verified model bundle, in a fixed order: load, validate, export, check,
verify, measure, write. Nothing reaches the output directory unless every step passed; an
existing bundle is replaced only with ``force``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from export.data import Pair
from export.model import Transformer
from export.onnx_export import OPSET, export_all
from export.rundir import load_run, load_split
from export.tokenizer import Tokenizer
from export.train import LengthLimits, model_from_checkpoint, score, translate_ids
from export.verify import (
    LOGIT_TOLERANCE,
    CachedOrtModel,
    OrtModel,
    PackedOrtModel,
    compare_cached_mixed_ages,
    compare_grid,
    compare_packed,
    ort_translate_ids,
    session,
)
from service.bundle import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    TOKENIZER_FILE,
    file_entries,
    graph_io,
    load_bundle,
    sha256_file,
    write_manifest,
)

log = logging.getLogger("export")


class ExportError(RuntimeError):
    pass


def greedy_agreement(
    model: Transformer,
    ort_model: OrtModel,
    tok: Tokenizer,
    pairs: list[Pair],
    limits: LengthLimits,
    batch_size: int = 64,
    by_length: bool = True,
) -> tuple[dict[str, Any], list[list[int]]]:
    """PyTorch and onnxruntime greedy tokens on every test sentence; returns the share of
    sentences with identical tokens, the first mismatches, and ORT's outputs. onnxruntime
    decodes batches of batch_size sentences, grouped by length or in the split's order."""
    encoded = tok.encode_batch([p.source for p in pairs])
    lim = [limits.target_limit(len(e)) for e in encoded]
    ref = translate_ids(model, encoded, lim)
    got = ort_translate_ids(ort_model, encoded, lim, model.cfg.pad_id, batch_size, by_length)
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
    }, got


def ort_metrics(
    ort_model: OrtModel,
    tok: Tokenizer,
    pairs: list[Pair],
    limits: LengthLimits,
    pad_id: int,
    bleu_tokenize: str,
) -> dict[str, Any]:
    encoded = tok.encode_batch([p.source for p in pairs])
    t = time.monotonic()
    ids = ort_translate_ids(
        ort_model, encoded, [limits.target_limit(len(e)) for e in encoded], pad_id
    )
    seconds = time.monotonic() - t
    metrics = score([tok.decode(r) for r in ids], pairs, bleu_tokenize)
    metrics["seconds"] = round(seconds, 2)
    return metrics


OPTIONAL_GRAPHS = ("decoder_kv", "encoder_packed")


def verify_graph(
    part: str,
    model: Transformer,
    graph: Path,
    fp32: OrtModel,
    tok: Tokenizer,
    pairs: list[Pair],
    limits: LengthLimits,
) -> dict[str, Any]:
    """One optional graph against PyTorch, beside fp32's other graphs, then greedy tokens on the
    whole test split through it.

    decoder_kv: rows of mixed ages share in-place steps (logits and cross attention of each row
    against that row decoded alone). encoder_packed: sentences of mixed lengths packed into one
    row, each against itself encoded alone; the greedy check decodes batches of 8 sentences in
    the split's order (mixed lengths, as a running batch admits them), encoded packed."""
    ort_model: OrtModel
    if part == "decoder_kv":
        ort_model = CachedOrtModel(
            fp32.encoder, session(graph), fp32.n_layers, fp32.n_heads, fp32.head_dim,
            fp32.bos_id, fp32.eos_id,
        )  # fmt: skip
        figures = compare_cached_mixed_ages(model, ort_model)
        worst = figures["logits"]
        agreement, _ = greedy_agreement(model, ort_model, tok, pairs, limits)
    elif part == "encoder_packed":
        packed = session(graph)
        ort_model = PackedOrtModel(
            fp32.encoder, fp32.decoder, fp32.n_layers, fp32.n_heads, fp32.head_dim,
            fp32.bos_id, fp32.eos_id, packed,
        )  # fmt: skip
        figures = compare_packed(model, packed, limits.max_source_tokens)
        worst = max(figures["encoder_states"], figures["cross_kv"])
        agreement, _ = greedy_agreement(model, ort_model, tok, pairs, limits, 8, by_length=False)
    else:
        raise ValueError(f"no verification for graph {part!r}")
    return _graph_record(figures, worst, agreement)


def _graph_record(figures: dict[str, Any], worst: float, agreement: dict[str, Any]) -> dict:
    """One optional graph's verification record: passed when its worst difference is within
    the tolerance and its greedy tokens are PyTorch's on every test sentence."""
    return {
        **figures,
        "greedy_identical_share": agreement["greedy_identical_share"],
        "mismatches": agreement["mismatches"],
        "passed": worst <= LOGIT_TOLERANCE and agreement["greedy_identical_share"] == 1.0,
    }


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the MatMul weights (activations stay fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # the quantizer logs every tensor on the root logger
    try:
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
        )
    finally:
        root.setLevel(level)


def export_bundle(
    run_dir: Path,
    out: Path,
    checkpoint: Path,
    int8: bool = False,
    force: bool = False,
    opset: int = OPSET,
) -> dict[str, Any]:
    # 1. validate everything before any work
    problems = []
    if opset < 17:
        problems.append(f"opset {opset} is older than 17")
    for need in (run_dir / TOKENIZER_FILE, run_dir / "data" / "test.jsonl", checkpoint):
        if not need.is_file():
            problems.append(f"{need} is missing")
    if out.exists() and not force:
        problems.append(f"{out} exists; --force to replace it")
    if problems:
        raise ExportError("cannot export:\n  - " + "\n  - ".join(problems))
    run = load_run(run_dir)
    model, state = model_from_checkpoint(checkpoint)
    tok = Tokenizer(run_dir / TOKENIZER_FILE)
    if tok.vocab_size != model.cfg.vocab_size:
        raise ExportError(
            f"tokenizer has {tok.vocab_size} pieces, the model {model.cfg.vocab_size}"
        )
    limits = LengthLimits(**run["limits"])
    pairs = load_split(run_dir, "test")

    # 2. export into a scratch directory next to the output, so the final move is a rename
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t = time.monotonic()
        export_all(model, work, opset)
        for part, name in GRAPH_FILES["fp32"].items():
            # full_check runs ONNX shape inference, which has no schema for onnxruntime's
            # contrib operator in decoder_kv.onnx
            onnx.checker.check_model(str(work / name), full_check=part != "decoder_kv")
        log.info("exported and checked the graphs in %.1fs", time.monotonic() - t)
        shutil.copyfile(run_dir / TOKENIZER_FILE, work / TOKENIZER_FILE)

        # 3. verify against PyTorch
        fp32 = OrtModel.load(
            work / GRAPH_FILES["fp32"]["encoder"],
            work / GRAPH_FILES["fp32"]["decoder"],
            model.cfg.to_dict(),
        )
        t = time.monotonic()
        grid = compare_grid(model, fp32, limits.max_source_tokens)
        agreement, _ = greedy_agreement(model, fp32, tok, pairs, limits)
        optional = {
            part: verify_graph(
                part, model, work / GRAPH_FILES["fp32"][part], fp32, tok, pairs, limits
            )
            for part in OPTIONAL_GRAPHS
        }
        verification = {
            "tolerance": LOGIT_TOLERANCE,
            "max_abs_logit_diff": grid["max_abs_logit_diff"],
            **agreement,
            "grid": grid["cases"],
            **optional,
            "passed": grid["max_abs_logit_diff"] <= LOGIT_TOLERANCE
            and agreement["greedy_identical_share"] == 1.0
            and all(v["passed"] for v in optional.values()),
            "seconds": round(time.monotonic() - t, 1),
        }
        log.info(
            "verification: max |Δ logits| %.2e, identical greedy tokens on %.2f%% of %d",
            verification["max_abs_logit_diff"],
            100 * agreement["greedy_identical_share"],
            agreement["sentences"],
        )
        if not verification["passed"]:
            kept = out.parent / f"{out.name}.failed"
            shutil.rmtree(kept, ignore_errors=True)
            work.rename(kept)
            (kept / "verification.json").write_text(json.dumps(verification, indent=2))
            raise ExportError(
                f"verification failed (max |Δ logits| {verification['max_abs_logit_diff']:.2e}, "
                f"identical greedy share {agreement['greedy_identical_share']:.4f}); "
                f"graphs and report left in {kept}"
            )

        # 4. measure what will be served
        metrics = {
            "fp32": ort_metrics(fp32, tok, pairs, limits, model.cfg.pad_id, run["bleu_tokenize"])
        }
        graphs = {"fp32": dict(GRAPH_FILES["fp32"])}
        if int8:
            for part in GRAPH_FILES["int8"]:
                quantize_int8(work / GRAPH_FILES["fp32"][part], work / GRAPH_FILES["int8"][part])
                onnx.checker.check_model(
                    str(work / GRAPH_FILES["int8"][part]), full_check=part != "decoder_kv"
                )
            q = OrtModel.load(
                work / GRAPH_FILES["int8"]["encoder"],
                work / GRAPH_FILES["int8"]["decoder"],
                model.cfg.to_dict(),
            )
            metrics["int8"] = ort_metrics(
                q, tok, pairs, limits, model.cfg.pad_id, run["bleu_tokenize"]
            )
            graphs["int8"] = dict(GRAPH_FILES["int8"])

        # 5. the manifest, then the move into place
        names = [TOKENIZER_FILE, *(f for g in graphs.values() for f in g.values())]
        io = graph_io(model.cfg.n_decoder_layers).manifest()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": model.cfg.to_dict(),
            "special_ids": tok.special_ids(),
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "type": "sentencepiece",
                "vocab_size": tok.vocab_size,
                "source_bos": False,
                "source_eos": False,
            },
            "limits": {
                "max_source_tokens": limits.max_source_tokens,
                "max_target_tokens": limits.max_target_tokens,
                "target_tokens_a": limits.a,
                "target_tokens_b": limits.b,
                "max_positions": model.cfg.max_positions,
            },
            "onnx": {
                "opset": opset,
                "graphs": graphs,
                "io": {part: io[part] for part in graphs["fp32"]},
            },
            "files": file_entries(work, names),
            "corpus": run.get("corpus_summary", {}),
            "training": {
                "steps": state["step"],
                "seconds": round(state["elapsed_s"], 1),
                "best_dev": state.get("best"),
                "config": state["train_config"],
            },
            "metrics": metrics,
            "verification": verification,
            "export": {
                "checkpoint": checkpoint.name,
                "checkpoint_sha256": sha256_file(checkpoint),
                "exporter": "torch.onnx (TorchScript-based)",
                "int8": int8,
                "quantization": "onnxruntime dynamic, QInt8 weights, MatMul" if int8 else None,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
        write_manifest(work, manifest)
        load_bundle(work)  # what the service will check
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        return manifest
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def verify_bundle(bundle: Path, run_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """Checks a written bundle again: manifest and checksums, then ORT vs PyTorch."""
    manifest = load_bundle(bundle).manifest
    run = load_run(run_dir)
    model, _ = model_from_checkpoint(checkpoint)
    if manifest["model"] != model.cfg.to_dict():
        raise ExportError(f"the bundle's model config differs from {checkpoint}'s")
    limits = LengthLimits(**run["limits"])
    tok = Tokenizer(bundle / manifest["tokenizer"]["file"])
    graphs = manifest["onnx"]["graphs"]["fp32"]
    ort_model = OrtModel.load(
        bundle / graphs["encoder"], bundle / graphs["decoder"], manifest["model"]
    )
    grid = compare_grid(model, ort_model, limits.max_source_tokens)
    pairs = load_split(run_dir, "test")
    agreement, _ = greedy_agreement(model, ort_model, tok, pairs, limits)
    optional = {
        part: verify_graph(part, model, bundle / graphs[part], ort_model, tok, pairs, limits)
        if part in graphs
        else None
        for part in OPTIONAL_GRAPHS
    }  # a bundle exported before a graph existed has no record of it
    return {
        "bundle": str(bundle),
        "checksums": "ok",
        "checkpoint_matches_manifest": sha256_file(checkpoint)
        == manifest["export"]["checkpoint_sha256"],
        "tolerance": LOGIT_TOLERANCE,
        "max_abs_logit_diff": grid["max_abs_logit_diff"],
        **agreement,
        "grid": grid["cases"],
        **optional,
        "passed": grid["max_abs_logit_diff"] <= LOGIT_TOLERANCE
        and agreement["greedy_identical_share"] == 1.0
        and all(v is None or v["passed"] for v in optional.values()),
    }
