"""Marian / OPUS-MT checkpoints (Hugging Face ``MarianMTModel`` directories) → verified bundles.

    python -m export import-marian DIR --out models/NAME [--int8] [--force]

A fixed sequence, as for our own exports: read and validate the directory (every problem at
once, naming the file and field), map its config onto ``ModelConfig`` and its weights onto our
``Transformer`` (the position table is copied from the instantiated model, not recomputed),
export the same graphs as for our own models, then verify the graphs through the service's
own runtime, engine and tokenizer against transformers itself: logits over the usual grid,
greedy tokens against ``generate(num_beams=1, do_sample=False)`` with the checkpoint's
generation settings, and token ids against ``MarianTokenizer`` on edge cases. Nothing reaches
``--out`` unless everything passed. transformers is imported here only (the ``import`` extra);
the service never needs it. Nothing is downloaded: the directory must be on this machine.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.data import Pair
from export.model import KV, EncoderOutput, ModelConfig, StepOutput, Transformer, make_model
from export.onnx_export import OPSET
from export.pipeline import (
    ExportError,
    core_manifest,
    export_graphs,
    export_record,
    finished_manifest,
    out_problems,
    publish,
    quantize_graphs,
    scratch_dir,
    verified,
    write_core,
)
from export.verify import GreedyFn
from service.bundle import GRAPH_FILES, MARIAN_FILES, Limits
from service.tokenizer import MarianTextTokenizer

log = logging.getLogger("export.marian")

CONFIG, GENERATION, TOKENIZER_CONFIG = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
)
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# transformers' activation names → ModelConfig.activation (gelu_new is the tanh formula).
ACTIVATIONS = {
    "swish": "swish",
    "silu": "swish",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
# Fields of old Marian configs that would change the computation if they held; transformers'
# MarianMTModel ignores them, so a model that sets them was not trained as it would be run.
MUST_BE_OFF = (
    "normalize_before",
    "normalize_embedding",
    "add_final_layer_norm",
    "add_bias_logits",
    "layernorm_embedding",
)
# Generation settings that change greedy output; any value other than these is refused.
GENERATION_DEFAULTS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "max_new_tokens": None,
    "forced_bos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}
SENTENCES = (
    "the small cat sat on the old stone by the river",
    "A big red house.",
    "Where is the train station?",
    "night day sun moon star",
    "fish",
    "The weather is cold and the road is long, but we will walk.",
    "1, 2, 3 — numbers and punctuation!",
    "water light dark green blue tree hill field",
)


class MarianImportError(ExportError):
    pass


@dataclass
class MarianDir:
    path: Path
    config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    vocab: dict[str, int]
    target_vocab: dict[str, int] | None
    weights: Path


def _json(path: Path, problems: list[str], required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            problems.append(f"{path}: missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path}: not valid JSON ({e})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object")
        return {}
    return data


def read_dir(path: Path) -> MarianDir:
    """The directory's JSON files, checked: every problem at once, naming file and field."""
    problems: list[str] = []
    if not path.is_dir():
        raise MarianImportError(f"{path}: not a directory")
    config = _json(path / CONFIG, problems)
    if config and config.get("model_type") != "marian":
        problems.append(
            f"{path / CONFIG}: model_type is {config.get('model_type')!r}, not 'marian': "
            "not a Marian model"
        )
    tok_cfg = _json(path / TOKENIZER_CONFIG, problems, required=False)
    _json(path / GENERATION, problems, required=False)  # transformers reads it; refuse garbage
    for name in ("source.spm", "target.spm"):
        if not (path / name).is_file():
            problems.append(f"{path / name}: missing")
    vocab = _json(path / MARIAN_FILES["vocab"], problems)
    target = None
    if tok_cfg.get("separate_vocabs"):
        target = _json(path / MARIAN_FILES["target_vocab"], problems)
    weights = [path / w for w in WEIGHTS if (path / w).is_file()]
    if not weights:
        problems.append(f"{path}: no weights file ({' or '.join(WEIGHTS)})")
    if problems:
        raise MarianImportError("cannot import:\n  - " + "\n  - ".join(problems))
    return MarianDir(path, config, tok_cfg, vocab, target, weights[0])


