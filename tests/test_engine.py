"""The decoding engine alone (no scheduler, no gRPC): rows of different ages in one batch,
free slots reused by newcomers, compaction — every sentence's result equal to decoding it
alone, with the real onnxruntime sessions of the tiny bundle. Both decoders run: the in-place
cache (decoder_kv.onnx, the CPU default) and the concatenating one (decoder.onnx, what CUDA
uses)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.bundle import Bundle, load_bundle
from service.engine import (
    AttentionMode,
    DecodeBatch,
    DecodeOptions,
    Engine,
    SentenceJob,
    SentenceResult,
)
from service.runtime import Runtime, RuntimeConfig
from tests.doubles import Exact, ExactLength

OPTS = DecodeOptions(attention=AttentionMode.ALL_LAYERS, scores=True)


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path) -> Engine:
    """The concatenating decoder (decoder.onnx)."""
    b = load_bundle(tiny_bundle)
    return ExactLength(Runtime(b, RuntimeConfig("cpu", "fp32", 1, kv_cache="concat")), b.limits)


@pytest.fixture(scope="module")
def inplace(tiny_bundle: Path) -> Engine:
    """The in-place cache (decoder_kv.onnx), buffers first sized for 4 rows so they grow."""
    b = load_bundle(tiny_bundle)
    return ExactLength(Runtime(b, RuntimeConfig("cpu", "fp32", 1)), b.limits, capacity=4)


@pytest.fixture(params=["concat", "inplace"])
def either(request: pytest.FixtureRequest, engine: Engine, inplace: Engine) -> Engine:
    return engine if request.param == "concat" else inplace


def job(ids: list[int], limit: int, exact: bool = False) -> SentenceJob:
    """exact: EOS is not allowed before `limit` tokens, so the row runs exactly that long."""
    return (Exact if exact else SentenceJob)(ids, limit, OPTS)


def sources(engine: Engine, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    v = engine.rt.vocab_size
    return [[rng.randrange(4, v) for _ in range(rng.randint(1, 14))] for _ in range(n)]


def solo(engine: Engine, ids: list[int], limit: int) -> SentenceResult:
    return engine.decode_all([job(ids, limit)])[0]


def same(a: SentenceResult, b: SentenceResult) -> None:
    assert a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason
    assert a.token_log_probs is not None and b.token_log_probs is not None
    assert a.attention is not None and b.attention is not None
    np.testing.assert_allclose(
        np.asarray(a.token_log_probs), np.asarray(b.token_log_probs), atol=1e-4
    )
    np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)


def test_newcomers_take_free_slots_and_match_solo(either: Engine, engine: Engine) -> None:
    """Solo results come from the concatenating decoder: both decoders must agree with it."""
    rng = random.Random(3)
    srcs = sources(engine, 40, seed=1)
    limits = [rng.randint(1, 9) for _ in srcs]  # rows finish at different steps
    jobs = [job(s, n) for s, n in zip(srcs, limits, strict=True)]
    results: dict[int, SentenceResult] = {}
    index = {id(j): i for i, j in enumerate(jobs)}
    waiting = list(range(len(jobs)))
    batch: DecodeBatch | None = None
    reused = 0
    while waiting or batch is not None:
        if waiting:  # a few newcomers before most steps, as under load
            k = rng.randint(1, 4)
            take, waiting = waiting[:k], waiting[k:]
            free_before = len(batch.free) if batch is not None else 0
            if take:
                batch = either.admit(batch, [jobs[i] for i in take])
                reused += min(free_before, len(take))
        assert batch is not None
        done, batch, stats = either.step(batch)
        assert 0.0 <= stats.padding_waste < 1.0
        for j, res in done:
            results[index[id(j)]] = res
    assert reused > 0, "no newcomer took a free slot: the test does not test reuse"
    assert len(results) == len(jobs)
    for i, (s, n) in enumerate(zip(srcs, limits, strict=True)):
        same(results[i], solo(engine, s, n))


def test_free_slots_are_compacted_and_stale_cache_columns_cut(engine: Engine) -> None:
    srcs = sources(engine, 8, seed=2)
    batch = engine.start([job(s, 40, exact=True) for s in srcs])
    for _ in range(20):
        _, nb, _ = engine.step(batch)
        assert nb is not None
        batch = nb
    assert len(batch) == 8 and batch.past_len == 20
    batch.release(0)  # one of eight free: kept as a slot
    _, nb, _ = engine.step(batch)
    assert nb is not None and len(nb) == 8 and len(nb.live) == 7
    nb.release(1)  # two of eight: compacted before the next step
    _, nb2, _ = engine.step(nb)
    assert nb2 is not None and len(nb2) == 6 and nb2.free == []
    # A newcomer starts with no cached columns; once every old row is gone, the columns only
    # old rows used are cut off.
    young = engine.admit(nb2, [job(srcs[0], 40, exact=True)])
    for i in range(6):
        young.release(i)
    _, nb3, _ = engine.step(young)
    assert nb3 is not None and len(nb3) == 1 and nb3.past_len == 1


def test_free_slot_positions_stay_in_range(either: Engine) -> None:
    """A slot left free for many steps must not walk past the position table."""
    engine = either
    long_src = sources(engine, 1, seed=4)[0]
    limit = engine.limits.max_target_tokens
    batch: DecodeBatch | None = engine.start(
        [job(long_src, limit, exact=True)] + [job([5], 1) for _ in range(2)]
    )
    steps = 0
    while batch is not None:
        _, batch, _ = engine.step(batch)
        if batch is not None:
            assert int(batch.positions.max()) < limit + 1
        steps += 1
    assert steps == limit


@pytest.fixture(scope="module")
def bound(tiny_bundle: Path) -> Engine:
    """The IO-binding path (what CUDA uses), run against host memory."""
    b = load_bundle(tiny_bundle)
    cfg = RuntimeConfig("cpu", "fp32", 1, io_binding="on", kv_cache="concat")
    return Engine(Runtime(b, cfg), b.limits)


def test_io_binding_keeps_caches_bound_and_decodes_the_same(engine: Engine, bound: Engine) -> None:
    import onnxruntime as ort

    assert bound.rt.io_binding and not engine.rt.io_binding
    srcs = sources(engine, 24, seed=5)
    limits = [3 + i % 7 for i in range(len(srcs))]
    # Offline batches: rows finish at different steps (free slots, then compaction).
    for rows in (2, 8):
        plain = engine.decode_all([job(s, n) for s, n in zip(srcs, limits, strict=True)], rows)
        got = bound.decode_all([job(s, n) for s, n in zip(srcs, limits, strict=True)], rows)
        for a, b in zip(plain, got, strict=True):
            same(a, b)
    # Between steps the caches stay OrtValues (device memory on CUDA), cross K/V included ...
    batch = bound.start([job(s, 30, exact=True) for s in srcs[:4]])
    _, nb, _ = bound.step(batch)
    assert nb is not None
    _, nb, _ = bound.step(nb)
    assert nb is not None
    assert all(isinstance(v, ort.OrtValue) for v in nb.past + nb.cross)
    # ... until a newcomer takes a free slot: with host copies (the default on CPU) the cross
    # K/V it writes into pass through host memory; the self-attention cache is not touched.
    assert bound.rt.cache_ops.where == "host"
    nb.release(1)
    grown = bound.admit(nb, [job(srcs[5], 30, exact=True)])
    assert all(isinstance(v, np.ndarray) for v in grown.cross)
    assert all(isinstance(v, ort.OrtValue) for v in grown.past)
    _, after, _ = bound.step(grown)
    assert after is not None and all(isinstance(v, ort.OrtValue) for v in after.past)


def _with_copies(tiny_bundle: Path, copies: str, packing: str) -> Engine:
    """The IO-binding path with the given cache copies ("device": the copy graphs CUDA runs,
    here on the CPU provider)."""
    b = load_bundle(tiny_bundle)
    cfg = RuntimeConfig(
        "cpu", "fp32", 1, io_binding="on", kv_cache="concat", packing=packing, cache_copies=copies
    )
    return ExactLength(Runtime(b, cfg), b.limits)


def _on_device(batch: DecodeBatch) -> bool:
    """Every cache tensor is an OrtValue; a fresh batch's empty past (no values) aside."""
    import onnxruntime as ort

    past = batch.past if batch.past_len else []
    return all(isinstance(v, ort.OrtValue) for v in past + batch.cross)


