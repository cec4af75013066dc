"""Export verification: onnxruntime against PyTorch.

1. A grid of shapes — batch 1, 3, 8 × source length 1, 7 and the maximum — runs the encoder and
   several cached decoder steps in both and compares logits, encoder states, cross K/V and
   cross-attention probabilities; one more case puts rows with different past lengths into one
   batch and checks each row against that row decoded alone.
2. Greedy decoding through onnxruntime must give exactly PyTorch's greedy tokens on the whole
   test split.
The optional graphs are checked on their own: ``decoder_kv.onnx`` (rows of mixed ages over
in-place caches, then greedy tokens) and ``encoder_packed.onnx`` (sentences of mixed lengths
packed into one row, each against itself encoded alone, then greedy tokens with every batch
encoded packed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.model import Transformer
from service.bundle import graph_io

LOGIT_TOLERANCE = 1e-4


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class OrtModel:
    """The two exported graphs, with just enough decoding logic to check them."""

    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    n_layers: int
    n_heads: int
    head_dim: int
    bos_id: int
    eos_id: int

    @classmethod
    def load(
        cls, encoder: Path, decoder: Path, model_cfg: dict[str, Any], threads: int = 0
    ) -> OrtModel:
        return cls(
            session(encoder, threads),
            session(decoder, threads),
            model_cfg["n_decoder_layers"],
            model_cfg["n_heads"],
            model_cfg["d_model"] // model_cfg["n_heads"],
            model_cfg["bos_id"],
            model_cfg["eos_id"],
        )

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})

    def step(
        self,
        tokens: np.ndarray,  # (B,)
        positions: np.ndarray,  # (B,)
        self_mask: np.ndarray,  # (B, P+1)
        src_mask: np.ndarray,  # (B, S)
        past: Sequence[np.ndarray],  # 2L arrays (B, H, P, Dh)
        cross: Sequence[np.ndarray],  # 2L arrays (B, H, S, Dh)
    ) -> list[np.ndarray]:
        io = graph_io(self.n_layers)
        feeds = {
            "input_ids": tokens[:, None].astype(np.int64),
            "position_ids": positions[:, None].astype(np.int64),
            "decoder_attention_mask": self_mask.astype(np.int64),
            "encoder_attention_mask": src_mask.astype(np.int64),
        }
        for name, value in zip(io.decoder_inputs[4:], [*past, *cross], strict=True):
            feeds[name] = value
        return self.decoder.run(None, feeds)

    def greedy(self, ids: np.ndarray, mask: np.ndarray, limits: np.ndarray) -> list[list[int]]:
        """Greedy decoding of a padded batch; limits (B,) caps each row's output tokens."""
        b = ids.shape[0]
        cross = self.encode(ids, mask)[1:]
        past = [np.zeros((b, self.n_heads, 0, self.head_dim), np.float32)] * (2 * self.n_layers)

        def step(tokens: np.ndarray, t: int) -> np.ndarray:
            nonlocal past
            res = self.step(tokens, np.full(b, t), np.ones((b, t + 1), np.int64), mask, past, cross)
            past = res[1 : 1 + 2 * self.n_layers]
            return res[0]

        return self._greedy_loop(b, limits, step)

    def _greedy_loop(
        self, b: int, limits: np.ndarray, step: Callable[[np.ndarray, int], np.ndarray]
    ) -> list[list[int]]:
        """Greedy token choice over `step(tokens, t)` → logits (B, 1, V) until every row ends."""
        tokens = np.full(b, self.bos_id, np.int64)
        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        t = 0
        while not done.all():
            nxt = step(tokens, t)[:, 0, :].argmax(-1)
            for i in range(b):
                if done[i]:
                    continue
                if nxt[i] == self.eos_id or len(out[i]) >= limits[i]:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
            tokens = nxt.astype(np.int64)
            t += 1
        return out