def model_config(d: MarianDir) -> ModelConfig:
    """config.json → ModelConfig, or MarianImportError naming every field we cannot represent
    exactly."""
    c, where = d.config, d.path / CONFIG
    problems = [
        f"{where}: {k} is {c[k]!r}; only false is supported" for k in MUST_BE_OFF if c.get(k)
    ]
    if c.get("static_position_embeddings") is False:
        problems.append(f"{where}: static_position_embeddings is false (learned positions)")
    act = c.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        problems.append(f"{where}: activation_function {act!r} is not one of {sorted(ACTIVATIONS)}")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"),
                     ("encoder_ffn_dim", "decoder_ffn_dim")):  # fmt: skip
        if c.get(enc, 16) != c.get(dec, 16):
            problems.append(f"{where}: {enc} {c.get(enc)} ≠ {dec} {c.get(dec)}")
    eos = c.get("eos_token_id", 0)
    if not isinstance(eos, int):
        problems.append(f"{where}: eos_token_id {eos!r} is not a single id")
    problems += _shape_problems(c, where)
    if problems:
        raise MarianImportError("cannot import:\n  - " + "\n  - ".join(problems))
    shared = bool(c.get("share_encoder_decoder_embeddings", True))
    vocab = int(c.get("vocab_size", 58101))
    target = vocab if shared else int(c.get("decoder_vocab_size") or vocab)
    problems += _vocab_problems(d, vocab, target)
    pad = c.get("pad_token_id", 58100)
    fields = dict(
        vocab_size=vocab, d_model=c.get("d_model", 1024),
        n_heads=c.get("encoder_attention_heads", 16),
        d_ff=c.get("encoder_ffn_dim", 4096), n_encoder_layers=c.get("encoder_layers", 12),
        n_decoder_layers=c.get("decoder_layers", 12), dropout=0.0,
        max_positions=c.get("max_position_embeddings", 1024), norm="post",
        tie_embeddings=bool(c.get("tie_word_embeddings", True)), pad_id=pad,
        bos_id=c.get("decoder_start_token_id", pad), eos_id=eos, positions="halves",
        scale_embedding=bool(c.get("scale_embedding", False)), final_logits_bias=True,
        activation=ACTIVATIONS.get(act, "relu"), layer_norm_eps=1e-5,
        tgt_vocab_size=0 if shared else target, share_embeddings=shared,
        decoder_start_id=c.get("decoder_start_token_id", pad),
    )  # fmt: skip
    if not problems:
        try:
            return ModelConfig(**fields)
        except (ValueError, TypeError) as e:
            problems.append(f"{where}: {e}")
    raise MarianImportError("cannot import:\n  - " + "\n  - ".join(problems))


# Bounds on the shapes a config may ask for, checked before any model is built: beyond any
# translation model, small enough that a hostile config.json cannot exhaust memory.
SHAPE_BOUNDS = {
    "vocab_size": (1, 1 << 20), "decoder_vocab_size": (1, 1 << 20), "d_model": (1, 1 << 15),
    "encoder_layers": (1, 256), "decoder_layers": (1, 256), "encoder_attention_heads": (1, 256),
    "decoder_attention_heads": (1, 256), "encoder_ffn_dim": (1, 1 << 17),
    "decoder_ffn_dim": (1, 1 << 17), "max_position_embeddings": (16, 1 << 16),
    "pad_token_id": (0, 1 << 20), "decoder_start_token_id": (0, 1 << 20),
}  # fmt: skip


def _shape_problems(c: dict[str, Any], where: Path) -> list[str]:
    """Every size and id field present must be an integer within its bounds."""
    return [
        f"{where}: {k} is {c[k]!r}; it must be an integer from {lo} to {hi}"
        for k, (lo, hi) in SHAPE_BOUNDS.items()
        if c.get(k) is not None and (type(c[k]) is not int or not lo <= c[k] <= hi)
    ]


def _vocab_problems(d: MarianDir, vocab: int, target: int) -> list[str]:
    problems = []
    tv = d.target_vocab if d.target_vocab is not None else d.vocab
    for name, table, size, field in (
        (MARIAN_FILES["vocab"], d.vocab, vocab, "vocab_size"),
        (MARIAN_FILES["target_vocab"], tv, target, "decoder_vocab_size"),
    ):
        if table is d.vocab and name == MARIAN_FILES["target_vocab"]:
            continue
        ids = sorted(table.values()) if all(isinstance(v, int) for v in table.values()) else []
        if ids != list(range(size)):
            problems.append(
                f"{d.path / name}: {len(table)} entries (ids 0..{len(table) - 1} expected), "
                f"the model's embedding has {size} rows ({CONFIG} {field})"
            )
    for token in (_token(d, "eos_token", "</s>"), _token(d, "unk_token", "<unk>")):
        if token not in d.vocab:
            problems.append(f"{d.path / MARIAN_FILES['vocab']}: lacks {token!r}")
    eos = d.config.get("eos_token_id", 0)
    if tv.get(_token(d, "eos_token", "</s>")) != eos:
        problems.append(f"{d.path / CONFIG}: eos_token_id {eos} is not the vocabulary's eos")
    return problems


