"""Graph optimisation at export time, so that the bundle carries the graphs as they are served
and the export's verification runs on exactly those.

One rewrite is applied, to ``decoder_kv.onnx`` (the CPU's decoder): every self-attention's
query, key and value projections become one MatMul over the three weight matrices
concatenated along the output axis (and one Add of the three biases), whose Q|K|V output goes
into onnxruntime's ``GroupQueryAttention`` as its packed input (as many key/value heads as
query heads, so the packed layout is exactly the three side by side). Per layer that is two
MatMuls, two Adds and their dispatches fewer, and one GEMM three times as wide; the arithmetic
and every output are unchanged (measured: bit-identical logits and caches).

Only decoder_kv: in the encoders the same fusion needs a Split that copies its outputs and
was not faster, and the residual Add + LayerNorm fusions onnxruntime makes itself when it loads
a graph (benchmarks/RESULTS.md, issue 18).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# What the export records in the manifest for each graph it optimised.
FUSED_QKV = "self-attention Q/K/V as one MatMul, packed into GroupQueryAttention"


class OptimizeError(RuntimeError):
    pass


@dataclass
class _Projection:
    """x @ W (+ b): one of an attention's input projections."""

    matmul: onnx.NodeProto
    weight: np.ndarray  # (K, N)
    add: onnx.NodeProto | None = None
    bias: np.ndarray | None = None  # (N,)

    @property
    def source(self) -> str:
        return self.matmul.input[0]


class _Graph:
    """A graph's nodes, constants and consumers; ``store`` writes the edited node list back."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        # One list of node objects, edited and written back by ``store``: protobuf hands out a
        # new wrapper object on every access to graph.node.
        self.nodes = list(graph.node)
        self.inits = {i.name: i for i in graph.initializer}
        # The exporter shares equal initializers through Identity nodes (the zero biases of a
        # randomly initialised model, for one): such an output is that constant too.
        self.aliases = {
            n.output[0]: n.input[0]
            for n in self.nodes
            if n.op_type == "Identity" and n.input[0] in self.inits
        }
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        init = self.inits.get(self.aliases.get(name, name))
        return None if init is None else numpy_helper.to_array(init)

    def used_once(self, name: str) -> bool:
        return len(self.consumers.get(name, [])) == 1 and name not in self.outputs

    def store(self) -> None:
        used = {i for n in self.nodes for i in n.input} | self.outputs
        # Identity nodes that only fed removed projections
        self.nodes = [n for n in self.nodes if n.op_type != "Identity" or n.output[0] in used]
        used = {i for n in self.nodes for i in n.input} | self.outputs
        inits = [i for i in self.graph.initializer if i.name in used]
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        del self.graph.initializer[:]
        self.graph.initializer.extend(inits)


def _projection(g: _Graph, tensor: str) -> _Projection | None:
    """The MatMul (with a constant float (K, N) weight) and optional constant-bias Add that
    produce `tensor`, each used by nothing else."""
    node = g.producer.get(tensor)
    add = bias = None
    if node is not None and node.op_type == "Add":
        other = [i for i in node.input if g.producer.get(i, node).op_type == "MatMul"]
        consts = [g.constant(i) for i in node.input]
        if len(other) != 1 or sum(c is not None for c in consts) != 1:
            return None
        add, bias = node, next(c for c in consts if c is not None)
        node = g.producer[other[0]]
        if not g.used_once(node.output[0]):
            return None
    if node is None or node.op_type != "MatMul" or not g.used_once(tensor):
        return None
    weight = g.constant(node.input[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None
    if bias is not None and (bias.shape != (weight.shape[1],) or bias.dtype != np.float32):
        return None
    return _Projection(node, weight, add, bias)


def fuse_qkv(model: onnx.ModelProto) -> int:
    """See the module docstring. Returns the number of attention nodes whose projections were
    fused; attention nodes that do not have the pattern are left as they are."""
    g = _Graph(model.graph)
    fused = 0
    for node in [n for n in g.nodes if n.op_type == "GroupQueryAttention"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("num_heads") != attrs.get("kv_num_heads") or "" in node.input[:3]:
            continue
        parts = [_projection(g, name) for name in node.input[:3]]
        if any(p is None for p in parts) or len({p.source for p in parts if p}) != 1:
            continue
        _pack(g, node, [p for p in parts if p is not None], f"{node.name or 'attention'}.qkv")
        fused += 1
    g.store()
    return fused


def _pack(g: _Graph, attention: onnx.NodeProto, parts: list[_Projection], name: str) -> None:
    """Q, K and V from one MatMul (and one Add) into the attention's packed query input."""
    weight = np.concatenate([p.weight for p in parts], axis=1)  # (K, 3N): Q | K | V
    inits = [numpy_helper.from_array(weight, f"{name}.weight")]
    nodes = [helper.make_node("MatMul", [parts[0].source, f"{name}.weight"], [f"{name}.mm"],
                              f"{name}.matmul")]  # fmt: skip
    packed = f"{name}.mm"
    with_bias = [p.bias for p in parts if p.bias is not None]
    if with_bias:
        bias = np.concatenate(
            [np.zeros(p.weight.shape[1], np.float32) if p.bias is None else p.bias for p in parts]
        )
        inits.append(numpy_helper.from_array(bias, f"{name}.bias"))
        nodes.append(helper.make_node("Add", [packed, f"{name}.bias"], [f"{name}.out"],
                                      f"{name}.add"))  # fmt: skip
        packed = f"{name}.out"
    g.graph.initializer.extend(inits)
    old = {id(p.matmul) for p in parts} | {id(p.add) for p in parts if p.add is not None}
    at = next(i for i, n in enumerate(g.nodes) if n is attention)  # after the source
    before = [n for n in g.nodes[:at] if id(n) not in old]
    g.nodes = [*before, *nodes, *[n for n in g.nodes[at:] if id(n) not in old]]
    attention.input[0], attention.input[1], attention.input[2] = packed, "", ""


def optimize_decoder_kv(path: Path, n_layers: int) -> str:
    """Fuses decoder_kv.onnx at `path` in place; every decoder layer must have the pattern (a
    graph the exporter made always has it, so anything else is a bug to report, not a graph to
    ship unfused). Returns the manifest's description of what was done."""
    model = onnx.load(str(path))
    fused = fuse_qkv(model)
    if fused != n_layers:
        raise OptimizeError(f"{path.name}: fused the Q/K/V of {fused} of {n_layers} layers")
    onnx.save(model, str(path))
    return FUSED_QKV
