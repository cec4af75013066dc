"""What bounds a small decoder step on this machine, measured apart from any model:

    python benchmarks/machine_bounds.py

1. **Read bandwidth** of one thread: a float32 dot product of an array with itself (numpy's
   BLAS, one pass over the array) at the size of marian-small's decoder weights (19.2 MB), of
   marian-base's output layer (65.5 MB) and of something no cache holds (512 MB).
2. **onnxruntime's cost per node**: a chain of N Adds on (1, 1, 256), one intra-op thread,
   through a kept IO binding; (time of 101 nodes − time of 1) / 100.
3. **One product alone**: onnxruntime's MatMul (prepacked weight, 1 and 2 intra-op threads,
   the server's no-spin setting and the offline spinning one) against numpy's BLAS, rows 1 and
   8, at the shapes of marian-small's output layer and feed-forward and marian-base's output
   layer: µs, and the weight's bytes over that time.

Each figure is the mean over many repetitions after a warm-up; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial

# numpy's BLAS on one thread, as the figures say (set before numpy loads it)
os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def timed(fn: Callable[[], object], seconds: float = 0.3) -> float:
    """Mean µs per call over about `seconds` (after a warm-up)."""
    for _ in range(10):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def session(nodes: list, inputs: list, outputs: list, inits: list, threads: int,
            spin: bool = False) -> ort.InferenceSession:  # fmt: skip
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def bound_run(
    s: ort.InferenceSession, x: np.ndarray, out_shape: tuple[int, ...]
) -> tuple[Callable[[], object], np.ndarray]:
    """A run of s with x bound as its input and its output bound to the array returned."""
    binding = s.io_binding()
    binding.bind_cpu_input("x", x)
    y = np.empty(out_shape, np.float32)
    binding.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)

    def run() -> object:  # holds x and y: the binding has only their addresses
        s.run_with_iobinding(binding)
        return x, y

    return run, y


def bandwidth() -> list[str]:
    lines = ["| array | µs per pass | GB/s |", "|---:|---:|---:|"]
    for mb in (19.2, 65.5, 512.0):
        a = np.ones(int(mb * 1e6 / 4), np.float32)
        us = timed(partial(a.dot, a), seconds=1.0)
        lines.append(f"| {mb:.1f} MB | {us:.0f} | {mb * 1e6 / us / 1e3:.1f} |")
    return lines


def per_node(d: int = 256) -> str:
    def chain(n: int) -> float:
        nodes = [
            helper.make_node(
                "Add", ["x" if i == 0 else f"t{i - 1}", "c"], [f"t{i}" if i < n - 1 else "y"]
            )
            for i in range(n)
        ]
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, d])
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        c = numpy_helper.from_array(np.ones(d, np.float32), "c")
        s = session(nodes, [x_info], [y_info], [c], threads=1)
        return timed(bound_run(s, np.zeros((1, 1, d), np.float32), (1, 1, d))[0], seconds=1.0)

    one, many = chain(1), chain(101)
    return (
        f"a run of 1 Add: {one:.1f} µs; of 101: {many:.1f} µs; {(many - one) / 100:.2f} µs per node"
    )


def products() -> list[str]:
    lines = [
        "| K × N (weight MB) | rows | ort 1 thread | ort 2 threads | ort 2 threads, spinning "
        "| numpy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rng = np.random.default_rng(0)
    for k, n in ((256, 8000), (256, 1024), (1024, 256), (512, 32000)):
        weight = rng.standard_normal((k, n), np.float32)
        mb = weight.nbytes / 1e6
        w = numpy_helper.from_array(weight, "W")
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, k])
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 1, n])
        mm = [helper.make_node("MatMul", ["x", "W"], ["y"])]
        sessions = [session(mm, [x_info], [y_info], [w], t, spin)
                    for t, spin in ((1, False), (2, False), (2, True))]  # fmt: skip
        for m in (1, 8):
            x = rng.standard_normal((m, 1, k), np.float32)
            cells = [timed(bound_run(s, x, (m, 1, n))[0]) for s in sessions]
            out = np.empty((m, n), np.float32)
            cells.append(timed(partial(np.matmul, x[:, 0], weight, out=out)))
            shown = " | ".join(f"{us:.0f} µs ({mb * 1e6 / us / 1e3:.0f} GB/s)" for us in cells)
            lines.append(f"| {k} × {n} ({mb:.1f}) | {m} | {shown} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.parse_args(argv)
    print("Read bandwidth, one thread (numpy dot of an array with itself):\n")
    print("\n".join(bandwidth()))
    print(f"\nonnxruntime per node (chain of Adds on (1, 1, 256), one thread): {per_node()}\n")
    print("One matrix product alone, µs per run (weight bytes / time):\n")
    print("\n".join(products()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
