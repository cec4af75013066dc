"""Converter from our checkpoint to a CTranslate2 model, with CTranslate2's Python spec API.

Used by the engine benchmark (benchmarks/) to run the *same weights* in CTranslate2. Load,
validate, fill the spec, save — refusing to overwrite without ``force`` — then check that
CTranslate2's greedy tokens equal ours before any timing is trusted.

    from export.ct2 import convert
    convert(Path("runs/default/checkpoint_best.pt"), Path("runs/default/tokenizer.model"),
            Path("models/default-ct2"))
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from export.model import DecoderLayer, EncoderLayer, Transformer, sinusoidal_positions
from export.tokenizer import Tokenizer


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy().copy()


def _linear(spec: Any, lin: Any) -> None:
    spec.weight = _np(lin.weight)
    if lin.bias is not None:
        spec.bias = _np(lin.bias)


def _fused(spec: Any, *lins: Any) -> None:
    """Several projections stacked into one (CTranslate2 fuses Q/K/V, or K/V)."""
    spec.weight = np.concatenate([_np(lin.weight) for lin in lins])
    spec.bias = np.concatenate([_np(lin.bias) for lin in lins])


def _norm(spec: Any, ln: Any) -> None:
    spec.gamma = _np(ln.weight)
    spec.beta = _np(ln.bias)


def build_spec(model: Transformer, tok: Tokenizer) -> Any:
    from ctranslate2.specs import transformer_spec

    cfg = model.cfg
    if cfg.norm != "pre":
        raise ValueError("the converter handles pre-norm models (CTranslate2's post-norm differs)")
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers), cfg.n_heads, pre_norm=True
    )
    spec.config.layer_norm_epsilon = 1e-5  # torch.nn.LayerNorm's
    positions = _np(sinusoidal_positions(cfg.max_positions, cfg.d_model))  # interleaved sin/cos
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = _np(model.src_embed.weight)
    enc.position_encodings.encodings = positions
    enc.scale_embeddings = True
    encoder_layers = [cast(EncoderLayer, m) for m in model.encoder_layers]
    for s, layer in zip(enc.layer, encoder_layers, strict=True):
        a = cast(Any, layer.self_attn)
        _fused(s.self_attention.linear[0], a.w_q, a.w_k, a.w_v)
        _linear(s.self_attention.linear[1], a.w_o)
        _norm(s.self_attention.layer_norm, layer.sub_attn.norm)
        _linear(s.ffn.linear_0, layer.ff.w_1)
        _linear(s.ffn.linear_1, layer.ff.w_2)
        _norm(s.ffn.layer_norm, layer.sub_ff.norm)
    _norm(enc.layer_norm, model.encoder_norm)
    dec.embeddings.weight = _np(model.tgt_embed.weight)
    dec.position_encodings.encodings = positions
    dec.scale_embeddings = True
    decoder_layers = [cast(DecoderLayer, m) for m in model.decoder_layers]
    for s, dlayer in zip(dec.layer, decoder_layers, strict=True):
        da, dc = cast(Any, dlayer.self_attn), cast(Any, dlayer.cross_attn)
        _fused(s.self_attention.linear[0], da.w_q, da.w_k, da.w_v)
        _linear(s.self_attention.linear[1], da.w_o)
        _norm(s.self_attention.layer_norm, dlayer.sub_self.norm)
        _linear(s.attention.linear[0], dc.w_q)
        _fused(s.attention.linear[1], dc.w_k, dc.w_v)
        _linear(s.attention.linear[2], dc.w_o)
        _norm(s.attention.layer_norm, dlayer.sub_cross.norm)
        _linear(s.ffn.linear_0, dlayer.ff.w_1)
        _linear(s.ffn.linear_1, dlayer.ff.w_2)
        _norm(s.ffn.layer_norm, dlayer.sub_ff.norm)
    _norm(dec.layer_norm, model.decoder_norm)
    dec.projection.weight = _np(model.generator.weight)
    pieces = tok.pieces(list(range(tok.vocab_size)))
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.validate()  # reports every missing or mismatched weight at once
    return spec


def convert(checkpoint: Path, tokenizer: Path, out: Path, force: bool = False) -> Path:
    from export.checkpoint import model_from_checkpoint

    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True to replace it")
    model, _ = model_from_checkpoint(checkpoint)
    spec = build_spec(model, Tokenizer(tokenizer))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec.save(str(out))
    return out


def greedy_agreement(ct2_dir: Path, checkpoint: Path, run_dir: Path) -> tuple[float, int]:
    """Share of the run's test sentences where CTranslate2's greedy tokens equal PyTorch's."""
    import ctranslate2

    from export.checkpoint import model_from_checkpoint
    from export.rundir import TOKENIZER_FILE, load_run, load_split
    from export.train import translate_ids
    from service.bundle import Limits

    tok = Tokenizer(run_dir / TOKENIZER_FILE)
    limits = Limits(**load_run(run_dir)["limits"])
    encoded = tok.encode_batch([p.source for p in load_split(run_dir, "test")])
    model, _ = model_from_checkpoint(checkpoint)
    ref = translate_ids(model, encoded, [limits.target_limit(len(e)) for e in encoded])
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", intra_threads=2)
    got = []
    for ids in encoded:  # one by one: each with its own output limit
        res = translator.translate_batch(
            [tok.pieces(ids)], beam_size=1, max_decoding_length=limits.target_limit(len(ids))
        )
        got.append([tok.piece_id(p) for p in res[0].hypotheses[0]])
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    return same / max(len(ref), 1), len(ref)