def _token(d: MarianDir, key: str, default: str) -> str:
    value = d.tokenizer_config.get(key, default)
    return str(value.get("content", default) if isinstance(value, dict) else value)


def load_transformers(d: MarianDir) -> tuple[Any, Any]:
    """MarianMTModel (eager attention: its weights are compared) and MarianTokenizer, from
    the directory only."""
    try:
        from transformers import MarianMTModel, MarianTokenizer
    except ImportError as e:
        raise MarianImportError(
            "import-marian needs transformers: pip install -e '.[import]'"
        ) from e
    try:
        loaded: Any = MarianMTModel.from_pretrained(
            str(d.path), local_files_only=True, attn_implementation="eager",
            output_loading_info=True,
        )  # fmt: skip
        hf, info = loaded
    except Exception as e:
        raise MarianImportError(f"{d.weights}: transformers cannot load it ({e})") from e
    missing = [k for k in info.get("missing_keys", []) if "embed_positions" not in k]
    if "final_logits_bias" not in _weight_names(d.weights):  # a buffer: not in missing_keys
        missing.append("final_logits_bias")
    if missing:
        raise MarianImportError(f"{d.weights}: lacks weights {sorted(missing)[:10]}")
    unexpected = list(info.get("unexpected_keys", []))
    if unexpected:  # weights of a computation MarianMTModel (and we) would not run
        raise MarianImportError(
            f"{d.weights}: weights MarianMTModel does not use {unexpected[:10]}"
        )
    try:
        tok = MarianTokenizer.from_pretrained(str(d.path), local_files_only=True)
    except Exception as e:
        raise MarianImportError(f"{d.path}: MarianTokenizer cannot load it ({e})") from e
    return hf.eval(), tok


