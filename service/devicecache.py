"""Cache copies on the execution provider's device: ``CacheOps`` as small ONNX copy graphs.

Each operation is one graph of a few copy operators, built here with ``onnx.helper`` and run
by an onnxruntime session on the model's own providers. IO binding keeps the cache tensors
``OrtValue``s on the device, in and out; only the small index inputs (row numbers, widths,
masks of the rows' lengths) come from host memory. Shapes are dynamic (no dimension is fixed
in the graphs), so one session per operation serves every batch:

- ``take``: Gather (batch axis) → Slice (the kept positions)
- ``stack``: Pad each input on the position axis → Concat (batch axis)
- ``pad``: Pad
- ``place``: Gather the new rows → Slice and Pad them to the target's width → Where (zeros
  past each row's length) → ScatterND into their slots
- ``unpack``: Transpose the packed row to tokens first → ScatterND into zeros of the padded
  layout (ConstantOfShape) → Transpose back

Needs the ``onnx`` package (the ``cuda`` extra; the CPU image never loads this module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service.cacheops import Cache, CacheOps, Ints, on_device, shape_of

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17: older onnxruntimes load it too
RANK = 4  # caches are (B, H, T, Dh)
VECTOR = (TensorProto.INT64, 1)  # indices, widths, pads


def _graph(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: Mapping[str, tuple[int, int]],
    elem: int,
    constants: Sequence[onnx.TensorProto] = (),
) -> bytes:
    """A model of `nodes` with inputs of the given (element type, rank), no dimension fixed,
    and one output "out", a cache tensor."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, t, [None] * r) for n, (t, r) in inputs.items()],
        [helper.make_tensor_value_info("out", elem, [None] * RANK)],
        initializer=list(constants),
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _zero(elem: int, name: str, dims: Sequence[int] = ()) -> onnx.TensorProto:
    return helper.make_tensor(name, elem, list(dims), [0])


def take_graph(elem: int) -> bytes:
    nodes = [
        helper.make_node("Gather", ["x", "rows"], ["g"], axis=0),
        helper.make_node("Slice", ["g", "starts", "ends", "axes"], ["out"]),
    ]
    ints = dict.fromkeys(["rows", "starts", "ends", "axes"], VECTOR)
    return _graph("take", nodes, {"x": (elem, RANK), **ints}, elem)


