"""Run directory → verified model bundle, in a fixed order: load, validate, export, check,
verify, measure, write. Nothing reaches the output directory unless every step passed; an
existing bundle is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from export.checkpoint import model_from_checkpoint
from export.data import Pair
from export.model import Transformer
from export.onnx_export import OPSET, export_all
from export.optimize import FUSED_QKV
from export.rundir import load_run, load_split
from export.tokenizer import Tokenizer
from export.verify import (
    GreedyFn,
    SentenceEncoder,
    StepModel,
    served,
    served_metrics,
    verify_fp32,
)
from service.bundle import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    TOKENIZER_FILE,
    Bundle,
    Limits,
    file_entries,
    graph_io,
    load_bundle,
    sha256_file,
    tokenizer_files,
    write_manifest,
)

log = logging.getLogger("export")


class ExportError(RuntimeError):
    pass


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


def core_manifest(
    model: Transformer, tok: Tokenizer, limits: Limits, opset: int, graphs: dict[str, Any]
) -> dict[str, Any]:
    """What the service needs of a manifest (graphs is shared: int8 graphs join it later)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
            "io": graph_io(model.cfg.n_decoder_layers).manifest(),
        },
    }


def bundle_files(core: dict[str, Any]) -> list[str]:
    graphs = core["onnx"]["graphs"]
    return [
        *tokenizer_files(core["tokenizer"]),
        *(f for g in graphs.values() for f in g.values()),
    ]


def write_core(work: Path, core: dict[str, Any]) -> Bundle:
    """The manifest so far, loaded back as the service loads it."""
    write_manifest(work, {**core, "files": file_entries(work, bundle_files(core))})
    return load_bundle(work)


@contextlib.contextmanager
def scratch_dir(out: Path) -> Iterator[Path]:
    """A scratch directory beside `out` (so that publishing is a rename), removed unless it
    was published. Its name carries the process id: a killed export leaves it behind, and the
    next export to the same place removes the ones whose process is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    prefix = f".{out.name}.scratch-{os.getpid()}-"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        yield work
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _remove_orphans(out: Path) -> None:
    """Scratch directories of exports to `out` whose process no longer runs, and old bundles
    such an export had set aside: put back at `out` if it was killed before moving the new one
    in, removed if it was killed after."""
    for d in out.parent.glob(f".{out.name}.scratch-*-*"):
        pid = d.name[len(f".{out.name}.scratch-") :].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    for d in out.parent.glob(f".{out.name}.old-*"):
        pid = d.name[len(f".{out.name}.old-") :]
        if not (d.is_dir() and pid.isdigit()) or _running(int(pid)):
            continue
        if out.exists() or out.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.rename(out)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def publish(work: Path, out: Path, manifest: dict[str, Any], force: bool) -> None:
    """Writes the manifest, checks the bundle as the service will, and moves it to `out`: an
    old bundle is renamed aside first and removed last, so a crash in between leaves one
    whole bundle, never none (an error moving the new one in puts the old one back).
    Readable by a service running as another user."""
    if out.exists() and not force:  # made by someone else while this export ran
        raise ExportError(f"{out} appeared while exporting; --force to replace it")
    write_manifest(work, manifest)
    load_bundle(work)
    work.chmod(0o755)  # mkdtemp's 0700 would lock out a service of another user
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    aside = out.exists()
    if aside:
        out.rename(old)
    try:
        work.rename(out)
    except OSError:
        if aside:
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def out_problems(out: Path, force: bool, inputs: list[Path]) -> list[str]:
    """What makes --out unusable, found before any work: a link, something that is not a
    directory (it or its parent, or an old <out>.failed), an existing bundle without force,
    or a path that overlaps the inputs (replacing it would delete them)."""
    problems = []
    failed = out.parent / f"{out.name}.failed"
    if out.is_symlink():
        problems.append(f"{out} is a symbolic link: give the directory itself")
    elif out.exists() and not out.is_dir():
        problems.append(f"{out} exists and is not a directory")
    elif out.exists() and not force:
        problems.append(f"{out} exists; --force to replace it")
    for p in (out.parent, failed):
        if p.exists() and not p.is_dir():
            problems.append(f"{p} exists and is not a directory")
    real = out.resolve()
    for i in inputs:
        src = i.resolve()
        if real == src or real in src.parents or src in real.parents:
            problems.append(f"{out} overlaps the input {i}: replacing it would delete that")
    return problems


def _check_inputs(run_dir: Path, out: Path, checkpoint: Path, force: bool, opset: int) -> None:
    """Every problem with the export's inputs at once, before any work."""
    problems = out_problems(out, force, [run_dir])
    if opset < 17:
        problems.append(f"opset {opset} is older than 17")
    for need in (run_dir / TOKENIZER_FILE, run_dir / "data" / "test.jsonl", checkpoint):
        if not need.is_file():
            problems.append(f"{need} is missing")
    if problems:
        raise ExportError("cannot export:\n  - " + "\n  - ".join(problems))


def export_graphs(model: Transformer, work: Path, opset: int) -> None:
    t = time.monotonic()
    export_all(model, work, opset)
    for part, name in GRAPH_FILES["fp32"].items():
        # full_check runs ONNX shape inference, which has no schema for onnxruntime's
        # contrib operator in decoder_kv.onnx
        onnx.checker.check_model(str(work / name), full_check=part != "decoder_kv")
    log.info("exported and checked the graphs in %.1fs", time.monotonic() - t)