def _weight_names(path: Path) -> set[str]:
    """The tensor names a weights file holds, without loading the tensors where it can."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return set(f.keys())
    return set(torch.load(path, map_location="cpu", weights_only=True))


def generation_settings(hf: Any, cfg: ModelConfig) -> dict[str, Any]:
    """The manifest's ``generation`` from the generation config generate() uses (the file's,
    or transformers' defaults from config.json without one); refuses what greedy search
    would apply and we do not."""
    gen = hf.generation_config.to_dict()
    where = GENERATION
    problems = [
        f"{where}: {k} is {gen[k]!r}; only {v!r} is supported"
        for k, v in GENERATION_DEFAULTS.items()
        if gen.get(k, v) not in (v, None, [], {})  # None: unset (transformers 5)
    ]
    bad = gen.get("bad_words_ids") or []
    if any(len(seq) != 1 for seq in bad):
        problems.append(f"{where}: bad_words_ids holds sequences longer than one token")
    eos = gen.get("eos_token_id", cfg.eos_id)
    if eos != cfg.eos_id:  # a list, or another id: rows we serve would not end where its do
        problems.append(f"{where}: eos_token_id {eos!r} is not {CONFIG}'s single eos {cfg.eos_id}")
    length = gen.get("max_length")
    if length is not None and (type(length) is not int or length < 3):
        problems.append(f"{where}: max_length {length!r} is not an integer ≥ 3")
    forced = gen.get("forced_eos_token_id")
    if forced not in (None, cfg.eos_id):
        problems.append(f"{where}: forced_eos_token_id {forced!r} is not eos {cfg.eos_id}")
    start = gen.get("decoder_start_token_id", cfg.start_id)
    if start != cfg.start_id:
        problems.append(f"{where}: decoder_start_token_id {start} ≠ {CONFIG}'s {cfg.start_id}")
    if problems:
        raise MarianImportError("cannot import:\n  - " + "\n  - ".join(problems))
    return {
        "decoder_start_id": cfg.start_id,
        "suppressed_ids": sorted({int(seq[0]) for seq in bad}),
        "max_length": int(gen.get("max_length") or 20),
        "forced_eos": forced is not None,
        "num_beams_in_checkpoint": int(gen.get("num_beams") or 1),  # we serve greedy
    }


def map_weights(hf: Any, cfg: ModelConfig) -> Transformer:
    """Our Transformer holding MarianMTModel's weights, loaded strictly (every missing or
    unexpected name at once); the position table copied from the instantiated model."""
    m = hf.model
    src = {"src_embed.weight": m.encoder.embed_tokens.weight,
           "generator.weight": hf.lm_head.weight, "logits_bias": hf.final_logits_bias}  # fmt: skip
    src["tgt_embed.weight"] = m.decoder.embed_tokens.weight
    names = {"q_proj": "w_q", "k_proj": "w_k", "v_proj": "w_v", "out_proj": "w_o"}
    for side, layers in (("encoder", m.encoder.layers), ("decoder", m.decoder.layers)):
        for i, layer in enumerate(layers):
            attn = {"self_attn": "self_attn", "encoder_attn": "cross_attn"}
            norms = {
                "self_attn_layer_norm": "sub_attn" if side == "encoder" else "sub_self",
                "encoder_attn_layer_norm": "sub_cross",
                "final_layer_norm": "sub_ff",
            }
            for name, tensor in layer.state_dict().items():
                mod, _, rest = name.partition(".")
                if mod in attn:
                    proj, _, kind = rest.partition(".")
                    ours = f"{attn[mod]}.{names[proj]}.{kind}"
                elif mod in norms:
                    ours = f"{norms[mod]}.norm.{rest}"
                else:
                    ours = {"fc1": "ff.w_1", "fc2": "ff.w_2"}[mod] + f".{rest}"
                src[f"{side}_layers.{i}.{ours}"] = tensor
    model = make_model(cfg).eval()
    target = model.state_dict()
    missing = sorted(set(target) - set(src))
    if missing:
        raise MarianImportError(f"{hf.name_or_path}: no weights for {missing[:10]}")
    model.load_state_dict({k: src[k].detach().clone() for k in target}, strict=True)
    bad = [k for k, v in model.state_dict().items() if not torch.isfinite(v).all()]
    if bad:  # NaN logits compare as "no difference" nowhere; refuse them here
        raise MarianImportError(f"{hf.name_or_path}: weights that are not finite: {bad[:10]}")
    table = m.encoder.embed_positions.weight.detach()
    if not torch.equal(table, m.decoder.embed_positions.weight.detach()):
        raise MarianImportError("the encoder's and decoder's position tables differ")
    with torch.no_grad():
        model.positions.copy_(table)
    _check_ties(model, hf, cfg)
    return model


def _check_ties(model: Transformer, hf: Any, cfg: ModelConfig) -> None:
    """What our config ties must be one tensor in the checkpoint too."""
    m = hf.model
    pairs = [("lm_head", hf.lm_head.weight, m.decoder.embed_tokens.weight, cfg.tie_embeddings)]
    pairs.append(("embeddings", m.encoder.embed_tokens.weight, m.decoder.embed_tokens.weight,
                  bool(cfg.share_embeddings)))  # fmt: skip
    for name, a, b, tied in pairs:
        if tied and not torch.equal(a, b):
            raise MarianImportError(f"{CONFIG}: {name} should be tied but the weights differ")


class TransformersReference:
    """MarianMTModel behind the two calls the verification grid makes of a model (encode,
    decode_step), computed by transformers' own modules: the cached keys/values, in our
    layout (B, H, T, Dh), go into its cache, so each step is its own incremental decoding."""

    def __init__(self, hf: Any, cfg: ModelConfig, suppressed: list[int]) -> None:
        self.hf = hf
        self.cfg = cfg
        self.suppressed = suppressed  # -inf, as generate()'s bad_words_ids processor sets them

    def eval(self) -> TransformersReference:
        self.hf.eval()
        return self

    def empty_past(self, batch: int, device: torch.device | None = None) -> list[KV]:
        shape = (batch, self.cfg.n_heads, 0, self.cfg.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.cfg.n_decoder_layers)]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.cfg.n_heads, self.cfg.head_dim).transpose(1, 2)

    @torch.no_grad()
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        out = self.hf.model.encoder(input_ids=src, attention_mask=src_mask, output_attentions=True)
        memory = out.last_hidden_state  # (B, S, D)
        cross = [
            (self._heads(a.k_proj(memory)), self._heads(a.v_proj(memory)))
            for a in (layer.encoder_attn for layer in self.hf.model.decoder.layers)
        ]
        return EncoderOutput(memory, cross, list(out.attentions or []))

    @torch.no_grad()
    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, past: list[KV],
        self_mask: torch.Tensor, cross_kv: list[KV], src_mask: torch.Tensor,
    ) -> StepOutput:  # fmt: skip
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        p = past[0][0].shape[2]
        if not bool((positions == p).all()):
            raise ValueError("the reference decodes rows of one age at a time")
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for i, ((k, v), (ck, cv)) in enumerate(zip(past, cross_kv, strict=True)):
            if p:
                cache.self_attention_cache.update(k, v, i)
            cache.cross_attention_cache.update(ck, cv, i)
            cache.is_updated[i] = True  # the cross keys/values above are used as they are
        b, s = src_mask.shape
        # Only its shape is read (the source mask's); the cross keys/values come from the cache.
        unused = torch.zeros(b, s, self.cfg.d_model)
        out = self.hf.model.decoder(
            input_ids=tokens[:, None], attention_mask=self_mask, encoder_hidden_states=unused,
            encoder_attention_mask=src_mask, cache=cache, use_cache=True, output_attentions=True,
        )  # fmt: skip
        logits = self.hf.lm_head(out.last_hidden_state)[:, 0] + self.hf.final_logits_bias
        logits[:, self.suppressed] = -torch.inf
        layers: Any = cache.self_attention_cache.layers
        present = [(layer.keys, layer.values) for layer in layers]
        cross = [a[:, :, 0, :] for a in out.cross_attentions]
        return StepOutput(logits, present, cross)


def transformers_greedy(hf: Any, gen: dict[str, Any], pad: int) -> GreedyFn:
    """generate(num_beams=1, do_sample=False) with the checkpoint's generation settings, each
    sentence's limit as its max_length (the start token and a forced eos count in it)."""
    extra = 1 + int(gen["forced_eos"])
    eos = int(hf.config.eos_token_id)

    def run(encoded: list[list[int]], limits: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in encoded]
        for limit in sorted(set(limits)):
            idx = [i for i, n in enumerate(limits) if n == limit]
            for start in range(0, len(idx), 16):
                group = idx[start : start + 16]
                width = max(len(encoded[i]) for i in group)
                ids = torch.full((len(group), width), pad)
                mask = torch.zeros(len(group), width, dtype=torch.long)
                for row, i in enumerate(group):
                    ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[row, : len(encoded[i])] = 1
                with torch.no_grad():
                    res = hf.generate(input_ids=ids, attention_mask=mask, num_beams=1,
                                      do_sample=False, max_length=limit + extra)  # fmt: skip
                for row, i in enumerate(group):
                    tokens = res[row, 1:].tolist()
                    out[i] = tokens[: tokens.index(eos)] if eos in tokens else tokens
        return out

    return run


