"""The Transformer encoder-decoder, written from its parts.

Imports only torch. Every attention returns ``(output, probabilities)`` so the weights can travel
up to the exported graphs' outputs; nothing is stashed on modules. ``Transformer.encode`` and
``Transformer.decode_step`` map one-to-one onto ``encoder.onnx`` and ``decoder.onnx``;
``Transformer.forward`` is the teacher-forced training path over whole target sequences and is
numerically the same computation as running ``decode_step`` token by token.

    >>> cfg = ModelConfig(vocab_size=1000)
    >>> model = make_model(cfg)

Shapes use B = batch, S = source length, T = target length, P = past (cached) length,
H = heads, Dh = head size, D = d_model, V = vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Added to the scores of masked keys. Large enough that exp() underflows to exactly 0 in fp32,
# finite so that a row whose keys are all masked (a padding query) gives a uniform row, never NaN.
MASK_VALUE = -1e9

KV = tuple[Tensor, Tensor]  # (keys, values), each (B, H, T, Dh)

# The feed-forward activations by ModelConfig.activation name. "swish" is SiLU (x·sigmoid(x));
# "gelu" the exact (erf) GELU; "gelu_tanh" its tanh approximation.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
}
POSITION_LAYOUTS = ("interleaved", "halves")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters; saved with every checkpoint and bundle, and enough to rebuild the model."""

    vocab_size: int
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    dropout: float = 0.1
    max_positions: int = 256
    norm: Literal["post", "pre"] = "post"
    tie_embeddings: bool = True
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    # The sinusoidal table's layout: sin/cos interleaved per dimension pair, or all sines then
    # all cosines (Marian). Same frequencies either way.
    positions: Literal["interleaved", "halves"] = "interleaved"
    scale_embedding: bool = True  # embeddings × sqrt(d_model) before the positions are added
    final_logits_bias: bool = False  # a learned (1, V) bias added to the output logits
    activation: Literal["relu", "swish", "gelu", "gelu_tanh"] = "relu"  # feed-forward
    layer_norm_eps: float = 1e-5
    tgt_vocab_size: int = 0  # the decoder's own vocabulary size; 0: vocab_size (one vocabulary)
    # Source and target embeddings are one matrix; None: as tie_embeddings (which, when the
    # vocabulary is shared, ties all three matrices).
    share_embeddings: bool | None = None
    decoder_start_id: int | None = None  # the first decoder input; None: bos_id

    def __post_init__(self) -> None:
        # None means "as before these fields existed"; resolved here so that to_dict records
        # the value in use.
        if self.share_embeddings is None:
            object.__setattr__(self, "share_embeddings", self.tie_embeddings)
        if self.decoder_start_id is None:
            object.__setattr__(self, "decoder_start_id", self.bos_id)
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.norm not in ("post", "pre"):
            problems.append(f"norm must be 'post' or 'pre', not {self.norm!r}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), not {self.dropout}")
        problems += self._new_field_problems()
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def _new_field_problems(self) -> list[str]:
        problems = []
        if self.positions not in POSITION_LAYOUTS:
            problems.append(f"positions must be one of {POSITION_LAYOUTS}, not {self.positions!r}")
        if self.activation not in ACTIVATIONS:
            problems.append(
                f"activation must be one of {sorted(ACTIVATIONS)}, not {self.activation!r}"
            )
        if not self.layer_norm_eps > 0:
            problems.append("layer_norm_eps must be positive")
        if self.tgt_vocab_size < 0:
            problems.append("tgt_vocab_size must be ≥ 0 (0: the source vocabulary)")
        if self.share_embeddings and self.target_vocab != self.vocab_size:
            problems.append("share_embeddings needs tgt_vocab_size 0 or equal to vocab_size")
        last = self.target_vocab - 1
        for name in ("pad_id", "eos_id", "decoder_start_id"):
            if not 0 <= int(getattr(self, name)) <= last:
                problems.append(f"{name} must be a target vocabulary id (0..{last})")
        return problems

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def target_vocab(self) -> int:
        """The decoder's vocabulary size (its embedding rows and the logits' width)."""
        return self.tgt_vocab_size or self.vocab_size

    @property
    def start_id(self) -> int:
        """The first decoder input of every row."""
        return int(self.decoder_start_id if self.decoder_start_id is not None else self.bos_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """softmax(Q Kᵀ / sqrt(d_k) + bias) V, returning the output and the probabilities.

    q (B, H, Tq, Dh), k and v (B, H, Tk, Dh); bias broadcastable to (B, H, Tq, Tk), holding 0
    for keys that may be attended and MASK_VALUE for masked ones. scale defaults to 1/sqrt(Dh);
    modules pass it as a Python number so that tracing for export sees a constant.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    return torch.matmul(probs, v), probs  # (B, H, Tq, Dh), (B, H, Tq, Tk)


def padding_bias(mask: Tensor) -> Tensor:
    """A key mask (B, Tk), 1 = real token, 0 = padding → additive bias (B, 1, 1, Tk)."""
    keep = mask.to(torch.float32)
    return ((1.0 - keep) * MASK_VALUE)[:, None, None, :]


def segment_bias(segments: Tensor) -> Tensor:
    """Sentence ids (B, T) of packed tokens → additive bias (B, 1, T, T) letting a token attend
    only to the tokens of its own sentence."""
    other = segments[:, :, None] != segments[:, None, :]  # (B, T, T)
    return (other.to(torch.float32) * MASK_VALUE)[:, None]


def causal_bias(length: int, device: torch.device | None = None) -> Tensor:
    """(1, 1, T, T) bias letting position t attend to positions ≤ t only."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    bias = torch.zeros(length, length, device=device).masked_fill(~allowed, MASK_VALUE)
    return bias[None, None]


def sinusoidal_positions(max_positions: int, d_model: int, layout: str = "interleaved") -> Tensor:
    """(max_positions, D), wavelengths up to 10000·2π: "interleaved" puts sin on even dimensions
    and cos on odd ones; "halves" puts all sines first, then all cosines."""
    position = torch.arange(max_positions, dtype=torch.float32)[:, None]  # (L, 1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )  # (D/2,)
    table = torch.zeros(max_positions, d_model)
    sin, cos = torch.sin(position * inv_freq), torch.cos(position * inv_freq[: d_model // 2])
    if layout == "halves":
        half = (d_model + 1) // 2
        table[:, :half], table[:, half:] = sin, cos
    else:
        table[:, 0::2], table[:, 1::2] = sin, cos
    return table


class MultiHeadAttention(nn.Module):
    """Per-head projections W_q, W_k, W_v computed as one matrix each, heads in parallel, W_o."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, x: Tensor) -> KV:
        """Keys and values of x (B, T, D), each (B, H, T, Dh): cached, or computed once."""
        return self.split_heads(self.w_k(x)), self.split_heads(self.w_v(x))

    def attend(self, x: Tensor, kv: KV, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """Queries from x (B, Tq, D) against given K/V → (B, Tq, D), probs (B, H, Tq, Tk)."""
        q = self.split_heads(self.w_q(x))  # (B, H, Tq, Dh)
        out, probs = scaled_dot_product_attention(q, kv[0], kv[1], bias, self.scale)
        b, _, tq, _ = out.shape
        out = out.transpose(1, 2).reshape(b, tq, self.n_heads * self.head_dim)  # (B, Tq, D)
        return self.dropout(self.w_o(out)), probs

    def forward(self, query: Tensor, memory: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.attend(query, self.project_kv(memory), bias)


class CachedSelfAttention(torch.autograd.Function):
    """One new token per row attending over a preallocated cache that it also writes into.

    q, k, v (B, 1, D); past_k, past_v (B, H, M, Dh) hold each row's earlier keys/values at
    positions 0..seqlens[b]-1 (M ≥ every row's length + 1; what lies beyond is ignored);
    seqlens (B,) int32 is each row's cached length. The new key/value goes to position
    seqlens[b] of its row and the query attends to positions 0..seqlens[b]. Returns the output
    (B, 1, D) and the updated caches.

    Exported as onnxruntime's ``com.microsoft.GroupQueryAttention`` (as many key/value heads as
    query heads): bound to the same buffer as input and output, the cache is updated in place,
    so a decoder step no longer copies every row's history, and rows of any mix of ages share a
    step without padding. The eager code below is the reference semantics.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        seqlens: Tensor,
        total: Tensor,
        n_heads: int,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, _, d = q.shape
        dh = d // n_heads

        def heads(x: Tensor) -> Tensor:
            return x.reshape(b, 1, n_heads, dh).transpose(1, 2)  # (B, H, 1, Dh)

        rows = torch.arange(b, device=q.device)
        pos = seqlens.long()
        present_k, present_v = past_k.clone(), past_v.clone()
        present_k[rows, :, pos] = heads(k)[:, :, 0]
        present_v[rows, :, pos] = heads(v)[:, :, 0]
        keep = torch.arange(past_k.shape[2], device=q.device)[None] <= pos[:, None]  # (B, M)
        out, _ = scaled_dot_product_attention(
            heads(q), present_k, present_v, padding_bias(keep), scale
        )
        return out.transpose(1, 2).reshape(b, 1, d), present_k, present_v

    @staticmethod
    def symbolic(g: Any, q, k, v, past_k, past_v, seqlens, total, n_heads, scale):
        outs = g.op(
            "com.microsoft::GroupQueryAttention",
            q, k, v, past_k, past_v, seqlens, total,
            num_heads_i=n_heads, kv_num_heads_i=n_heads, scale_f=scale, outputs=3,
        )  # fmt: skip
        for out, like in zip(outs, (q, past_k, past_v), strict=True):
            out.setType(like.type())  # ONNX has no shape inference for contrib operators
        return outs


class FeedForward(nn.Module):
    """Two linear maps with an activation (ModelConfig.activation) between, the inner wider."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w_2(self.activation(self.w_1(x))))


class SubLayer(nn.Module):
    """Residual connection + LayerNorm around a sub-layer, post-norm (paper) or pre-norm."""

    def __init__(self, d_model: int, dropout: float, norm: str, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.pre = norm == "pre"

    def input(self, x: Tensor) -> Tensor:
        """What the sub-layer sees."""
        return self.norm(x) if self.pre else x

    def output(self, x: Tensor, y: Tensor) -> Tensor:
        """Combine the residual stream x with the sub-layer's result y."""
        out = x + self.dropout(y)
        return out if self.pre else self.norm(out)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.sub_attn = SubLayer(cfg.d_model, cfg.dropout, cfg.norm, cfg.layer_norm_eps)
        self.sub_ff = SubLayer(cfg.d_model, cfg.dropout, cfg.norm, cfg.layer_norm_eps)

    def forward(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        h = self.sub_attn.input(x)
        y, probs = self.self_attn(h, h, bias)  # (B, S, D), (B, H, S, S)
        x = self.sub_attn.output(x, y)
        x = self.sub_ff.output(x, self.ff(self.sub_ff.input(x)))
        return x, probs


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.sub_self = SubLayer(cfg.d_model, cfg.dropout, cfg.norm, cfg.layer_norm_eps)
        self.sub_cross = SubLayer(cfg.d_model, cfg.dropout, cfg.norm, cfg.layer_norm_eps)
        self.sub_ff = SubLayer(cfg.d_model, cfg.dropout, cfg.norm, cfg.layer_norm_eps)

    def forward(
        self,
        x: Tensor,
        self_bias: Tensor,
        cross_kv: KV,
        cross_bias: Tensor,
        past: KV | None = None,
    ) -> tuple[Tensor, KV, Tensor, Tensor]:
        """x (B, T, D) → x, present self K/V (B, H, P+T, Dh), self probs, cross probs (B, H, T, S).

        With ``past`` the new keys/values are appended to the cached ones, so a single step
        (T = 1) attends to everything before it; ``self_bias`` covers the P+T keys.
        """
        h = self.sub_self.input(x)
        k, v = self.self_attn.project_kv(h)  # (B, H, T, Dh)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, P+T, Dh)
            v = torch.cat([past[1], v], dim=2)
        y, self_probs = self.self_attn.attend(h, (k, v), self_bias)
        x = self.sub_self.output(x, y)
        y, cross_probs = self.cross_attn.attend(self.sub_cross.input(x), cross_kv, cross_bias)
        x = self.sub_cross.output(x, y)
        x = self.sub_ff.output(x, self.ff(self.sub_ff.input(x)))
        return x, (k, v), self_probs, cross_probs

    def step_cached(
        self, x: Tensor, cache: KV, seqlens: Tensor, total: Tensor, cross_kv: KV, cross_bias: Tensor
    ) -> tuple[Tensor, KV, Tensor]:
        """One step (x (B, 1, D)) over a preallocated per-row cache (CachedSelfAttention) →
        x, the updated cache, cross probs (B, H, 1, S). Same computation as forward with past."""
        attn = self.self_attn
        h = self.sub_self.input(x)
        y, k, v = CachedSelfAttention.apply(
            attn.w_q(h), attn.w_k(h), attn.w_v(h), cache[0], cache[1], seqlens, total,
            attn.n_heads, attn.scale,
        )  # fmt: skip
        x = self.sub_self.output(x, attn.dropout(attn.w_o(y)))
        y, cross_probs = self.cross_attn.attend(self.sub_cross.input(x), cross_kv, cross_bias)
        x = self.sub_cross.output(x, y)
        x = self.sub_ff.output(x, self.ff(self.sub_ff.input(x)))
        return x, (k, v), cross_probs


@dataclass
class EncoderOutput:
    memory: Tensor  # (B, S, D)
    cross_kv: list[KV]  # per decoder layer, each (B, H, S, Dh)
    self_attentions: list[Tensor]  # per encoder layer, (B, H, S, S)


@dataclass
class StepOutput:
    logits: Tensor  # (B, V)
    present: list[KV]  # per decoder layer, (B, H, P+1, Dh)
    cross_attentions: list[Tensor]  # per decoder layer, (B, H, S)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.tgt_embed = (
            self.src_embed
            if cfg.share_embeddings
            else nn.Embedding(cfg.target_vocab, cfg.d_model, padding_idx=cfg.pad_id)
        )
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.positions: Tensor
        self.register_buffer(
            "positions",
            sinusoidal_positions(cfg.max_positions, cfg.d_model, cfg.positions),
            persistent=False,
        )
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers: nn.ModuleList = nn.ModuleList(
            DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers)
        )
        # Pre-norm stacks end un-normalised; a final LayerNorm puts outputs back on scale.
        self.encoder_norm: nn.Module = (
            nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        )
        self.decoder_norm: nn.Module = (
            nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        )
        self.generator = nn.Linear(cfg.d_model, cfg.target_vocab, bias=False)
        if cfg.tie_embeddings:
            self.generator.weight = self.tgt_embed.weight
        self.logits_bias: Tensor | None
        self.register_buffer(
            "logits_bias", torch.zeros(1, cfg.target_vocab) if cfg.final_logits_bias else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        if self.cfg.tie_embeddings:
            # Tied weights serve as output projection too: keep logits at unit scale.
            nn.init.normal_(self.tgt_embed.weight, std=self.cfg.d_model**-0.5)
        with torch.no_grad():
            self.src_embed.weight[self.cfg.pad_id].zero_()
            self.tgt_embed.weight[self.cfg.pad_id].zero_()

    def embed(self, embedding: nn.Embedding, ids: Tensor, positions: Tensor) -> Tensor:
        """ids (B, T), positions (B, T) → (B, T, D): scaled embedding + sinusoidal position."""
        x = embedding(ids) * self.embed_scale + self.positions[positions]
        return self.embed_dropout(x)

    def project(self, x: Tensor) -> Tensor:
        """The decoder stack's output (B, T, D) → logits (B, T, V)."""
        logits = self.generator(self.decoder_norm(x))
        return logits if self.logits_bias is None else logits + self.logits_bias

    def encode(self, src: Tensor, src_mask: Tensor) -> EncoderOutput:
        """src (B, S) ids, src_mask (B, S) 1/0 → memory and every decoder layer's cross K/V."""
        positions = torch.arange(src.size(1), device=src.device)[None].expand_as(src)  # (B, S)
        return self._encode(src, positions, padding_bias(src_mask))

    def encode_packed(self, src: Tensor, positions: Tensor, segments: Tensor) -> EncoderOutput:
        """Several sentences packed end to end in each row, no padding: src (B, T) ids,
        positions (B, T) each token's position in its own sentence, segments (B, T) which
        sentence it belongs to. Tokens attend within their sentence only, so every sentence's
        slice of the outputs is what ``encode`` gives for it alone."""
        return self._encode(src, positions, segment_bias(segments))

    def _encode(self, src: Tensor, positions: Tensor, bias: Tensor) -> EncoderOutput:
        x = self.embed(self.src_embed, src, positions)  # (B, S, D)
        attns = []
        for layer in self.encoder_layers:
            x, probs = layer(x, bias)
            attns.append(probs)
        memory = self.encoder_norm(x)  # (B, S, D)
        cross_kv = [
            cast(DecoderLayer, d).cross_attn.project_kv(memory) for d in self.decoder_layers
        ]
        return EncoderOutput(memory, cross_kv, attns)

    def decode_step(
        self,
        tokens: Tensor,
        positions: Tensor,
        past: list[KV],
        self_mask: Tensor,
        cross_kv: list[KV],
        src_mask: Tensor,
    ) -> StepOutput:
        """One decoding step for a batch of rows of possibly different ages.

        tokens (B,) the last token of each row; positions (B,) its position in its row;
        past per layer (B, H, P, Dh); self_mask (B, P+1) over the past slots plus the new one
        (rows younger than P have their unused slots masked); cross_kv per layer (B, H, S, Dh);
        src_mask (B, S).
        """
        x = self.embed(self.tgt_embed, tokens[:, None], positions[:, None])  # (B, 1, D)
        self_bias = padding_bias(self_mask)  # (B, 1, 1, P+1)
        cross_bias = padding_bias(src_mask)  # (B, 1, 1, S)
        present, cross = [], []
        for layer, layer_past, kv in zip(self.decoder_layers, past, cross_kv, strict=True):
            x, new_kv, _, cross_probs = layer(x, self_bias, kv, cross_bias, layer_past)
            present.append(new_kv)
            cross.append(cross_probs[:, :, 0, :])  # (B, H, S)
        logits = self.project(x)[:, 0, :]  # (B, V)
        return StepOutput(logits, present, cross)

    def decode_step_cached(
        self, tokens: Tensor, positions: Tensor, cache: list[KV], cross_kv: list[KV],
        src_mask: Tensor,
    ) -> StepOutput:  # fmt: skip
        """decode_step over preallocated per-row caches (B, H, M, Dh) per layer: row b's
        earlier keys/values sit at positions 0..positions[b]-1 and its new ones are written at
        positions[b] (see CachedSelfAttention). ``present`` holds the updated caches."""
        x = self.embed(self.tgt_embed, tokens[:, None], positions[:, None])  # (B, 1, D)
        seqlens = positions.to(torch.int32)
        total = (seqlens.max() + 1).to(torch.int32)
        cross_bias = padding_bias(src_mask)
        present, cross = [], []
        for layer, layer_cache, kv in zip(self.decoder_layers, cache, cross_kv, strict=True):
            x, new_kv, cross_probs = cast(DecoderLayer, layer).step_cached(
                x, layer_cache, seqlens, total, kv, cross_bias
            )
            present.append(new_kv)
            cross.append(cross_probs[:, :, 0, :])
        logits = self.project(x)[:, 0, :]
        return StepOutput(logits, present, cross)

    def decode(
        self, tgt_in: Tensor, tgt_mask: Tensor, enc: EncoderOutput, src_mask: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """Teacher-forced decoding of whole sequences: tgt_in (B, T) → logits (B, T, V) and every
        layer's cross-attention probabilities (B, H, T, S)."""
        t = tgt_in.size(1)
        positions = torch.arange(t, device=tgt_in.device)[None].expand_as(tgt_in)  # (B, T)
        x = self.embed(self.tgt_embed, tgt_in, positions)  # (B, T, D)
        self_bias = causal_bias(t, tgt_in.device) + padding_bias(tgt_mask)  # (B, 1, T, T)
        cross_bias = padding_bias(src_mask)  # (B, 1, 1, S)
        cross = []
        for layer, kv in zip(self.decoder_layers, enc.cross_kv, strict=True):
            x, _, _, cross_probs = layer(x, self_bias, kv, cross_bias)
            cross.append(cross_probs)
        return self.project(x), cross

    def forward(
        self, src: Tensor, src_mask: Tensor, tgt_in: Tensor, tgt_mask: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        return self.decode(tgt_in, tgt_mask, self.encode(src, src_mask), src_mask)

    def empty_past(self, batch: int, device: torch.device | None = None) -> list[KV]:
        shape = (batch, self.cfg.n_heads, 0, self.cfg.head_dim)
        return [
            (torch.zeros(shape, device=device), torch.zeros(shape, device=device))
            for _ in self.decoder_layers
        ]


def make_model(cfg: ModelConfig) -> Transformer:
    """The one factory: builds a freshly initialised model from its config."""
    return Transformer(cfg)


@torch.no_grad()
def greedy_decode(
    model: Transformer,
    src: Tensor,
    src_mask: Tensor,
    max_len: int | Tensor,
    return_attention: bool = False,
) -> tuple[list[list[int]], list[Tensor] | None]:
    """Batched greedy decoding with the KV cache: the PyTorch reference for the exported graphs.

    max_len is one limit for all rows or a (B,) tensor of per-row limits (generated tokens,
    EOS excluded). Returns per row the generated ids without BOS/EOS and, if asked, the cross
    attention of every layer stacked as (L, H, T_row, S) per row.
    """
    cfg = model.cfg
    b = src.size(0)
    device = src.device
    limits = (
        max_len.to(device)
        if isinstance(max_len, Tensor)
        else torch.full((b,), int(max_len), device=device)
    )
    enc = model.encode(src, src_mask)
    tokens = torch.full((b,), cfg.start_id, dtype=torch.long, device=device)
    past = model.empty_past(b, device)
    self_mask = torch.ones(b, 1, dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    attn: list[list[Tensor]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    step = 0
    while not bool(done.all()):
        positions = torch.full((b,), step, dtype=torch.long, device=device)
        res = model.decode_step(tokens, positions, past, self_mask, enc.cross_kv, src_mask)
        nxt = res.logits.argmax(-1)  # (B,)
        for i in range(b):
            if done[i]:
                continue
            if int(nxt[i]) == cfg.eos_id or len(out[i]) >= int(limits[i]):
                done[i] = True
                continue
            out[i].append(int(nxt[i]))
            if return_attention:
                attn[i].append(torch.stack([a[i] for a in res.cross_attentions]))  # (L, H, S)
        tokens = nxt
        past = res.present
        self_mask = torch.cat([self_mask, torch.ones(b, 1, dtype=torch.long, device=device)], 1)
        step += 1
        if step >= cfg.max_positions:
            break
    if not return_attention:
        return out, None
    s_len = src.size(1)
    shape = (len(model.decoder_layers), cfg.n_heads, 0, s_len)
    return out, [
        torch.stack(a, dim=2) if a else torch.zeros(shape, device=device) for a in attn
    ]  # per row (L, H, T_row, S): one row per output token, EOS excluded
