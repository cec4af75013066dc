"""ONNX export of ``Transformer.encode`` and ``Transformer.decode_step`` as two graphs.

``encoder.onnx`` runs once per batch of sentences and also produces every decoder layer's
cross-attention keys/values, so the decoder never recomputes them. ``decoder.onnx`` is one
greedy step over a batch of rows that may be of different ages: each row brings its own
position and a mask over the cached self-attention slots. Names follow the usual seq2seq ONNX
convention (``input_ids``, ``past_key_values.{i}.decoder.key``, ``present.{i}.decoder.key``…).

``decoder_kv.onnx`` is the same step over preallocated per-row caches (B, H, M, Dh): each row's
history sits at positions 0..position-1 of its own row and the step writes the new key/value at
its position, through onnxruntime's ``com.microsoft.GroupQueryAttention``. Bound to one buffer
as both input and output the cache is updated in place (no copy of the history every step, no
left padding between rows of different ages). onnxruntime runs that operator in fp32 on the CPU;
the CUDA provider has it for fp16 only, so CUDA serving uses ``decoder.onnx``.

``encoder_packed.onnx`` is the encoder over sentences packed end to end without padding: each
token brings its position in its own sentence and its sentence's index, and attends within its
sentence only. Its outputs are per token; the server scatters them into a padded batch. A few
sentences of mixed lengths (what a running batch admits at a time) then cost their real tokens,
not rows × the longest.

``export_all`` writes the graphs as the bundle carries them: ``decoder_kv.onnx`` with each
layer's Q/K/V projections as one MatMul (``export.optimize``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from export.model import KV, StepOutput, Transformer
from export.optimize import optimize_decoder_kv
from service.bundle import graph_io

OPSET = 17


class EncoderGraph(nn.Module):
    """(input_ids (B, S), attention_mask (B, S)) → last_hidden_state, cross K/V per layer."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        enc = self.model.encode(input_ids, attention_mask)
        flat = [t for kv in enc.cross_kv for t in kv]  # each (B, H, S, Dh)
        return (enc.memory, *flat)


class PackedEncoderGraph(EncoderGraph):
    """(input_ids, position_ids, segment_ids (B, T)) → last_hidden_state (B, T, D), cross K/V
    per layer (B, H, T, Dh), for sentences packed end to end."""

    def forward(  # type: ignore[override]
        self, input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor
    ) -> tuple[Tensor, ...]:
        enc = self.model.encode_packed(input_ids, position_ids, segment_ids)
        return (enc.memory, *[t for kv in enc.cross_kv for t in kv])


class DecoderGraph(nn.Module):
    """One step: the flat inputs of ``graph_io().decoder_inputs`` → its flat outputs."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.n_layers = len(model.decoder_layers)

    def split(self, kv: tuple[Tensor, ...]) -> tuple[list[KV], list[KV]]:
        """Flat self-attention caches then cross K/V → per-layer (key, value) pairs of each."""
        n = self.n_layers
        pairs = [(kv[2 * i], kv[2 * i + 1]) for i in range(2 * n)]
        return pairs[:n], pairs[n:]

    @staticmethod
    def outputs(res: StepOutput) -> tuple[Tensor, ...]:
        present = [t for p in res.present for t in p]
        return (res.logits[:, None, :], *present, *res.cross_attentions)

    def forward(
        self,
        input_ids: Tensor,  # (B, 1)
        position_ids: Tensor,  # (B, 1)
        decoder_attention_mask: Tensor,  # (B, P+1)
        encoder_attention_mask: Tensor,  # (B, S)
        *kv: Tensor,  # past self K/V (B, H, P, Dh) then cross K/V (B, H, S, Dh), per layer
    ) -> tuple[Tensor, ...]:
        past, cross = self.split(kv)
        res = self.model.decode_step(
            input_ids[:, 0],
            position_ids[:, 0],
            past,
            decoder_attention_mask,
            cross,
            encoder_attention_mask,
        )
        return self.outputs(res)  # present: (B, H, P+1, Dh)


class CachedDecoderGraph(DecoderGraph):
    """One step over preallocated caches: ``graph_io().cached_decoder_inputs`` → the same
    outputs as DecoderGraph, ``present.*`` being the updated caches (B, H, M, Dh)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: Tensor,  # (B, 1)
        position_ids: Tensor,  # (B, 1): also each row's cached length
        encoder_attention_mask: Tensor,  # (B, S)
        *kv: Tensor,  # caches (B, H, M, Dh) then cross K/V (B, H, S, Dh), per layer
    ) -> tuple[Tensor, ...]:
        cache, cross = self.split(kv)
        res = self.model.decode_step_cached(
            input_ids[:, 0], position_ids[:, 0], cache, cross, encoder_attention_mask
        )
        return self.outputs(res)


def _example_inputs(model: Transformer, batch: int = 2, src_len: int = 5, past: int = 3):
    cfg = model.cfg
    ids = torch.randint(4, cfg.vocab_size, (batch, src_len))
    mask = torch.ones(batch, src_len, dtype=torch.long)
    h, dh, n = cfg.n_heads, cfg.head_dim, len(model.decoder_layers)
    self_kv = [torch.randn(batch, h, past, dh) for _ in range(2 * n)]
    cross_kv = [torch.randn(batch, h, src_len, dh) for _ in range(2 * n)]
    dec = (
        torch.randint(4, cfg.target_vocab, (batch, 1)),
        torch.full((batch, 1), past, dtype=torch.long),
        torch.ones(batch, past + 1, dtype=torch.long),
        mask,
        *self_kv,
        *cross_kv,
    )
    return (ids, mask), dec


