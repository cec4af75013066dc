"""Model bundles of a chosen size with random weights, for benchmarks that measure speed only.

Throughput does not depend on what the weights are, only on the shapes and on how many tokens
each sentence generates (the same for every engine decoding the same bundle), so benchmarks can
look at realistic model sizes without hours of training. Built with the project's own exporter
(export.onnx_export) and the bundle contract (service.bundle): the service loads them like any other
bundle.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# Sizes named by the benchmarks. "base" is the Transformer-base configuration of the paper (the
# vocabulary is set by the tokenizer the bundle carries, or 32k without one).
SIZES: dict[str, dict[str, Any]] = {
    "small": {"d_model": 256, "n_heads": 4, "d_ff": 1024,
              "n_encoder_layers": 3, "n_decoder_layers": 3},
    "base": {"d_model": 512, "n_heads": 8, "d_ff": 2048,
             "n_encoder_layers": 6, "n_decoder_layers": 6},
}  # fmt: skip
COMMON = {"dropout": 0.0, "norm": "pre", "max_positions": 256}


def random_model(size: str, vocab_size: int, seed: int = 0) -> Any:
    """A Transformer of a named size with random (initial) weights, in eval mode."""
    import torch

    from export.model import ModelConfig, make_model

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, **SIZES[size], **COMMON)  # type: ignore[arg-type]
    return make_model(cfg).eval()


def tokenizer_vocab(tokenizer: Path) -> int:
    import sentencepiece as spm

    return int(spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size())


def write_bundle(
    model: Any,
    out: Path,
    tokenizer: Path | None = None,
    limits: dict[str, Any] | None = None,
    int8: bool = False,
) -> Path:
    """Exports `model` into a bundle at `out` (fp32 graphs, and int8 ones if asked).

    tokenizer: a SentencePiece model to ship; without one the bundle carries an empty tokenizer
    file and callers must feed token ids. limits: the manifest's length limits (default: 128
    source tokens, every sentence allowed 128 output tokens).
    """
    from export.onnx_export import OPSET, export_all
    from export.pipeline import quantize_int8
    from service.bundle import (
        FORMAT,
        FORMAT_VERSION,
        GRAPH_FILES,
        file_entries,
        graph_io,
        write_manifest,
    )

    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    export_all(model, out, OPSET)
    graphs = {"fp32": GRAPH_FILES["fp32"]}
    if int8:
        for part in GRAPH_FILES["int8"]:
            quantize_int8(out / GRAPH_FILES["fp32"][part], out / GRAPH_FILES["int8"][part])
        graphs["int8"] = GRAPH_FILES["int8"]
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    else:
        (out / "tokenizer.model").write_bytes(b"")
    lim = limits or {
        "max_source_tokens": 128,
        "max_target_tokens": 128,
        "target_tokens_a": 0.0,
        "target_tokens_b": 128.0,
    }
    io = graph_io(cfg.n_decoder_layers)
    write_manifest(
        out,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": cfg.to_dict(),
            "tokenizer": {"file": "tokenizer.model", "type": "sentencepiece"},
            "limits": lim,
            "onnx": {"opset": OPSET, "graphs": graphs, "io": io.manifest()},
            "files": file_entries(
                out, [f for g in graphs.values() for f in g.values()] + ["tokenizer.model"]
            ),
        },
    )
    return out
