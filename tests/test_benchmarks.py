"""The benchmarks' own checks: a figure only counts when the tokens agree; the step profile's
parts add up; the graph A/B compares outputs first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.engines import mismatched, spread, verdict


def test_an_fp32_engine_with_other_tokens_fails_the_benchmark(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README: the engine benchmark exits non-zero when an fp32 engine's tokens differ from
    the reference (int8 engines may differ); `main` returns `verdict`'s status."""
    ref = [[5, 6], [7, 8]]
    rows = [
        {"engine": "torch-cache", "batch": 2, "round": 0, "tokens": ref},
        {"engine": "ort-fp32", "batch": 2, "round": 0, "tokens": ref},
        {"engine": "ct2-fp32", "batch": 2, "round": 0, "tokens": [[5, 6], [7, 9]]},
        {"engine": "ort-int8", "batch": 2, "round": 0, "tokens": [[1, 1], [1, 1]]},
        {"engine": "ort-fp32", "batch": 2, "round": 1, "tokens": [[0, 0], [0, 0]]},  # timed only
    ]
    engines = ["torch-cache", "ort-fp32", "ct2-fp32", "ort-int8"]
    assert mismatched(rows, engines, "torch-cache") == ["ct2-fp32@2"]
    assert mismatched(rows[:2], engines, "torch-cache") == []
    assert verdict(rows, engines, "torch-cache") == 1
    assert "fp32 engines whose tokens differ from torch-cache: ['ct2-fp32@2']" in (
        capsys.readouterr().err
    )
    assert verdict(rows[:2], engines, "torch-cache") == 0


def test_spread_is_the_median_and_range() -> None:
    assert spread([3.0, 1.0, 2.0]) == "2.00 (1.00–3.00)"
    assert spread([1.5]) == "1.50" and spread([]) == "—"


def test_step_profile_parts_add_up_to_the_step(tiny_bundle: Path, capsys: Any) -> None:
    """benchmarks/step_profile.py: session run, runtime and engine are nested timers, so the
    three parts (each without the one inside it) add up to the whole step."""
    from benchmarks.step_profile import main

    args = ["--bundle", str(tiny_bundle), "--batch", "2", "--steps", "40", "--warmup", "3"]
    assert main(args) == 0
    rows = {
        cells[0]: [float(cells[1]), float(cells[3])]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
        and cells[1].replace(".", "").isdigit()
    }  # fmt: skip
    assert set(rows) == {"session run", "runtime", "engine", "whole step"}
    for col in (0, 1):  # wall, CPU
        parts = sum(rows[p][col] for p in ("session run", "runtime", "engine"))
        assert abs(parts - rows["whole step"][col]) <= 0.2, (col, rows)
        assert rows["session run"][col] > 0


def test_graph_ab_of_a_bundle_with_itself(tiny_bundle: Path, capsys: Any) -> None:
    """benchmarks/graph_ab.py compares the two graphs' outputs before timing them."""
    from benchmarks.graph_ab import main

    args = ["--a", str(tiny_bundle), "--b", str(tiny_bundle), "--batches", "1,3"]
    assert main([*args, "--rounds", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("max abs logit diff 0.00e+00") == 2 and out.count("| b/a |") == 2


def test_step_profile_rates_the_matrix_products_by_part() -> None:
    """Each projection's FLOPs from its kernel event's own shapes (rows × K × N × 2), grouped
    as the output layer (N = the vocabulary), feed-forward (the widest inner size) and the
    rest; a product of two activations (two listed inputs) is not a projection."""
    from benchmarks.step_profile import matmul_parts

    def event(op: str, inputs: list[list[int]], out: list[int], dur: float) -> dict[str, Any]:
        args = {
            "op_name": op,
            "input_type_shape": [{"float": s} for s in inputs],
            "output_type_shape": [{"float": out}],
        }
        return {"cat": "Node", "name": f"n{dur}", "dur": dur, "args": args}

    events = [
        event("MatMul", [[2, 1, 4]], [2, 1, 10], 10.0),  # output layer: 160 FLOP in 10 µs
        event("MatMul", [[2, 1, 4]], [2, 1, 16], 4.0),  # feed-forward up: 256 FLOP
        event("MatMul", [[2, 1, 16]], [2, 1, 4], 4.0),  # feed-forward down: 256 FLOP
        event("MatMul", [[2, 1, 4]], [2, 1, 12], 2.0),  # Q|K|V: 192 FLOP
        event("FusedMatMul", [[2, 4, 1, 8], [2, 4, 8, 5]], [2, 4, 1, 5], 50.0),  # scores
        {"cat": "Session", "name": "model_run", "dur": 99.0},
    ]
    lines = matmul_parts(events, vocab=10, peak=0.1)
    assert lines[3:] == [
        "| attention projections | 10% | 0.1 | 96 |",  # 192 FLOP / 2 µs = 0.096 GFLOP/s
        "| feed-forward | 40% | 0.1 | 64 |",  # 512 / 8
        "| output layer | 50% | 0.0 | 16 |",  # 160 / 10
    ]


def test_int8_drift_is_zero_against_itself_and_measured_against_int8(
    tiny_bundle: Path, capsys: Any
) -> None:
    """benchmarks/int8_drift.py: fp32 against itself drifts by exactly nothing; the tiny
    bundle's int8 graphs drift by something, and every share is a share."""
    from benchmarks.int8_drift import drift, main, sources
    from service.bundle import load_bundle
    from service.runtime import Runtime, RuntimeConfig

    b = load_bundle(tiny_bundle)
    fp32, int8 = (Runtime(b, RuntimeConfig("cpu", p, 1)) for p in ("fp32", "int8"))
    ids = sources(fp32, 6, 5, seed=1)
    assert not np.isin(ids, [fp32.pad_id, fp32.eos_id, fp32.bos_id]).any()
    same = drift(fp32, fp32, ids, 7)
    assert (same.max_abs, same.mean_abs, same.top1_agree, same.rows_same) == (0.0, 0.0, 1.0, 1.0)
    d = drift(fp32, int8, ids, 7)
    assert 0 < d.mean_abs <= d.max_abs and d.logit_std > 0
    assert all(0 <= x <= 1 for x in (d.top1_agree, d.rows_same, d.tokens_same))
    assert main(["--bundle", str(tiny_bundle), "--sentences", "3", "--tokens", "4"]) == 0
    assert "| max abs Δ logit |" in capsys.readouterr().out


def test_machine_bounds_times_the_product_it_says() -> None:
    """benchmarks/machine_bounds.py: the bound session computes x @ W into the bound output,
    and a timing is a positive number of µs."""
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.machine_bounds import bound_run, session, timed

    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((4, 3), np.float32), rng.standard_normal((2, 1, 4), np.float32)
    s = session(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 1, 3])],
        [numpy_helper.from_array(w, "W")],
        threads=1,
    )
    run, y = bound_run(s, x, (2, 1, 3))
    assert timed(run, seconds=0.01) > 0
    np.testing.assert_allclose(y, x @ w, rtol=1e-5)
