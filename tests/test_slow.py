"""Opt-in acceptance of the default model (make test-slow): the full training run on this
machine, then export and verification. Takes about 5 minutes on 2 cores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from export.cli import main


@pytest.mark.slow
def test_default_model_acceptance(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, out = tmp_path / "default", tmp_path / "bundle"
    t = time.monotonic()
    assert main(["train", "--run", str(run), "--no-progress"]) == 0
    wall = time.monotonic() - t
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    test = json.loads((run / "metrics_test.json").read_text())
    assert main(["export", "--run", str(run), "--out", str(out), "--int8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    report = {
        "wall_seconds_train_command": round(wall, 1),
        "train_seconds": log[-1]["elapsed_s"],
        "time_to_dev_exact_0.95_s": next(r["elapsed_s"] for r in log if r["exact_match"] >= 0.95),
        "time_to_dev_exact_0.99_s": next(r["elapsed_s"] for r in log if r["exact_match"] >= 0.99),
        "test": {k: test[k] for k in ("exact_match", "bleu", "chrf", "exact_match_by_group")},
        "verification": {
            k: manifest["verification"][k]
            for k in ("max_abs_logit_diff", "greedy_identical_share", "sentences")
        },
        "int8_test_exact_match": manifest["metrics"]["int8"]["exact_match"],
    }
    with capsys.disabled():
        print("\n" + json.dumps(report, indent=2))
    assert log[-1]["elapsed_s"] <= 600
    assert test["exact_match"] >= 0.99
    assert min(test["exact_match_by_group"].values()) >= 0.98
    assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4
    assert manifest["verification"]["greedy_identical_share"] == 1.0
