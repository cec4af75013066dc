"""Batched greedy decoding: the batch state as its own typed object, and one step at a time.

``Engine.start(jobs)`` encodes new sentences into a ``DecodeBatch``; ``Engine.admit(batch,
jobs)`` lets them join a batch that is already decoding (masks keep rows of different ages
apart in one decoder call); ``Engine.step(batch)`` generates one token per row and returns the
rows that finished, which leave the batch at once. The self-attention cache has one class per
layout, picked from the runtime's decoder graph: ``ConcatBatch`` (decoder.onnx: columns the
rows share, left-padded) and ``InPlaceBatch`` (decoder_kv.onnx: buffers written in place).

A finished (or dropped) row leaves a free *slot* behind instead of being cut out of the arrays
at once: cutting copies the whole KV cache, and under a steady stream of requests that copy
cost as much as the decoder step itself. Newcomers take free slots first (only their own row of
the caches is written); the arrays are compacted when a quarter of the slots are free, and the
leading cache columns that no row uses any more are cut off when they are a quarter of the
cache (each step's cost grows with the cache length: +30% from 17 to 50 columns). A
free slot's row is computed and ignored; masks keep every row's result exactly what it would
be decoded alone. Nothing here knows about gRPC or protobuf.

Encoding: with the packed encoder (``Runtime.packing``) a group of newcomers of mixed lengths is
encoded as one row of its real tokens end to end, then scattered into the padded layout the
decoder takes. Each encoder run picks the cheaper layout by its cost in token-layers: padded
B·S·(1 + S/6D) against packed T·(1 + T/6D), T the real tokens (the second term is attention,
quadratic in the row length, against the projections' and feed-forward's 12·D² per token). A
running batch admits a few sentences at a time, whose padding to the longest used to double
the encoder's work; offline batches of similar lengths stay padded.
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import ClassVar, TypeVar

import numpy as np

from service.bundle import Limits
from service.cacheops import HOST, Cache, CacheOps
from service.runtime import InPlaceStep, Runtime


class AttentionMode(enum.IntEnum):
    NONE = 0
    LAYER_AVERAGE = 1
    LAYER_HEADS = 2
    ALL_LAYERS = 3


@dataclass(frozen=True)
class DecodeOptions:
    max_output_tokens: int = 0  # 0: the bundle's limits only
    attention: AttentionMode = AttentionMode.NONE
    attention_layer: int = -1  # resolved to 0..L-1 by the caller
    scores: bool = False
    alignment: bool = False


@dataclass
class SentenceJob:
    """One sentence to decode, and where its result goes."""

    source_ids: list[int]
    limit: int  # output tokens at most
    options: DecodeOptions = field(default_factory=DecodeOptions)
    deadline: float | None = None  # time.monotonic() seconds
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    request_id: str = ""  # the call's, for log lines

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class SentenceResult:
    token_ids: list[int]
    finish_reason: str  # "eos", "length" or "empty"
    token_log_probs: list[float] | None = None
    sequence_log_prob: float | None = None
    attention: np.ndarray | None = None  # per AttentionMode, (…, T, S)
    alignment: list[int] | None = None  # per target token, argmax source position


@dataclass
class Row:
    """The growing output of one sentence."""

    job: SentenceJob
    source_len: int
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    # Per step, only what the request asked for: (S_row,) for a layer average, (H, S_row) for
    # one layer's heads, (L, H, S_row) for all layers; and the alignment's source position.
    attn: list[np.ndarray] = field(default_factory=list)
    align: list[int] = field(default_factory=list)
    eos_log_prob: float = 0.0

    def record_attention(self, cross_attn: list[np.ndarray], i: int) -> None:
        """Keeps this step's cross-attention (L × (B, H, S)) of row i, as far as asked."""
        o, s = self.job.options, self.source_len
        if o.attention == AttentionMode.ALL_LAYERS:
            self.attn.append(np.stack([a[i, :, :s] for a in cross_attn]))  # (L, H, S)
        elif o.attention == AttentionMode.LAYER_HEADS:
            self.attn.append(cross_attn[o.attention_layer][i, :, :s].copy())  # (H, S)
        elif o.attention == AttentionMode.LAYER_AVERAGE:
            self.attn.append(cross_attn[o.attention_layer][i, :, :s].mean(axis=0))  # (S,)
        if o.alignment:  # the last layer's head average, its most attended source position
            self.align.append(int(cross_attn[-1][i, :, :s].mean(axis=0).argmax()))

    def take(
        self, token: int, logits: np.ndarray, cross_attn: list[np.ndarray], i: int, eos: int
    ) -> str | None:
        """Adds this step's token (the step's row i; logits (B, V)): why the row finished, if
        it did. What a row did not ask for (scores, attention, alignment) costs nothing."""
        o = self.job.options
        lp = _log_prob(logits[i], token) if o.scores else 0.0
        if token == eos:
            self.eos_log_prob = lp
            return "eos"
        self.tokens.append(token)
        if o.scores:
            self.log_probs.append(lp)
        if o.attention or o.alignment:
            self.record_attention(cross_attn, i)
        return "length" if len(self.tokens) >= self.job.limit else None