def _admitting(
    engine: Engine, srcs: list[list[int]], seed: int
) -> tuple[list[SentenceResult], dict[str, int]]:
    """Decodes srcs under a stream of newcomers (the same for a given seed): free slots
    reused, batches joined, compaction, stale columns cut, the source widened. Returns the
    results in order and how often each happened. With device copies, checks that the caches
    are OrtValues in every batch an admission, a compaction or a step hands on (the batch a
    step decodes is tidied here first, which makes the step's own tidy() a no-op)."""
    rng = random.Random(seed)
    jobs = [job(s, rng.randint(1, 12), exact=rng.random() < 0.5) for s in srcs]
    index = {id(j): i for i, j in enumerate(jobs)}
    results: dict[int, SentenceResult] = {}
    seen = dict.fromkeys(["placed", "joined", "compacted", "cut", "widened"], 0)
    device = engine.rt.cache_ops.where == "device"
    waiting = list(range(len(jobs)))
    batch: DecodeBatch | None = None
    while waiting or batch is not None:
        if waiting and (batch is None or rng.random() < 0.6):
            k = rng.randint(1, 5)
            take, waiting = waiting[:k], waiting[k:]
            if batch is not None:
                free, width = len(batch.free), batch.source_len
                seen["placed"] += min(free, len(take))
                seen["joined"] += len(take) > free
                longest = max(len(srcs[i]) for i in take[:free]) if free else 0
                seen["widened"] += longest > width
            batch = engine.admit(batch, [jobs[i] for i in take])
            assert not device or _on_device(batch)
        assert batch is not None
        tidy = batch.tidy()
        assert tidy is not None and (not device or _on_device(tidy))
        seen["compacted"] += len(tidy) < len(batch)
        seen["cut"] += tidy.past_len < batch.past_len  # on compaction, or alone
        done, batch, _ = engine.step(tidy)
        assert batch is None or not device or _on_device(batch)
        results.update({index[id(j)]: r for j, r in done})
    return [results[i] for i in range(len(jobs))], seen