def export_graphs(model: Transformer, out_dir: Path, opset: int = OPSET) -> tuple[Path, Path]:
    """Writes encoder.onnx and decoder.onnx into out_dir (which must exist); returns their paths.

    Uses the TorchScript-based exporter: it takes ``dynamic_axes`` directly and produces plain
    graphs of standard ops that every onnxruntime build runs.
    """
    model = model.eval()
    io = graph_io(len(model.decoder_layers))
    enc_args, dec_args = _example_inputs(model)
    batch, src, past, total = "batch", "source_length", "past_length", "past_length_plus_1"
    enc_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: batch, 1: src},
        "attention_mask": {0: batch, 1: src},
        "last_hidden_state": {0: batch, 1: src},
    }
    for name in io.encoder_outputs[1:]:
        enc_axes[name] = {0: batch, 2: src}
    dec_axes = _step_axes(io.decoder_inputs[4:], io.decoder_outputs, past, total)
    dec_axes["decoder_attention_mask"] = {0: batch, 1: total}
    enc_path, dec_path = out_dir / "encoder.onnx", out_dir / "decoder.onnx"
    _export(EncoderGraph(model), enc_args, enc_path, io.encoder_inputs, io.encoder_outputs,
            enc_axes, opset)  # fmt: skip
    _export(DecoderGraph(model), dec_args, dec_path, io.decoder_inputs, io.decoder_outputs,
            dec_axes, opset)  # fmt: skip
    return enc_path, dec_path


def export_cached_decoder(model: Transformer, out_dir: Path, opset: int = OPSET) -> Path:
    """Writes decoder_kv.onnx (see the module docstring) into out_dir; returns its path."""
    model = model.eval()
    io = graph_io(len(model.decoder_layers))
    cfg = model.cfg
    b, s, m = 2, 5, 6
    h, dh, n = cfg.n_heads, cfg.head_dim, len(model.decoder_layers)
    args = (
        torch.randint(4, cfg.target_vocab, (b, 1)),
        torch.tensor([[0], [3]]),
        torch.ones(b, s, dtype=torch.long),
        *[torch.randn(b, h, m, dh) for _ in range(2 * n)],
        *[torch.randn(b, h, s, dh) for _ in range(2 * n)],
    )
    axes = _step_axes(io.cached_decoder_inputs[3:], io.decoder_outputs, "cache_length",
                      "cache_length")  # fmt: skip
    path = out_dir / "decoder_kv.onnx"
    _export(CachedDecoderGraph(model), args, path, io.cached_decoder_inputs, io.decoder_outputs,
            axes, opset, custom_opsets={"com.microsoft": 1})  # fmt: skip
    return path


def _step_axes(
    caches: list[str], outputs: list[str], past: str, present: str
) -> dict[str, dict[int, str]]:
    """Dynamic axes of a one-step decoder graph: batch everywhere, the source length on the
    source mask, cross K/V and attention, `past` on the self-attention caches fed in (axis 2)
    and `present` on those returned."""
    batch, src = "batch", "source_length"
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: batch},
        "position_ids": {0: batch},
        "encoder_attention_mask": {0: batch, 1: src},
        "logits": {0: batch},
    }
    for name in caches:
        axes[name] = {0: batch, 2: past if ".decoder." in name else src}
    for name in outputs[1:]:
        axes[name] = {0: batch, 2: present if name.startswith("present.") else src}
    return axes


def export_packed_encoder(model: Transformer, out_dir: Path, opset: int = OPSET) -> Path:
    """Writes encoder_packed.onnx (see the module docstring) into out_dir; returns its path."""
    model = model.eval()
    io = graph_io(len(model.decoder_layers))
    args = (
        torch.randint(4, model.cfg.vocab_size, (1, 7)),
        torch.tensor([[0, 1, 2, 0, 1, 0, 1]]),
        torch.tensor([[0, 0, 0, 1, 1, 2, 2]]),
    )
    axes: dict[str, dict[int, str]] = {
        name: {0: "batch", 1: "packed_length"} for name in io.packed_encoder_inputs
    }
    axes["last_hidden_state"] = {0: "batch", 1: "packed_length"}
    for name in io.encoder_outputs[1:]:
        axes[name] = {0: "batch", 2: "packed_length"}
    path = out_dir / "encoder_packed.onnx"
    _export(PackedEncoderGraph(model), args, path, io.packed_encoder_inputs, io.encoder_outputs,
            axes, opset)  # fmt: skip
    return path


def export_all(model: Transformer, out_dir: Path, opset: int = OPSET) -> list[Path]:
    """Every graph of a bundle: encoder, decoder, decoder_kv and encoder_packed, with
    decoder_kv's Q/K/V projections fused (export.optimize): the graphs as they are served."""
    paths = [
        *export_graphs(model, out_dir, opset),
        export_cached_decoder(model, out_dir, opset),
        export_packed_encoder(model, out_dir, opset),
    ]
    optimize_decoder_kv(out_dir / "decoder_kv.onnx", len(model.decoder_layers))
    return paths


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
    opset: int,
    **extra: Any,
) -> None:
    """torch.onnx.export with the TorchScript-based exporter (see export_graphs)."""
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
            **extra,
        )