class CachedOrtModel(OrtModel):
    """OrtModel whose greedy decoding runs decoder_kv.onnx over preallocated caches, updated in
    place through IO binding exactly as the service runs it."""

    def cached_step(
        self,
        tokens: np.ndarray,  # (B,)
        positions: np.ndarray,  # (B,): also each row's cached length
        src_mask: np.ndarray,  # (B, S)
        caches: Sequence[np.ndarray],  # 2L arrays (B, H, M, Dh), updated in place
        cross: Sequence[np.ndarray],  # 2L arrays (B, H, S, Dh)
    ) -> list[np.ndarray]:
        """→ logits (B, 1, V) and the cross attention of every layer (B, H, S)."""
        io = graph_io(self.n_layers)
        n = 2 * self.n_layers
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens[:, None], np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions[:, None], np.int64))
        binding.bind_cpu_input("encoder_attention_mask", np.ascontiguousarray(src_mask, np.int64))
        for name, c in zip(io.cached_decoder_inputs[3 : 3 + n], caches, strict=True):
            assert c.flags.c_contiguous and c.dtype == np.float32
            shape = list(c.shape)
            binding.bind_input(name, "cpu", 0, np.float32, shape, c.ctypes.data)
            out = name.replace("past_key_values", "present")
            binding.bind_output(out, "cpu", 0, np.float32, shape, c.ctypes.data)
        for name, c in zip(io.cached_decoder_inputs[3 + n :], cross, strict=True):
            binding.bind_cpu_input(name, np.ascontiguousarray(c))
        wanted = [io.decoder_outputs[0], *io.decoder_outputs[1 + n :]]
        for name in wanted:
            binding.bind_output(name, "cpu")
        self.decoder.run_with_iobinding(binding)
        outs = binding.get_outputs()[n:]  # in binding order: caches, logits, attention
        return [np.array(o.numpy()) for o in outs]  # copies: ORT may reuse that memory

    def greedy(self, ids: np.ndarray, mask: np.ndarray, limits: np.ndarray) -> list[list[int]]:
        b = ids.shape[0]
        cross = self.encode(ids, mask)[1:]
        m = int(limits.max()) + 1 if b else 1
        caches = [
            np.zeros((b, self.n_heads, m, self.head_dim), np.float32)
            for _ in range(2 * self.n_layers)
        ]
        return self._greedy_loop(
            b,
            limits,
            lambda tokens, t: self.cached_step(tokens, np.full(b, t), mask, caches, cross)[0],
        )