def identical(a: SentenceResult, b: SentenceResult) -> None:
    """The same tokens, log-probabilities and attention, bit for bit."""
    assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
    assert (a.token_log_probs, a.sequence_log_prob) == (b.token_log_probs, b.sequence_log_prob)
    assert a.attention is not None and b.attention is not None
    assert a.attention.shape == b.attention.shape
    assert a.attention.tobytes() == b.attention.tobytes()


@pytest.mark.parametrize("packing", ["off", "always"])
def test_device_cache_copies_decode_exactly_as_host_copies(
    tiny_bundle: Path, engine: Engine, packing: str
) -> None:
    """The copy graphs CUDA runs (on the CPU provider here) against numpy copies: admissions
    and compaction mid-batch give every sentence the same tokens, log-probabilities and
    attention bit for bit, and the caches never leave onnxruntime's memory (checked at every
    step in _admitting); the plain path (no IO binding, the encoder's own packing choice)
    agrees within float rounding."""
    host, device = (_with_copies(tiny_bundle, c, packing) for c in ("host", "device"))
    assert (host.rt.cache_ops.where, device.rt.cache_ops.where) == ("host", "device")
    assert "copied on admission and compaction in device memory" in device.rt.describe()
    srcs = sources(engine, 36, seed=11)
    want, seen = _admitting(host, srcs, seed=12)
    got, seen_device = _admitting(device, srcs, seed=12)
    assert seen == seen_device and all(seen.values()), f"not every change happened: {seen}"
    plain, _ = _admitting(engine, srcs, seed=12)
    for a, b, c in zip(want, got, plain, strict=True):
        identical(a, b)
        same(a, c)


