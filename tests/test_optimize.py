"""Graph optimisation at export time (export.optimize): the bundle's decoder_kv.onnx has every
layer's Q/K/V as one MatMul packed into GroupQueryAttention, gives exactly the unfused graph's
outputs, and the export's verification catches a fused graph whose parts are out of order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from export.checkpoint import CHECKPOINT_BEST, model_from_checkpoint
from export.onnx_export import export_cached_decoder
from export.optimize import FUSED_QKV, OptimizeError, fuse_qkv, optimize_decoder_kv
from service.bundle import graph_io, load_bundle

LAYERS, D = 2, 32  # the tiny model's (tests/conftest.py)


def attention_inputs(model: onnx.ModelProto) -> list[list[str]]:
    return [list(n.input[:3]) for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def packed_weight(model: onnx.ModelProto, attention: list[str]) -> onnx.TensorProto:
    """The (D, 3D) weight of the MatMul behind an attention node's packed input."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    node = producer[attention[0]]
    if node.op_type == "Add":
        node = next(producer[i] for i in node.input if i in producer)
    return inits[node.input[1]]


@pytest.fixture(scope="module")
def unfused(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """decoder_kv.onnx of the tiny checkpoint as torch exports it, before optimisation."""
    out = tmp_path_factory.mktemp("unfused")
    model, _ = model_from_checkpoint(tiny_run / CHECKPOINT_BEST)
    return export_cached_decoder(model, out)


def test_the_exported_bundle_carries_the_fused_graphs(tiny_bundle: Path, unfused: Path) -> None:
    manifest = load_bundle(tiny_bundle).manifest
    assert manifest["export"]["graph_optimizations"] == {"decoder_kv": FUSED_QKV}
    before = onnx.load(str(unfused))
    assert all("" not in inputs for inputs in attention_inputs(before))
    for name in ("decoder_kv.onnx", "decoder_kv.int8.onnx"):  # int8: quantized after fusing
        fused = onnx.load(str(tiny_bundle / name))
        layers = attention_inputs(fused)
        assert len(layers) == LAYERS and all(i[1:] == ["", ""] for i in layers), name
    fused = onnx.load(str(tiny_bundle / "decoder_kv.onnx"))
    for layer in attention_inputs(fused):
        assert list(packed_weight(fused, layer).dims) == [D, 3 * D]

    def ops(m: onnx.ModelProto, op: str) -> int:
        return sum(n.op_type == op for n in m.graph.node)

    # per layer: three MatMuls and three bias Adds become one of each
    assert ops(before, "MatMul") - ops(fused, "MatMul") == 2 * LAYERS
    assert ops(before, "Add") - ops(fused, "Add") == 2 * LAYERS
    assert [i.name for i in fused.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in before.graph.output]


def run_step(graph: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        graph.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return list(session.run(None, feeds))


def test_the_fused_graph_gives_exactly_the_unfused_outputs(unfused: Path) -> None:
    """Rows of different ages in one step: logits, updated caches and cross attention equal
    to the last bit."""
    before = onnx.load(str(unfused))
    fused = onnx.load(str(unfused))
    assert fuse_qkv(fused) == LAYERS
    rng = np.random.default_rng(0)
    io, b, h, m, s = graph_io(LAYERS), 3, 4, 9, 5
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(4, 100, (b, 1)),
        "position_ids": np.array([[0], [4], [7]]),
        "encoder_attention_mask": np.array([[1] * s, [1, 1, 0, 0, 0], [1] * s]),
    }
    for name in io.past:
        feeds[name] = rng.standard_normal((b, h, m, D // h)).astype(np.float32)
    for name in io.cross:
        feeds[name] = rng.standard_normal((b, h, s, D // h)).astype(np.float32)
    for got, want in zip(run_step(fused, feeds), run_step(before, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def test_every_layer_must_fuse(unfused: Path, tmp_path: Path) -> None:
    """A graph whose attention no longer has the pattern (here: fused already) is an error,
    not a graph shipped as it is."""
    path = tmp_path / "decoder_kv.onnx"
    shutil.copyfile(unfused, path)
    assert optimize_decoder_kv(path, LAYERS) == FUSED_QKV
    with pytest.raises(OptimizeError, match="fused the Q/K/V of 0 of 2 layers"):
        optimize_decoder_kv(path, LAYERS)


def test_a_fused_graph_with_q_and_k_swapped_fails_verification(
    tiny_bundle: Path, tiny_run: Path, tmp_path: Path
) -> None:
    """The export's own decoder_kv verification (export.verify, through the service's runtime)
    on a bundle whose packed weight has its Q and K blocks in the wrong order."""
    from export.rundir import load_run, load_split
    from export.tokenizer import Tokenizer
    from export.verify import verify_graph
    from service.bundle import Limits, file_entries, write_manifest

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    graph = onnx.load(str(copy / "decoder_kv.onnx"))
    for inputs in attention_inputs(graph):
        weight = packed_weight(graph, inputs)
        w = numpy_helper.to_array(weight)
        k_q_v = np.concatenate([w[:, D : 2 * D], w[:, :D], w[:, 2 * D :]], axis=1)
        weight.CopyFrom(numpy_helper.from_array(k_q_v, weight.name))
    onnx.save(graph, str(copy / "decoder_kv.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())  # its checksum is stale now
    manifest["files"] = file_entries(copy, list(manifest["files"]))
    write_manifest(copy, manifest)
    model, _ = model_from_checkpoint(tiny_run / CHECKPOINT_BEST)
    limits = Limits(**load_run(tiny_run)["limits"])
    tok = Tokenizer(copy / "tokenizer.model")
    pairs = load_split(tiny_run, "test")[:20]
    report = verify_graph("decoder_kv", model, load_bundle(copy), tok, pairs, limits)
    assert not report["passed"] and report["logits"] > 1e-2