def quantize_graphs(work: Path) -> None:
    for part in GRAPH_FILES["int8"]:
        quantize_int8(work / GRAPH_FILES["fp32"][part], work / GRAPH_FILES["int8"][part])
        onnx.checker.check_model(
            str(work / GRAPH_FILES["int8"][part]), full_check=part != "decoder_kv"
        )


def verified(
    model: StepModel,
    bundle: Bundle,
    tok: SentenceEncoder,
    pairs: list[Pair],
    limits: Limits,
    work: Path,
    out: Path,
    greedy: GreedyFn | None = None,
) -> dict[str, Any]:
    """The verification record; when it fails, the graphs and the report are moved to
    <out>.failed and ExportError says so."""
    t = time.monotonic()
    verification = verify_fp32(model, bundle, tok, pairs, limits, greedy)
    verification["seconds"] = round(time.monotonic() - t, 1)
    log.info(
        "verification: max |Δ logits| %.2e, identical greedy tokens on %.2f%% of %d",
        verification["max_abs_logit_diff"],
        100 * verification["greedy_identical_share"],
        verification["sentences"],
    )
    if not verification["passed"]:
        kept = out.parent / f"{out.name}.failed"
        shutil.rmtree(kept, ignore_errors=True)
        work.rename(kept)
        (kept / "verification.json").write_text(json.dumps(verification, indent=2))
        raise ExportError(
            f"verification failed (max |Δ logits| {verification['max_abs_logit_diff']:.2e}, "
            f"identical greedy share {verification['greedy_identical_share']:.4f}); "
            f"graphs and report left in {kept}"
        )
    return verification


def export_record(checkpoint: Path, int8: bool) -> dict[str, Any]:
    """The manifest's ``export``: the checkpoint and the libraries that made the bundle."""
    return {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "exporter": "torch.onnx (TorchScript-based)",
        "int8": int8,
        "quantization": "onnxruntime dynamic, QInt8 weights, MatMul" if int8 else None,
        # export_all applies it to every bundle (int8 graphs are quantized from the fused ones)
        "graph_optimizations": {"decoder_kv": FUSED_QKV},
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def export_bundle(
    run_dir: Path,
    out: Path,
    checkpoint: Path,
    int8: bool = False,
    force: bool = False,
    opset: int = OPSET,
) -> dict[str, Any]:
    # 1. validate everything before any work
    _check_inputs(run_dir, out, checkpoint, force, opset)
    run = load_run(run_dir)
    model, state = model_from_checkpoint(checkpoint)
    tok = Tokenizer(run_dir / TOKENIZER_FILE)
    if tok.vocab_size != model.cfg.vocab_size:
        raise ExportError(
            f"tokenizer has {tok.vocab_size} pieces, the model {model.cfg.vocab_size}"
        )
    limits = Limits(**run["limits"])
    pairs = load_split(run_dir, "test")
    with scratch_dir(out) as work:  # 2. export beside the output
        export_graphs(model, work, opset)
        shutil.copyfile(run_dir / TOKENIZER_FILE, work / TOKENIZER_FILE)
        # 3. verify against PyTorch, through the service's own decode code (service.runtime
        #    and service.engine over the bundle as written so far)
        graphs = {"fp32": dict(GRAPH_FILES["fp32"])}
        core = core_manifest(model, tok, limits, opset, graphs)
        bundle = write_core(work, core)
        verification = verified(model, bundle, tok, pairs, limits, work, out)
        # 4. measure what will be served (the engine with the service's default settings)
        metrics = {"fp32": served_metrics(served(bundle), tok, pairs, limits, run["bleu_tokenize"])}
        if int8:
            quantize_graphs(work)
            graphs["int8"] = dict(GRAPH_FILES["int8"])
            bundle = write_core(work, core)
            metrics["int8"] = served_metrics(
                served(bundle, "int8"), tok, pairs, limits, run["bleu_tokenize"]
            )
        # 5. the manifest, then the move into place
        manifest = finished_manifest(core, work, verification, export_record(checkpoint, int8))
        manifest |= {"corpus": run.get("corpus_summary", {}), "metrics": metrics}
        manifest["training"] = {
            "steps": state["step"],
            "seconds": round(state["elapsed_s"], 1),
            "best_dev": state.get("best"),
            "config": state["train_config"],
        }
        publish(work, out, manifest, force)
        return manifest


def finished_manifest(
    core: dict[str, Any], work: Path, verification: dict[str, Any], record: dict[str, Any]
) -> dict[str, Any]:
    """The core manifest with its creation time, every file's checksum, the verification
    record and the export record."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in core.items() if k not in ("format", "format_version")},
        "files": file_entries(work, bundle_files(core)),
        "verification": verification,
        "export": record,
    }


def verify_bundle(bundle: Path, run_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """Checks a written bundle again: manifest and checksums, then the served code vs PyTorch."""
    loaded = load_bundle(bundle)
    manifest = loaded.manifest
    run = load_run(run_dir)
    model, _ = model_from_checkpoint(checkpoint)
    if manifest["model"] != model.cfg.to_dict():
        raise ExportError(f"the bundle's model config differs from {checkpoint}'s")
    limits = Limits(**run["limits"])
    tok = Tokenizer(bundle / manifest["tokenizer"]["file"])
    pairs = load_split(run_dir, "test")
    return {
        "bundle": str(bundle),
        "checksums": "ok",
        "checkpoint_matches_manifest": sha256_file(checkpoint)
        == manifest["export"]["checkpoint_sha256"],
        **verify_fp32(model, loaded, tok, pairs, limits),
    }