def test_cache_copies_setting(tiny_bundle: Path, engine: Engine, inplace: Engine) -> None:
    """Host copies on CPU by default; device copies need the caches bound (IO binding)."""
    assert engine.rt.cache_ops.where == inplace.rt.cache_ops.where == "host"
    with pytest.raises(ValueError, match="cache_copies"):
        RuntimeConfig(cache_copies="sometimes")
    b = load_bundle(tiny_bundle)
    for cfg in (
        RuntimeConfig("cpu", "fp32", 1, kv_cache="concat", cache_copies="device"),
        RuntimeConfig("cpu", "fp32", 1, cache_copies="device"),  # the in-place decoder
    ):
        with pytest.raises(RuntimeError, match=r"cache_copies 'device' .* needs IO binding"):
            Runtime(b, cfg)


def test_device_copies_without_onnx_say_what_to_install(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # as in an image without the cuda extra
    monkeypatch.delitem(sys.modules, "service.devicecache", raising=False)
    cfg = RuntimeConfig("cpu", "fp32", 1, io_binding="on", kv_cache="concat", cache_copies="device")
    with pytest.raises(RuntimeError, match=r"need the onnx package .*nmtserve\[cuda\]"):
        Runtime(load_bundle(tiny_bundle), cfg)


def test_io_binding_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="io_binding"):
        RuntimeConfig(io_binding="sometimes")


def test_inplace_cache_is_shared_compacted_and_grown(engine: Engine, inplace: Engine) -> None:
    """The in-place decoder writes into one set of buffers: no self-attention columns, the same
    buffers after every step, rows moved down on compaction, buffers grown (rows and positions)
    when needed — and every result equal to the concatenating decoder's."""
    assert inplace.rt.inplace and not engine.rt.inplace
    srcs = sources(inplace, 8, seed=6)
    jobs = [job(s, 12 + i, exact=True) for i, s in enumerate(srcs[:6])]
    batch = inplace.start(jobs)  # 6 rows > capacity 4: grown at once
    assert batch.inplace and batch.past_len == 0 and batch.past[0].shape[0] >= 6
    buffers = [id(b) for b in batch.past]
    for _ in range(5):
        _, nb, _ = inplace.step(batch)
        assert nb is not None and [id(b) for b in nb.past] == buffers
        batch = nb
    assert list(batch.positions) == [5] * 6
    batch.release(0)
    batch.release(2)  # a third of the slots free: compacted before the next step
    finished = {}
    _, nb, _ = inplace.step(batch)
    assert nb is not None and len(nb) == 4 and nb.free == []
    # A newcomer with a longer limit than the buffers hold: they grow along positions.
    longer = SentenceJob(srcs[6], inplace.rt.cache_length + 3, OPTS)
    grown: DecodeBatch | None = inplace.admit(nb, [longer, job(srcs[7], 7, exact=True)])
    assert grown is not None and grown.past[0].shape[2] >= longer.limit
    while grown is not None:
        done, grown, _ = inplace.step(grown)
        finished.update({id(j): r for j, r in done})
    for j in [jobs[1], jobs[3], jobs[4], jobs[5], longer]:
        same(finished[id(j)], engine.decode_all([replace(j)])[0])