def tokenizer_cases(codes: list[str]) -> list[str]:
    """The edge cases whose ids must equal MarianTokenizer's."""
    code = codes[0] if codes else ">>fra<<"
    return [
        "",
        f"{code} the small cat",
        ">>zzz_unknown<< the cat",
        "unknown characters: ☃ ✓ \u0000 \ufeff 𝔘",
        "a literal </s> in the text, and <unk> and <pad>",
        "</s>",
        ("the small cat sat on the old stone " * 30)[:1000],
        "Mixed scripts: Ωμέγα 漢字 مرحبا Привет hello",
        "  spaces \t tabs\nnewlines  ",
    ]


def check_tokenizer(ours: MarianTextTokenizer, hf_tok: Any, cases: list[str]) -> dict[str, Any]:
    """Token ids of the service's tokenizer against MarianTokenizer's on every case."""
    mismatches = []
    for text in cases:
        want = [int(i) for i in hf_tok(text)["input_ids"]]
        got = ours.encode(text)
        if got != want:
            mismatches.append({"text": text[:80], "transformers": want[:40], "ours": got[:40]})
    return {
        "cases": len(cases),
        "identical": len(cases) - len(mismatches),
        "mismatches": mismatches,
    }


class _Encoder:
    """encode_batch over the service's tokenizer (the verification's SentenceEncoder)."""

    def __init__(self, tok: MarianTextTokenizer) -> None:
        self.tok = tok

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tok.encode(t) for t in texts]