def stack_graph(elem: int) -> bytes:
    nodes = [
        helper.make_node("Pad", ["x", "px"], ["a"]),
        helper.make_node("Pad", ["y", "py"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["out"], axis=0),
    ]
    inputs = {"x": (elem, RANK), "y": (elem, RANK), "px": VECTOR, "py": VECTOR}
    return _graph("stack", nodes, inputs, elem)


def pad_graph(elem: int) -> bytes:
    nodes = [helper.make_node("Pad", ["x", "pads"], ["out"])]
    return _graph("pad", nodes, {"x": (elem, RANK), "pads": VECTOR}, elem)


def place_graph(elem: int) -> bytes:
    nodes = [
        helper.make_node("Gather", ["y", "rows"], ["g"], axis=0),
        helper.make_node("Slice", ["g", "starts", "ends", "axes"], ["c"]),
        helper.make_node("Pad", ["c", "pads"], ["p"]),
        helper.make_node("Where", ["keep", "p", "zero"], ["u"]),
        helper.make_node("ScatterND", ["x", "slots", "u"], ["out"]),
    ]
    ints = dict.fromkeys(["rows", "starts", "ends", "axes", "pads"], VECTOR)
    slots = (TensorProto.INT64, 2)  # (K, 1): ScatterND's index of each new row
    keep = (TensorProto.BOOL, RANK)  # (K, 1, width, 1): the positions within each row's length
    inputs = {"x": (elem, RANK), "y": (elem, RANK), "keep": keep, "slots": slots, **ints}
    return _graph("place", nodes, inputs, elem, [_zero(elem, "zero")])


def unpack_graph(elem: int) -> bytes:
    nodes = [
        helper.make_node("Transpose", ["kv"], ["t"], perm=[0, 2, 1, 3]),  # (1, T, H, Dh)
        helper.make_node("Squeeze", ["t", "axis0"], ["u"]),  # (T, H, Dh)
        helper.make_node("ConstantOfShape", ["shape"], ["z"], value=_zero(elem, "v", [1])),
        helper.make_node("ScatterND", ["z", "index", "u"], ["o"]),  # (n, width, H, Dh)
        helper.make_node("Transpose", ["o"], ["out"], perm=[0, 2, 1, 3]),  # (n, H, width, Dh)
    ]
    axis0 = helper.make_tensor("axis0", TensorProto.INT64, [1], [0])
    inputs = {"kv": (elem, RANK), "index": (TensorProto.INT64, 2), "shape": VECTOR}
    return _graph("unpack", nodes, inputs, elem, [axis0])


GRAPHS: dict[str, Callable[[int], bytes]] = {
    "take": take_graph,
    "stack": stack_graph,
    "pad": pad_graph,
    "place": place_graph,
    "unpack": unpack_graph,
}


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _pads(ndim: int, axis: int, before: int, after: int) -> np.ndarray:
    """Pad's pads input: zeros but `before`/`after` on `axis` (all the begins, then the ends)."""
    pads = np.zeros(2 * ndim, np.int64)
    pads[axis], pads[ndim + axis] = before, after
    return pads


class DeviceCacheOps(CacheOps):
    """Copy graphs on `providers`, caches kept in `device` memory ("cuda", or "cpu" where the
    tests run this path against the host one)."""

    where = "device"

    def __init__(
        self,
        providers: Sequence[str],
        device: str,
        opts: ort.SessionOptions | None = None,
        dtype: np.dtype | type = np.float32,
    ) -> None:
        self.device = device
        self.dtype = np.dtype(dtype)
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.sessions = {
            name: ort.InferenceSession(build(elem), opts, providers=list(providers))
            for name, build in GRAPHS.items()
        }

    def _run(self, graph: str, caches: Mapping[str, Cache], **index: np.ndarray) -> ort.OrtValue:
        """Runs a copy graph: the caches bound where they live, the index inputs from the host,
        the output left in device memory."""
        session = self.sessions[graph]
        binding = session.io_binding()
        for name, v in caches.items():
            binding.bind_ortvalue_input(name, on_device(v, self.device))
        for name, a in index.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(a))
        binding.bind_output("out", self.device, 0)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def run(
        self, session: ort.InferenceSession, names: Sequence[str], feeds: Mapping[str, np.ndarray]
    ) -> list[Cache]:
        binding = session.io_binding()
        for name, a in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(a))
        for name in names:
            binding.bind_output(name, self.device, 0)
        session.run_with_iobinding(binding)
        return list(binding.get_outputs())

    def take(self, x: Cache, rows: np.ndarray, axis: int, start: int, stop: int) -> Cache:
        bounds = {"starts": _i64(start), "ends": _i64(stop), "axes": _i64(axis)}
        return self._run("take", {"x": x}, rows=np.asarray(rows, np.int64), **bounds)

    def stack(self, x: Cache, y: Cache, axis: int, width: int, at_end: bool) -> Cache:
        pads = []
        for v in (x, y):
            shape = shape_of(v)
            extra = width - shape[axis]
            pads.append(_pads(len(shape), axis, extra if at_end else 0, 0 if at_end else extra))
        return self._run("stack", {"x": x, "y": y}, px=pads[0], py=pads[1])

    def pad(self, x: Cache, axis: int, width: int) -> Cache:
        shape = shape_of(x)
        return self._run("pad", {"x": x}, pads=_pads(len(shape), axis, 0, width - shape[axis]))

    def place(self, x: Cache, slots: Ints, y: Cache, rows: Ints, lengths: Ints, axis: int) -> Cache:
        shape, width = shape_of(x), shape_of(x)[axis]
        cut = min(width, shape_of(y)[axis])
        keep = np.arange(width)[None, :] < np.asarray(lengths, np.int64)[:, None]  # (K, width)
        keep_shape = [len(slots)] + [width if d == axis else 1 for d in range(1, len(shape))]
        return self._run(
            "place",
            {"x": x, "y": y},
            rows=np.asarray(rows, np.int64),
            starts=_i64(0),
            ends=_i64(cut),
            axes=_i64(axis),
            pads=_pads(len(shape), axis, 0, width - cut),
            keep=keep.reshape(keep_shape),
            slots=np.asarray(slots, np.int64).reshape(-1, 1),
        )

    def unpack(self, kv: Cache, rows: np.ndarray, cols: np.ndarray, n: int, width: int) -> Cache:
        _, h, _, dh = shape_of(kv)
        index = np.stack([rows, cols], axis=1).astype(np.int64)  # (T, 2): token t's cell
        return self._run("unpack", {"kv": kv}, index=index, shape=_i64(n, width, h, dh))