def test_inplace_binding_is_kept_until_the_arrays_change(
    tiny_bundle: Path, inplace: Engine
) -> None:
    """A batch keeps its decoder binding from step to step (no rebinding per step), also when
    a newcomer is written into a free slot in place; a batch with new arrays is bound afresh.
    Every step's logits equal a step bound from scratch on the same state (by a runtime of
    its own, without the engine's eos masking)."""
    rt = Runtime(load_bundle(tiny_bundle), RuntimeConfig("cpu", "fp32", 1))
    srcs = [s[:4] for s in sources(inplace, 4, seed=7)]  # short: a newcomer widens them
    longer = sources(inplace, 1, seed=8)[0][:3] * 4  # 12 tokens
    batch = inplace.start([job(s, 30, exact=True) for s in srcs])  # buffers of 4 rows

    def step_checked(before: DecodeBatch) -> DecodeBatch:
        b = before.tidy()  # as Engine.step does first (a tidy batch stays the same object)
        assert b is not None
        fresh_caches = [buf.copy() for buf in b.past]
        fresh, _ = rt.step_inplace(b.tokens, b.positions, b.src_mask, fresh_caches, b.cross)
        _, nb, _ = inplace.step(b)  # ExactLength masks eos in the kept binding's logits only
        assert nb is not None
        kept = nb.binding.logits[:, 0, :]  # type: ignore[attr-defined]
        assert kept is not fresh
        fresh[:, rt.eos_id] = kept[:, rt.eos_id]
        np.testing.assert_array_equal(kept, fresh)
        return nb

    def bound(b: DecodeBatch) -> object:
        return b.binding.binding  # type: ignore[attr-defined]

    batch = step_checked(batch)
    first = bound(batch)
    for _ in range(3):
        batch = step_checked(batch)
        assert bound(batch) is first
    batch.release(1)
    batch = inplace.admit(batch, [job(srcs[1][:2], 30, exact=True)])  # into the free slot
    batch = step_checked(batch)
    assert bound(batch) is first
    batch.release(1)
    batch = inplace.admit(batch, [job(longer, 30, exact=True)])  # free slot, wider source
    assert batch.source_len == len(longer) and len(batch) == 4
    batch = step_checked(batch)
    assert bound(batch) is not first
    second = bound(batch)
    batch.release(0)
    batch.release(2)  # half free: compacted (fewer rows)
    batch = step_checked(batch)
    assert bound(batch) is not second


def test_each_option_is_kept_on_its_own(either: Engine) -> None:
    """A row keeps exactly what it asked for: alignment or scores without attention, nothing
    for a plain row; what it keeps equals what a row asking for everything gets."""
    src = sources(either, 1, seed=9)[0]
    full = replace(OPTS, alignment=True)
    asks = [DecodeOptions(alignment=True), DecodeOptions(scores=True), DecodeOptions(), full]
    jobs = [SentenceJob(src, 6, o) for o in asks]
    align, scores, plain, every = either.decode_all(jobs)
    assert every.alignment and every.token_log_probs and every.attention is not None
    assert align.alignment == every.alignment and align.attention is None
    assert align.token_log_probs is None and scores.alignment is None
    assert scores.token_log_probs == every.token_log_probs and scores.attention is None
    assert plain.alignment is plain.token_log_probs is plain.attention is None
    assert align.token_ids == scores.token_ids == plain.token_ids == every.token_ids


def test_kv_cache_setting_is_checked(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="kv_cache"):
        RuntimeConfig(kv_cache="sometimes")
    old = _without(load_bundle(tiny_bundle), "decoder_kv")
    assert not Runtime(old, RuntimeConfig("cpu", "fp32", 1)).inplace
    with pytest.raises(RuntimeError, match="no fp32 decoder_kv graph"):
        Runtime(old, RuntimeConfig("cpu", "fp32", 1, kv_cache="inplace"))