def _tokenizer_spec(d: MarianDir) -> dict[str, Any]:
    specials = [_token(d, k, v) for k, v in (("eos_token", "</s>"), ("unk_token", "<unk>"),
                                             ("pad_token", "<pad>"))]  # fmt: skip
    added = d.tokenizer_config.get("added_tokens_decoder") or {}
    specials += [t["content"] for t in added.values() if t.get("special")]
    return {
        "type": "marian",
        "files": {
            "source_spm": MARIAN_FILES["source_spm"],
            "target_spm": MARIAN_FILES["target_spm"],
            "vocab": MARIAN_FILES["vocab"],
            "target_vocab": MARIAN_FILES["target_vocab"] if d.target_vocab is not None else None,
        },
        "special_tokens": sorted(set(specials)),
        "eos_token": specials[0],
        "unk_token": specials[1],
        "vocab_size": len(d.vocab),
        "source_eos": True,
    }


def _sentences(codes: list[str], limits: Limits, tok: MarianTextTokenizer) -> list[Pair]:
    """The greedy check's sentences: the built-in ones and the tokenizer's edge cases that fit
    the source limit, each with a target-language code where the model has codes."""
    texts = [*SENTENCES, *tokenizer_cases(codes)[1:]]
    if codes:
        texts = [f"{codes[i % len(codes)]} {t}" for i, t in enumerate(texts)]
    return [Pair(t, "") for t in texts if len(tok.encode(t)) <= limits.max_source_tokens]


def import_marian(
    src: Path, out: Path, int8: bool = False, force: bool = False, opset: int = OPSET
) -> dict[str, Any]:
    """Reads, validates, maps, exports, verifies and writes; see the module docstring."""
    problems = out_problems(out, force, [src])
    if problems:
        raise MarianImportError("cannot import:\n  - " + "\n  - ".join(problems))
    d = read_dir(src)
    cfg = model_config(d)
    hf, hf_tok = load_transformers(d)
    gen = generation_settings(hf, cfg)
    model = map_weights(hf, cfg)
    limits = Limits(cfg.max_positions, cfg.max_positions)  # generation max_length caps it too
    with scratch_dir(out) as work:
        for role, name in MARIAN_FILES.items():
            if role != "target_vocab" or d.target_vocab is not None:
                shutil.copyfile(src / name, work / name)
        spec = _tokenizer_spec(d)
        ours = MarianTextTokenizer(work, spec)
        tokenizer = check_tokenizer(ours, hf_tok, tokenizer_cases(ours.target_languages))
        if tokenizer["mismatches"]:
            raise MarianImportError(f"tokenizer ids differ from MarianTokenizer's: {tokenizer}")
        export_graphs(model, work, opset)
        graphs = {"fp32": dict(GRAPH_FILES["fp32"])}
        core = _marian_core(model, cfg, spec, gen, limits, opset, graphs)
        bundle = write_core(work, core)
        limits = bundle.limits
        pairs = _sentences(ours.target_languages, limits, ours)
        reference = TransformersReference(hf, cfg, gen["suppressed_ids"])
        greedy = transformers_greedy(hf, gen, cfg.pad_id)
        verification = verified(reference, bundle, _Encoder(ours), pairs, limits, work, out, greedy)
        verification["reference"] = "transformers MarianMTModel (eager attention), generate()"
        verification["tokenizer"] = tokenizer
        if int8:
            quantize_graphs(work)
            graphs["int8"] = dict(GRAPH_FILES["int8"])
        manifest = finished_manifest(core, work, verification, _record(d, int8))
        publish(work, out, manifest, force)
        return manifest


def _marian_core(
    model: Transformer, cfg: ModelConfig, spec: dict[str, Any], gen: dict[str, Any],
    limits: Limits, opset: int, graphs: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """pipeline's core manifest with the Marian tokenizer and the generation settings."""

    class Specials:  # what core_manifest reads of a tokenizer
        vocab_size = spec["vocab_size"]

        @staticmethod
        def special_ids() -> dict[str, int]:
            return {"pad": cfg.pad_id, "eos": cfg.eos_id, "decoder_start": cfg.start_id}

    core = core_manifest(model, Specials(), limits, opset, graphs)  # type: ignore[arg-type]
    return {**core, "tokenizer": spec, "generation": gen}


def _record(d: MarianDir, int8: bool) -> dict[str, Any]:
    """The export record: the weights file and the libraries, transformers included."""
    import transformers

    record = export_record(d.weights, int8)
    source = f"transformers MarianMTModel directory {d.path.name}"
    return record | {"source": source, "transformers": transformers.__version__}
