"""Shared fixtures: one tiny run trained through the real CLI, and its exported bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TRAIN = [
    "--train-size", "3000", "--dev-per-digits", "5", "--test-per-digits", "12",
    "--max-digits", "4", "--vocab-size", "200",
    "--d-model", "32", "--heads", "4", "--d-ff", "64",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--max-steps", "120", "--eval-every", "60", "--time-budget", "0",
    "--warmup-steps", "20", "--lr", "3e-3",
    "--target-exact-match", "0", "--batch-tokens", "2000",
    "--max-source-tokens", "24", "--max-target-tokens", "24", "--max-positions", "32",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import main

    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--run", str(run), *TINY_TRAIN]) == 0
    return run


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import main

    out = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["export", "--run", str(tiny_run), "--out", str(out), "--int8"]) == 0
    return out