def _without(b: Bundle, part: str) -> Bundle:
    """The bundle as exported before `part` existed."""
    manifest = {**b.manifest, "onnx": {**b.manifest["onnx"], "graphs": {
        p: {k: v for k, v in g.items() if k != part}
        for p, g in b.manifest["onnx"]["graphs"].items()
    }}}  # fmt: skip
    return type(b)(b.directory, manifest)


def test_packed_encoder_equals_padded_and_decodes_the_same(tiny_bundle: Path) -> None:
    """encoder_packed.onnx: a group of mixed lengths encoded as one row of real tokens gives
    every sentence the cross K/V of the padded encoder at its real positions (zeros at the
    padding), and the same decoding; `auto` packs only where that is cheaper."""
    b = load_bundle(tiny_bundle)
    packed, padded = (
        Engine(Runtime(b, RuntimeConfig("cpu", "fp32", 1, packing=p)), b.limits)
        for p in ("always", "off")
    )
    srcs = sources(packed, 12, seed=8)
    group = [job(s, 9) for s in srcs[:7]]
    a, z = packed.start(group), padded.start(group)
    assert packed.last_encode is not None and packed.last_encode.packed
    assert padded.last_encode is not None and not padded.last_encode.packed
    tokens = sum(len(s) for s in srcs[:7])
    assert packed.last_encode.tokens == padded.last_encode.tokens == tokens
    assert packed.last_encode.positions == tokens
    assert padded.last_encode.positions == 7 * max(len(s) for s in srcs[:7])
    np.testing.assert_array_equal(a.src_mask, z.src_mask)
    real = z.src_mask.astype(bool)
    for x, y in zip(a.cross, z.cross, strict=True):
        assert x.shape == y.shape and x.flags.c_contiguous
        np.testing.assert_allclose(x.transpose(0, 2, 1, 3)[real], y.transpose(0, 2, 1, 3)[real],
                                   atol=1e-5)  # fmt: skip
        assert not x.transpose(0, 2, 1, 3)[~real].any()
    finished = {}
    batch: DecodeBatch | None = a
    while batch is not None:
        done, batch, _ = packed.step(batch)
        finished.update({id(j): r for j, r in done})
    for j, s in zip(group, srcs, strict=False):
        same(finished[id(j)], solo(padded, s, 9))
    # Offline batches and a running batch admitting groups, packed throughout
    jobs = [job(s, 3 + i % 6) for i, s in enumerate(srcs)]
    for x, y in zip(packed.decode_all(jobs, 5), padded.decode_all([replace(j) for j in jobs], 5),
                    strict=True):  # fmt: skip
        same(x, y)