_B = TypeVar("_B", bound="DecodeBatch")


@dataclass
class DecodeBatch(ABC):
    """Decoder state of B slots and S source positions; the subclass lays out the cache.

    rows[i] is None where slot i is free: its arrays hold stale, masked data until a newcomer
    takes the slot or the batch is compacted. The caches are copied by `ops` (the runtime's
    ``CacheOps``: on the device where they live there), the small host arrays with numpy."""

    rows: list[Row | None]
    tokens: np.ndarray  # (B,) the last token of each row
    positions: np.ndarray  # (B,) its position in its row
    src_mask: np.ndarray  # (B, S)
    past: list[Cache]  # 2L self-attention caches, as the layout keeps them
    cross: list[Cache]  # 2L × (B, H, S, Dh); on the device with IO binding
    ops: CacheOps = field(kw_only=True)
    inplace: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def fresh(
        cls, rt: Runtime, rows: list[Row | None], src_mask: np.ndarray, cross: list[Cache]
    ) -> DecodeBatch:
        """Rows just encoded, before their first step."""

    @staticmethod
    def _first_step(rt: Runtime, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The tokens (BOS) and positions of n rows' first step."""
        return np.full(n, rt.bos_id, np.int64), np.zeros(n, np.int64)

    @property
    def past_len(self) -> int:
        """Cached self-attention columns the slots share (none where each row has its own)."""
        return 0

    @abstractmethod
    def decode(self, rt: Runtime) -> tuple[np.ndarray, list[np.ndarray], DecodeBatch]:
        """One decoder step → logits (B, V), cross attention L × (B, H, S), and the batch
        holding the step's caches (its tokens and positions still this step's)."""

    @abstractmethod
    def reserve(self, rows: int, length: int) -> None:
        """Room for `rows` rows of `length` positions, where the layout preallocates it."""

    def _unused_columns(self, live: list[int]) -> int:
        """Leading cache columns that no live row uses, where the slots share columns."""
        return 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def source_len(self) -> int:
        return int(self.src_mask.shape[1])

    @property
    def live(self) -> list[int]:
        """Indices of the slots that hold a row."""
        return [i for i, r in enumerate(self.rows) if r is not None]

    @property
    def free(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def live_rows(self) -> list[Row]:
        return [r for r in self.rows if r is not None]

    @property
    def padding_waste(self) -> float:
        """Share of the (slot, source position) cells that carry no live row's data."""
        cells = sum(r.source_len for r in self.live_rows())
        return 1.0 - cells / max(len(self) * self.source_len, 1)

    def release(self, i: int) -> None:
        """Frees slot i: its row is no longer decoded (its arrays stay until reused)."""
        self.rows[i] = None
        self.positions[i] = 0  # a free slot must never walk past the position table

    def advanced(self: _B, tokens: np.ndarray, done: list[int]) -> _B:
        """The batch a step on: `tokens` the rows' new last tokens, every live row one position
        further, the rows at `done` released."""
        positions = self.positions + 1
        free = self.free
        if free:
            positions[free] = 0
        rows, tokens = list(self.rows), tokens.astype(np.int64)
        out = replace(self, rows=rows, tokens=tokens, positions=positions)
        for i in done:
            out.release(i)
        return out

    def filter(self: _B, keep: list[int]) -> _B:
        """Only the slots at `keep`; the source axis shrinks to what the rows still need (and
        the layout's cache to what they use)."""
        idx = np.asarray(keep, dtype=np.int64)
        rows = [self.rows[i] for i in keep]
        s = max(max((r.source_len for r in rows if r is not None), default=0), 1)
        return replace(
            self,
            rows=rows,
            tokens=self.tokens[idx],
            positions=self.positions[idx],
            src_mask=HOST.take(self.src_mask, idx, 1, 0, s),
            cross=[self.ops.take(c, idx, 2, 0, s) for c in self.cross],
        )

    def tidy(self) -> DecodeBatch | None:
        """Compacts when it pays: a quarter of the slots free, or a quarter of the shared cache
        columns (at least 8) unused by every row. Otherwise the batch as it is."""
        live = self.live
        if not live:
            return None
        if 4 * (len(self.rows) - len(live)) >= len(self.rows):
            return self.filter(live)
        if self._unused_columns(live) >= max(8, self.past_len // 4):
            return self.filter(list(range(len(self.rows))))
        return self

    def widen_source(self, s: int) -> None:
        """Right-pads the source axis to s positions (masked) so longer newcomers fit."""
        if s <= self.source_len:
            return
        self.src_mask = HOST.pad(self.src_mask, 1, s)
        self.cross = [self.ops.pad(c, 2, s) for c in self.cross]

    def place(self: _B, slots: list[int], other: _B, rows: list[int]) -> None:
        """Puts rows `rows` of a fresh batch (not decoded yet) into free slots `slots`."""
        new = [other.rows[j] for j in rows]
        assert other.past_len == 0 and all(self.rows[i] is None for i in slots)
        lengths = [r.source_len for r in new if r is not None]  # ≤ self.source_len (widen_source)
        assert len(lengths) == len(slots) == len(rows)
        for i, r in zip(slots, new, strict=True):
            self.rows[i] = r
        self.tokens[slots] = other.tokens[rows]
        self.positions[slots] = other.positions[rows]
        self.src_mask = HOST.place(self.src_mask, slots, other.src_mask, rows, lengths, 1)
        pairs = zip(self.cross, other.cross, strict=True)
        self.cross = [self.ops.place(c, slots, oc, rows, lengths, 2) for c, oc in pairs]

    def concatenate(self: _B, other: _B) -> _B:
        """Rows of self then other, the shorter source right-padded (the layout joins the
        caches)."""
        s = max(self.source_len, other.source_len)
        pairs = zip(self.cross, other.cross, strict=True)
        return replace(
            self,
            rows=self.rows + other.rows,
            tokens=np.concatenate([self.tokens, other.tokens]),
            positions=np.concatenate([self.positions, other.positions]),
            src_mask=HOST.stack(self.src_mask, other.src_mask, 1, s, at_end=False),
            cross=[self.ops.stack(x, y, 2, s, at_end=False) for x, y in pairs],
        )


@dataclass
class ConcatBatch(DecodeBatch):
    """decoder.onnx's cache: the slots share P columns, each row's history left-padded to the
    oldest row's, and every step returns a new cache one column longer."""

    # past: 2L × (B, H, P, Dh)
    self_mask: np.ndarray = field(kw_only=True)  # (B, P) 1 where a cached column is the row's

    @classmethod
    def fresh(
        cls, rt: Runtime, rows: list[Row | None], src_mask: np.ndarray, cross: list[Cache]
    ) -> ConcatBatch:
        n, past = len(rows), rt.empty_past(len(rows))
        empty = np.zeros((n, 0), np.int64)
        first = cls._first_step(rt, n)
        return cls(rows, *first, src_mask, past, cross, ops=rt.cache_ops, self_mask=empty)

    @property
    def past_len(self) -> int:
        return int(self.self_mask.shape[1])

    def reserve(self, rows: int, length: int) -> None:
        """Nothing to allocate: each step returns a new cache."""

    def decode(self, rt: Runtime) -> tuple[np.ndarray, list[np.ndarray], ConcatBatch]:
        self_mask = np.concatenate([self.self_mask, np.ones((len(self), 1), np.int64)], axis=1)
        logits, past, cross_attn, cross = rt.step(
            self.tokens, self.positions, self_mask, self.src_mask, self.past, self.cross
        )
        return logits, cross_attn, replace(self, self_mask=self_mask, past=past, cross=cross)

    def _unused_columns(self, live: list[int]) -> int:
        used = self.self_mask[live].any(axis=0)
        return int(np.argmax(used)) if used.any() else 0

    def filter(self, keep: list[int]) -> ConcatBatch:
        """Also drops the leading cache columns that no remaining row uses."""
        out = super().filter(keep)
        idx = np.asarray(keep, dtype=np.int64)
        p = self.past_len
        used = self.self_mask[idx][out.live].any(axis=0)
        start = int(np.argmax(used)) if used.any() else p
        out.self_mask = HOST.take(self.self_mask, idx, 1, start, p)
        out.past = [self.ops.take(c, idx, 2, start, p) for c in self.past]
        return out

    def place(self, slots: list[int], other: ConcatBatch, rows: list[int]) -> None:
        super().place(slots, other, rows)
        self.self_mask[slots] = 0  # none of the cached columns is the newcomers'

    def concatenate(self, other: ConcatBatch) -> ConcatBatch:
        """The shorter past is left-padded."""
        out = super().concatenate(other)
        p = max(self.past_len, other.past_len)
        out.self_mask = HOST.stack(self.self_mask, other.self_mask, 1, p, at_end=True)
        pairs = zip(self.past, other.past, strict=True)
        out.past = [self.ops.stack(x, y, 2, p, at_end=True) for x, y in pairs]
        return out


@dataclass
class InPlaceBatch(DecodeBatch):
    """decoder_kv.onnx's cache: 2L preallocated buffers (capacity ≥ B, H, M, Dh), row b's
    history at positions 0..positions[b]-1; the step writes the new key/value in place, so its
    cost does not grow with the oldest row's age and a newcomer has nothing to copy."""

    inplace: ClassVar[bool] = True
    # The decoder's binding, kept while the arrays stay the same (the batches a step on share
    # it); its logits and attention buffers are rewritten every step.
    binding: InPlaceStep = field(kw_only=True, repr=False)

    @classmethod
    def fresh(
        cls, rt: Runtime, rows: list[Row | None], src_mask: np.ndarray, cross: list[Cache]
    ) -> InPlaceBatch:
        """Buffers of no rows yet: reserve() grows them (rows that join a batch take its)."""
        first = cls._first_step(rt, len(rows))
        buffers = rt.cache_buffers(0, 0)
        return cls(
            rows, *first, src_mask, buffers, cross, ops=rt.cache_ops, binding=InPlaceStep(rt)
        )

    def decode(self, rt: Runtime) -> tuple[np.ndarray, list[np.ndarray], InPlaceBatch]:
        logits, cross_attn = rt.step_inplace(
            self.tokens, self.positions, self.src_mask, self.past, self.cross, self.binding
        )
        return logits, cross_attn, self

    def reserve(self, rows: int, length: int) -> None:
        """At least `rows` buffer rows (doubling) and `length` positions."""
        cap, m = self.past[0].shape[0], self.past[0].shape[2]
        if rows <= cap and length <= m:
            return
        new_cap, new_m = max(rows, 2 * cap if rows > cap else cap), max(length, m)
        used = min(len(self.rows), cap)
        grown = []
        for buf in self.past:
            g = np.zeros((new_cap, buf.shape[1], new_m, buf.shape[3]), np.float32)
            g[:used, :, :m] = buf[:used]
            grown.append(g)
        self.past = grown

    def filter(self, keep: list[int]) -> InPlaceBatch:
        """Kept rows move down to slots 0..len(keep)-1 (only their used positions are copied);
        the buffers themselves are reused."""
        assert keep == sorted(keep)
        for dst, src in enumerate(keep):
            n = int(self.positions[src])
            if dst != src and n and self.rows[src] is not None:
                for buf in self.past:  # dst < src: a row still to move is never overwritten
                    buf[dst, :, :n] = buf[src, :, :n]
        return super().filter(keep)

    def concatenate(self, other: InPlaceBatch) -> InPlaceBatch:
        """other's rows, not decoded yet, take this batch's next buffer rows."""
        assert not other.positions.any(), "only fresh rows join in-place buffers"
        self.reserve(len(self) + len(other), self.past[0].shape[2])
        return super().concatenate(other)


@dataclass
class EncodeStats:
    rows: int  # sentences encoded
    tokens: int  # their real source tokens
    positions: int  # token positions computed: tokens when packed, rows × longest when padded
    packed: bool
    seconds: float


@dataclass
class StepStats:
    rows: int  # live rows decoded
    padding_waste: float  # share of (slot, source position) cells computed for no live row
    seconds: float
    # Of the rows, those whose sentence's deadline had passed when the step began: work for
    # nobody. The scheduler drops such rows between steps, so a sentence adds at most one.
    late_rows: int = 0


class Engine:
    """Greedy decoding over a Runtime; used by the scheduler and by offline batch decoding."""

    def __init__(self, runtime: Runtime, limits: Limits, capacity: int = 64) -> None:
        self.rt = runtime
        self.limits = limits
        self.capacity = capacity  # rows the in-place cache buffers are first allocated for
        # The cache layout that the runtime's decoder graph takes, chosen once.
        self.layout: type[DecodeBatch] = InPlaceBatch if runtime.inplace else ConcatBatch
        self.last_encode: EncodeStats | None = None  # figures of the latest encoder run

    def start(
        self, jobs: list[SentenceJob], cache: bool = True, room: int | None = None
    ) -> DecodeBatch:
        """Runs the encoder over new sentences → a batch ready for its first step (BOS).
        cache=False: no in-place cache buffers (the rows are about to join another batch);
        room: the rows those buffers are first made for (default: the engine's capacity, so
        that newcomers can join without a copy)."""
        n = len(jobs)
        s = max(1, max(len(j.source_ids) for j in jobs))
        ids = np.full((n, s), self.rt.pad_id, np.int64)
        mask = np.zeros((n, s), np.int64)
        for i, j in enumerate(jobs):
            ids[i, : len(j.source_ids)] = j.source_ids
            mask[i, : max(1, len(j.source_ids))] = 1
        rows: list[Row | None] = [Row(j, max(1, len(j.source_ids))) for j in jobs]
        batch = self.layout.fresh(self.rt, rows, mask, self._encode(ids, mask))
        if cache:
            batch.reserve(max(n, self.capacity if room is None else room), self._cache_length(jobs))
        return batch

    def _encode(self, ids: np.ndarray, mask: np.ndarray) -> list[Cache]:
        """Cross K/V (B, H, S, Dh) of a padded batch, through the cheaper encoder layout."""
        t0 = time.perf_counter()
        n, s = ids.shape
        tokens = int(mask.sum())
        packed = self.packs(n, s, tokens)
        if packed:
            rows, cols = np.nonzero(mask)  # row-major: every row's tokens in order
            kvs = self.rt.encode_packed(ids[rows, cols], cols, rows)  # 2L × (1, H, T, Dh)
            cross = [self.rt.cache_ops.unpack(kv, rows, cols, n, s) for kv in kvs]
        else:
            cross = self.rt.encode(ids, mask)
        self.last_encode = EncodeStats(
            n, tokens, tokens if packed else n * s, packed, time.perf_counter() - t0
        )
        return cross

    def packs(self, rows: int, width: int, tokens: int) -> bool:
        """Whether `rows` sentences of `tokens` real tokens, the longest `width`, are encoded
        packed (see the module docstring)."""
        if self.rt.packing == "always":
            return True
        if self.rt.packing == "off" or rows < 2:
            return False
        d6 = 6 * self.rt.d_model
        return tokens * (1 + tokens / d6) < rows * width * (1 + width / d6)

    def _cache_length(self, jobs: list[SentenceJob]) -> int:
        """Positions an in-place cache row needs: the bundle's limit, or a longer job's."""
        return max(self.rt.cache_length, max((j.limit for j in jobs), default=0))

    def admit(self, batch: DecodeBatch | None, jobs: list[SentenceJob]) -> DecodeBatch:
        """Encodes new sentences and adds them to a running batch: free slots first, the rest
        appended (one copy of the caches)."""
        new = self.start(jobs, cache=batch is None)
        if batch is None:
            return new
        batch.reserve(len(batch), self._cache_length(jobs))
        free = batch.free
        n = min(len(free), len(new))
        if n:
            batch.widen_source(max(new.rows[k].source_len for k in range(n)))  # type: ignore[union-attr]
            batch.place(free[:n], new, list(range(n)))
        if n == len(new):
            return batch
        return batch.concatenate(new.filter(list(range(n, len(new)))) if n else new)

    def step(
        self, batch: DecodeBatch
    ) -> tuple[list[tuple[SentenceJob, SentenceResult]], DecodeBatch | None, StepStats]:
        """Generates one token for every row. Returns the finished sentences, the batch of the
        rows still going (None when none is), and the step's figures."""
        t0, now = time.perf_counter(), time.monotonic()
        tidy = batch.tidy()
        if tidy is None:
            return [], None, StepStats(0, 0.0, 0.0)
        live, late = tidy.live, 0
        logits, cross_attn, after = tidy.decode(self.rt)
        nxt = logits.argmax(axis=-1)  # (B,)
        tokens = nxt.tolist()  # Python ints, converted at once
        finished: list[tuple[SentenceJob, SentenceResult]] = []
        done: list[int] = []
        for i in live:
            row = tidy.rows[i]
            assert row is not None
            late += row.job.expired(now)  # its deadline had passed when the step began
            reason = row.take(tokens[i], logits, cross_attn, i, self.rt.eos_id)
            if reason is not None:
                finished.append((row.job, self._result(row, reason)))
                done.append(i)
        stats = StepStats(len(live), tidy.padding_waste, time.perf_counter() - t0, late)
        if len(done) == len(live):
            return finished, None, stats
        return finished, after.advanced(nxt, done), stats

    def _result(self, row: Row, reason: str) -> SentenceResult:
        opts = row.job.options
        res = SentenceResult(list(row.tokens), reason)
        if opts.scores:
            res.token_log_probs = list(row.log_probs)
            res.sequence_log_prob = float(sum(row.log_probs) + row.eos_log_prob)
        if opts.attention != AttentionMode.NONE:
            lead = {
                AttentionMode.LAYER_AVERAGE: (),
                AttentionMode.LAYER_HEADS: (self.rt.n_heads,),
                AttentionMode.ALL_LAYERS: (self.rt.n_layers, self.rt.n_heads),
            }[opts.attention]
            # Steps stacked on the target axis, second to last: (T, S), (H, T, S), (L, H, T, S).
            res.attention = (
                np.stack(row.attn, axis=-2)
                if row.attn
                else np.zeros((*lead, 0, row.source_len), np.float32)
            )
        if opts.alignment:
            res.alignment = list(row.align)
        return res

    def empty_result(self, job: SentenceJob) -> SentenceResult:
        """An empty source translates to an empty output without running the model."""
        return self._result(Row(job, 0), "empty")

    def decode_all(self, jobs: list[SentenceJob], max_rows: int = 64) -> list[SentenceResult]:
        """Offline batched decoding (no scheduler): groups of similar source length, each run
        until its last row finishes."""
        results: dict[int, SentenceResult] = {}
        order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].source_ids))
        by_id = {id(j): i for i, j in enumerate(jobs)}
        todo = []
        for i in order:
            if jobs[i].source_ids and jobs[i].limit > 0:
                todo.append(i)
            else:
                results[i] = self.empty_result(jobs[i])
        for start in range(0, len(todo), max_rows):
            group = [jobs[i] for i in todo[start : start + max_rows]]
            # nothing joins an offline batch: buffers for its own rows only
            batch: DecodeBatch | None = self.start(group, room=len(group))
            while batch is not None:
                done, batch, _ = self.step(batch)
                for job, res in done:
                    results[by_id[id(job)]] = res
        return [results[i] for i in range(len(jobs))]


def decode_all_lanes(
    engines: list[Engine], jobs: list[SentenceJob], max_rows: int = 64
) -> list[SentenceResult]:
    """Offline batched decoding in parallel lanes: the groups decode_all would make, each
    decoded by whichever engine (one thread each; they may share a Runtime) is free next."""
    if len(engines) == 1:
        return engines[0].decode_all(jobs, max_rows)
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].source_ids))
    groups = [order[s : s + max_rows] for s in range(0, len(order), max_rows)]
    results: list[SentenceResult | None] = [None] * len(jobs)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def lane(engine: Engine) -> None:
        while True:
            with lock:
                if not groups or errors:
                    return
                group = groups.pop(0)
            try:
                decoded = engine.decode_all([jobs[i] for i in group], max_rows)
                for i, res in zip(group, decoded, strict=True):
                    results[i] = res
            except BaseException as e:  # re-raised in the caller
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=lane, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]
    assert len(done) == len(jobs), "a group was never decoded"
    return done


def _log_prob(logits: np.ndarray, token: int) -> float:
    m = float(logits.max())
    return float(logits[token] - m - np.log(np.exp(logits - m).sum()))