def pack_rows(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A padded batch (B, S) → the packed graph's inputs (1, T): the real tokens of every row
    end to end (a row with no token keeps its one masked position), each token's position in
    its row, and its row's index."""
    lengths = np.maximum(mask.sum(axis=1), 1)
    tokens = np.concatenate([ids[i, :n] for i, n in enumerate(lengths)])
    positions = np.concatenate([np.arange(n) for n in lengths])
    segments = np.repeat(np.arange(len(lengths)), lengths)
    return tokens[None], positions[None], segments[None]


def unpack_rows(
    packed: np.ndarray, positions: np.ndarray, segments: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """A packed output, per token on axis 1 ((1, T, D) or (1, H, T, Dh)), → the padded batch's
    layout ((B, S, D) or (B, H, S, Dh)), zeros where a row has no token."""
    b, s = shape
    token_axis_last = packed.ndim == 3  # (1, T, D): tokens then features
    per_token = packed[0] if token_axis_last else packed[0].transpose(1, 0, 2)  # (T, …)
    out = np.zeros((b, s, *per_token.shape[1:]), packed.dtype)
    out[segments[0], positions[0]] = per_token
    return out if token_axis_last else out.transpose(0, 2, 1, 3)


@dataclass
class PackedOrtModel(OrtModel):
    """OrtModel whose encoder is encoder_packed.onnx: every padded batch is packed, encoded and
    scattered back, as the service does for a group of newcomers."""

    packed: ort.InferenceSession | None = None

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        assert self.packed is not None
        tokens, positions, segments = pack_rows(ids, mask)
        feeds = {"input_ids": tokens, "position_ids": positions, "segment_ids": segments}
        outs = self.packed.run(None, feeds)
        return [unpack_rows(o, positions, segments, ids.shape) for o in outs]


@torch.no_grad()
def compare_packed(
    model: Transformer,
    packed: ort.InferenceSession,
    max_source: int,
    seed: int = 0,
    lengths: Sequence[int] = (5, 1, 0, 12, 3),
) -> dict[str, Any]:
    """Sentences of the given lengths (0: an empty sentence, its one masked position; the
    longest source is added) packed into one row: each one's encoder states and cross K/V must
    equal that sentence encoded alone in PyTorch."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    lengths = [min(n, max_source) for n in (*lengths, max_source)]
    rows = [torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    ids, mask = pad_batch(rows, cfg.pad_id)
    tokens, positions, segments = pack_rows(ids, mask)
    outs = packed.run(
        None, {"input_ids": tokens, "position_ids": positions, "segment_ids": segments}
    )
    memory_diff = kv_diff = 0.0
    for i, row in enumerate(rows):
        n = max(len(row), 1)
        ref = model.encode(torch.tensor(ids[i : i + 1, :n]), torch.tensor(mask[i : i + 1, :n]))
        at = segments[0] == i
        memory_diff = max(memory_diff, _max_diff(outs[0][0, at], ref.memory[0]))
        flat = [t for kv in ref.cross_kv for t in kv]
        for o, r in zip(outs[1:], flat, strict=True):
            kv_diff = max(kv_diff, _max_diff(o[0][:, at], r[0]))
    return {
        "graph": "encoder_packed",
        "source_lengths": lengths,
        "encoder_states": memory_diff,
        "cross_kv": kv_diff,
    }


@torch.no_grad()
def compare_cached_mixed_ages(
    model: Transformer,
    cached: CachedOrtModel,
    seed: int = 0,
    ages: Sequence[int] = (5, 2, 0, 9),
    steps: int = 3,
) -> dict[str, Any]:
    """Rows of different ages, each row's history at the start of its own cache row, share
    decoder_kv steps; every row's logits and cross attention must equal that row decoded alone
    in PyTorch (decode_step, the graph decoder.onnx is checked against)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    n, h, dh = cached.n_layers, cached.n_heads, cached.head_dim
    b, s, m = len(ages), 6, max(ages) + steps + 2
    ids = torch.randint(4, cfg.vocab_size, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 3:] = 0
    enc = model.encode(ids, mask)
    caches = [np.zeros((b, h, m, dh), np.float32) for _ in range(2 * n)]
    pasts = []
    for i, age in enumerate(ages):  # each row's own history, decoded alone
        past = model.empty_past(1)
        cross = [(k[i : i + 1], v[i : i + 1]) for k, v in enc.cross_kv]
        for t in range(age):
            tok = torch.randint(4, cfg.vocab_size, (1,), generator=gen)
            past = model.decode_step(
                tok, torch.tensor([t]), past, torch.ones(1, t + 1, dtype=torch.long), cross,
                mask[i : i + 1],
            ).present  # fmt: skip
        for j, tensor in enumerate(x for kv in past for x in kv):
            caches[j][i, :, :age] = tensor[0].numpy()
        pasts.append(past)
    logit_diff = attn_diff = 0.0
    positions = np.array(ages)
    for _ in range(steps):
        tokens = torch.randint(4, cfg.vocab_size, (b,), generator=gen)
        cross_np = [t.numpy() for kv in enc.cross_kv for t in kv]
        got = cached.cached_step(tokens.numpy(), positions, mask.numpy(), caches, cross_np)
        for i in range(b):
            p = int(positions[i])
            ref = model.decode_step(
                tokens[i : i + 1], torch.tensor([p]), pasts[i],
                torch.ones(1, p + 1, dtype=torch.long),
                [(k[i : i + 1], v[i : i + 1]) for k, v in enc.cross_kv], mask[i : i + 1],
            )  # fmt: skip
            pasts[i] = ref.present
            logit_diff = max(logit_diff, _max_diff(got[0][i, 0], ref.logits[0]))
            for o, r in zip(got[1:], ref.cross_attentions, strict=True):
                attn_diff = max(attn_diff, _max_diff(o[i], r[0]))
        positions = positions + 1
    return {
        "graph": "decoder_kv",
        "past_lengths": list(ages),
        "steps": steps,
        "logits": logit_diff,
        "cross_attention": attn_diff,
    }


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.numpy()).max()) if a.size else 0.0