def test_encoder_packing_choice_and_setting(tiny_bundle: Path, inplace: Engine) -> None:
    assert inplace.rt.packing == "auto"  # the default with a bundle that has the graph
    assert inplace.packs(6, 14, 40)  # a group of mixed lengths: 40 tokens, not 84 positions
    assert not inplace.packs(6, 7, 40)  # lengths alike: little padding to save
    assert not inplace.packs(1, 14, 14)  # one sentence: nothing to pack
    big = 6 * inplace.rt.d_model  # attention over one long packed row costs more than padding
    assert not inplace.packs(64, big // 32, big * 3 // 2)
    with pytest.raises(ValueError, match="packing"):
        RuntimeConfig(packing="sometimes")
    old = _without(load_bundle(tiny_bundle), "encoder_packed")
    rt = Runtime(old, RuntimeConfig("cpu", "fp32", 1))
    assert rt.packing == "off" and rt.packed_encoder is None
    assert not Engine(rt, old.limits).packs(6, 14, 40)
    with pytest.raises(RuntimeError, match="no fp32 encoder_packed graph"):
        Runtime(old, RuntimeConfig("cpu", "fp32", 1, packing="always"))


def _reordered(tiny_bundle: Path, out: Path) -> Path:
    """A copy of the bundle whose fp32 graphs list their inputs and outputs in reverse order
    (the manifest records the new order): the same model, other positions."""
    import json
    import shutil

    import onnx

    from service.bundle import file_entries

    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for part, name in manifest["onnx"]["graphs"]["fp32"].items():
        model = onnx.load(str(out / name))
        for field in (model.graph.input, model.graph.output):
            items = list(field)[::-1]
            del field[:]
            field.extend(items)
        onnx.save(model, str(out / name))
        manifest["onnx"]["io"][part] = {
            "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output],
        }
    manifest["files"] = file_entries(out, list(manifest["files"]))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("kv_cache", ["concat", "inplace"])
def test_graphs_are_fed_by_name_not_position(
    tiny_bundle: Path, tmp_path: Path, engine: Engine, kv_cache: str
) -> None:
    b = load_bundle(_reordered(tiny_bundle, tmp_path / "reordered"))
    rt = Runtime(b, RuntimeConfig("cpu", "fp32", 1, kv_cache=kv_cache, packing="always"))
    reordered = Engine(rt, b.limits)
    for ids in sources(engine, 6, seed=5):
        same(reordered.decode_all([job(ids, 8)])[0], solo(engine, ids, 8))


def test_a_graph_whose_names_differ_from_the_manifest_is_refused(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    import json

    from service.bundle import BundleError

    out = _reordered(tiny_bundle, tmp_path / "renamed")
    manifest = json.loads((out / "manifest.json").read_text())
    io = manifest["onnx"]["io"]["encoder"]
    io["outputs"] = [n.replace("present.0", "present.9") for n in io["outputs"]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as err:
        Runtime(load_bundle(out), RuntimeConfig("cpu", "fp32", 1))
    assert "encoder.onnx: its outputs differ from manifest.json's onnx.io.encoder" in str(err.value)
    assert "onnx.io.encoder.outputs are not the contract's" in str(err.value)


def test_int8_graphs_are_refused_with_cuda(tiny_bundle: Path) -> None:
    """onnxruntime's CUDA provider has no kernels for the int8 graphs' quantized MatMuls: they
    would silently run on the CPU. The choice the runtime makes once its first session tells
    it the provider (here given CUDA, as a GPU machine's session would report)."""
    from service.runtime import CPU, CUDA, choose_graphs

    b = load_bundle(tiny_bundle)
    with pytest.raises(RuntimeError, match=r"int8 graphs with the CUDA provider.*--precision fp32"):
        choose_graphs(b, RuntimeConfig("cuda", "int8"), CUDA)
    assert choose_graphs(b, RuntimeConfig("cuda", "fp32"), CUDA) == ("auto", False)
    assert choose_graphs(b, RuntimeConfig("cpu", "int8"), CPU) == ("auto", True)


def test_the_output_length_rule_on_known_values() -> None:
    """min(requested, max_target_tokens, ceil(a·n + b)), from values worked out by hand: the
    end-to-end tests give PyTorch its limits through this same function, so they agree with
    the server whatever it computes."""
    from service.bundle import Limits

    lim = Limits(max_source_tokens=24, max_target_tokens=20, a=1.5, b=0.25)
    # ceil of 0.25, 1.75, 3.25, 4.75, 18.25, 19.75 and 45.25 (capped at 20)
    assert [lim.target_limit(n) for n in (0, 1, 2, 3, 12, 13, 30)] == [1, 2, 4, 5, 19, 20, 20]
    assert [lim.target_limit(3, requested) for requested in (0, 1, 4, 5, 9)] == [5, 1, 4, 5, 5]
    assert Limits(a=2.0, b=10.0).target_limit(7) == 24  # a whole number stays as it is


def test_start_up_log_names_each_graphs_provider(tiny_bundle: Path) -> None:
    rt = Runtime(load_bundle(tiny_bundle), RuntimeConfig("cpu", "int8", 1))
    assert rt.describe().startswith(
        "execution provider CPUExecutionProvider (encoder on CPUExecutionProvider, "
        "encoder_packed on CPUExecutionProvider, decoder_kv on CPUExecutionProvider), int8 graphs"
    )


def test_a_small_models_decoder_runs_on_one_thread(tiny_bundle: Path) -> None:
    """README (--threads): a decoder step under ONE_THREAD_STEP_MACS multiply-adds per row runs
    on one intra-op thread whatever the lane's budget (a second only costs there); the encoder
    keeps the budget, and so does a larger model's decoder, or any on CUDA."""
    from service.runtime import CPU, CUDA, decoder_threads, step_macs

    rt = Runtime(load_bundle(tiny_bundle), RuntimeConfig("cpu", "fp32", 2))
    assert rt.encoder.get_session_options().intra_op_num_threads == 2
    assert rt.decoder.get_session_options().intra_op_num_threads == 1
    assert "2 intra-op threads (the decoder's: 1, a step this small" in rt.describe()
    one = Runtime(load_bundle(tiny_bundle), RuntimeConfig("cpu", "fp32", 1))
    assert "decoder's" not in one.describe()
    forced = Runtime(load_bundle(tiny_bundle), RuntimeConfig("cpu", "fp32", 2, decoder_threads=2))
    assert forced.decoder.get_session_options().intra_op_num_threads == 2  # benchmarks measure
    # worked out by hand: L (6 d² + 2 d ff) + d V
    default = {"d_model": 128, "d_ff": 512, "n_decoder_layers": 2}
    marian_small = {"d_model": 256, "d_ff": 1024, "n_decoder_layers": 3}
    assert step_macs(default, 400) == 2 * (6 * 128**2 + 2 * 128 * 512) + 128 * 400 == 509_952
    assert step_macs(marian_small, 8000) == 4_800_512
    assert decoder_threads(2, default, 400, CPU) == 1
    assert decoder_threads(2, default, 400, CUDA) == 2
    assert decoder_threads(2, marian_small, 8000, CPU) == 2


def test_offline_batches_reserve_cache_rows_for_themselves_only(inplace: Engine) -> None:
    """decode_all's batches never take newcomers, so their in-place buffers hold their own
    rows (zeroing the engine's whole capacity for a batch of one cost a small model more per
    sentence than its encoder); a batch started for the scheduler keeps the capacity."""
    rows: list[int] = []
    start = inplace.start

    def spy(jobs: list[SentenceJob], cache: bool = True, room: int | None = None) -> DecodeBatch:
        batch = start(jobs, cache, room)
        rows.append(int(batch.past[0].shape[0]))
        return batch

    inplace.start = spy  # type: ignore[method-assign]
    try:
        srcs = sources(inplace, 3, seed=5)
        got = inplace.decode_all([job(s, 6) for s in srcs], max_rows=2)
        assert rows == [2, 1]
        assert inplace.start([job(srcs[0], 6)]).past[0].shape[0] == inplace.capacity == 4
    finally:
        del inplace.start
    for s, res in zip(srcs, got, strict=True):
        same(res, solo(inplace, s, 6))


def test_only_the_decoder_spins_and_only_when_asked(tiny_bundle: Path) -> None:
    """RuntimeConfig.spin (offline decoding: benchmarks/engines.py) lets the decoder's idle
    intra-op threads spin between steps; the encoders' threads never spin, and by default (the
    server) nothing does."""
    key = "session.intra_op.allow_spinning"
    b = load_bundle(tiny_bundle)
    for spin in (False, True):
        rt = Runtime(b, RuntimeConfig("cpu", "fp32", 2, spin=spin))
        assert rt.packed_encoder is not None
        sessions = {"decoder": rt.decoder, "encoder": rt.encoder, "packed": rt.packed_encoder}
        got = {
            k: s.get_session_options().get_session_config_entry(key) for k, s in sessions.items()
        }
        assert got == {"decoder": "1" if spin else "0", "encoder": "0", "packed": "0"}, spin
