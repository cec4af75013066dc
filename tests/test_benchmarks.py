"""The engine benchmark's own checks: a figure only counts when the tokens agree."""

from __future__ import annotations

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