@torch.no_grad()
def compare_grid(
    model: Transformer,
    ort_model: OrtModel,
    max_source: int,
    batches: Sequence[int] = (1, 3, 8),
    steps: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """ORT vs PyTorch on a grid of shapes; returns the max differences per case."""
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
            o_enc = ort_model.encode(ids.numpy(), mask.numpy())
            diffs = {
                "encoder_states": _max_diff(o_enc[0], enc.memory),
                "cross_kv": max(
                    _max_diff(o, t)
                    for o, t in zip(o_enc[1:], [t for kv in enc.cross_kv for t in kv], strict=True)
                ),
            }
            past_t = model.empty_past(b)
            past_o: list[np.ndarray] = [p.numpy() for kv in past_t for p in kv]
            cross_o = o_enc[1:]
            tokens = torch.full((b,), cfg.bos_id, dtype=torch.long)
            logit_diff = attn_diff = 0.0
            for t in range(steps):
                pos = torch.full((b,), t, dtype=torch.long)
                smask = torch.ones(b, t + 1, dtype=torch.long)
                ref = model.decode_step(tokens, pos, past_t, smask, enc.cross_kv, mask)
                got = ort_model.step(
                    tokens.numpy(), pos.numpy(), smask.numpy(), mask.numpy(), past_o, cross_o
                )
                logit_diff = max(logit_diff, _max_diff(got[0][:, 0], ref.logits))
                n = ort_model.n_layers
                for o, r in zip(got[1 + 2 * n :], ref.cross_attentions, strict=True):
                    attn_diff = max(attn_diff, _max_diff(o, r))
                past_t, past_o = ref.present, got[1 : 1 + 2 * n]  # each side feeds its own cache
                tokens = torch.randint(4, cfg.vocab_size, (b,), generator=gen)
            diffs |= {"logits": logit_diff, "cross_attention": attn_diff}
            worst = max(worst, logit_diff)
            cases.append({"batch": b, "source_length": s, "steps": steps, **diffs})
    mixed = compare_mixed_ages(model, ort_model, gen)
    worst = max(worst, mixed["logits"])
    cases.append(mixed)
    return {"cases": cases, "max_abs_logit_diff": worst}


@torch.no_grad()
def compare_mixed_ages(
    model: Transformer, ort_model: OrtModel, gen: torch.Generator, ages: Sequence[int] = (5, 2, 0)
) -> dict[str, Any]:
    """Rows with past lengths `ages` share one ORT step, their caches left-padded and masked;
    each row's logits must equal that row decoded alone in PyTorch."""
    cfg = model.cfg
    p_max = max(ages)
    n = ort_model.n_layers
    rows_past: list[list[np.ndarray]] = []
    rows_cross: list[list[np.ndarray]] = []
    masks, srcs, toks, refs = [], [], [], []
    s = 6
    for age in ages:
        ids = torch.randint(4, cfg.vocab_size, (1, s), generator=gen)
        mask = torch.ones(1, s, dtype=torch.long)
        enc = model.encode(ids, mask)
        past = model.empty_past(1)
        history = torch.randint(4, cfg.vocab_size, (age + 1,), generator=gen)
        history[0] = cfg.bos_id
        for t in range(age):  # build the row's own cache alone
            res = model.decode_step(
                history[t : t + 1],
                torch.tensor([t]),
                past,
                torch.ones(1, t + 1, dtype=torch.long),
                enc.cross_kv,
                mask,
            )
            past = res.present
        ref = model.decode_step(
            history[age : age + 1],
            torch.tensor([age]),
            past,
            torch.ones(1, age + 1, dtype=torch.long),
            enc.cross_kv,
            mask,
        )
        refs.append(ref.logits[0])
        pad = p_max - age
        rows_past.append(
            [np.pad(t.numpy(), ((0, 0), (0, 0), (pad, 0), (0, 0))) for kv in past for t in kv]
        )
        rows_cross.append([t.numpy() for kv in enc.cross_kv for t in kv])
        masks.append([0] * pad + [1] * (age + 1))
        srcs.append(mask.numpy()[0])
        toks.append(int(history[age]))
    got = ort_model.step(
        np.array(toks),
        np.array(list(ages)),
        np.array(masks),
        np.stack(srcs),
        [np.concatenate([r[j] for r in rows_past]) for j in range(2 * n)],
        [np.concatenate([r[j] for r in rows_cross]) for j in range(2 * n)],
    )
    diff = max(_max_diff(got[0][i, 0], refs[i]) for i in range(len(ages)))
    return {"batch": len(ages), "past_lengths": list(ages), "logits": diff}


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(1, max((len(r) for r in rows), default=1))
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : max(len(r), 1)] = 1
    return ids, mask


def ort_translate_ids(
    ort_model: OrtModel,
    encoded: Sequence[Sequence[int]],
    limits: Sequence[int],
    pad_id: int,
    batch_size: int = 64,
    by_length: bool = True,
) -> list[list[int]]:
    """Greedy tokens of every sentence, in batches of sentences of similar length (by_length)
    or in the given order (mixed lengths in each batch)."""
    order = list(range(len(encoded)))
    if by_length:
        order.sort(key=lambda i: len(encoded[i]))
    out: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([encoded[i] for i in idx], pad_id)
        res = ort_model.greedy(ids, mask, np.array([limits[i] for i in idx]))
        for i, r in zip(idx, res, strict=True):
            out[i] = r
    return out
