"""The run directory: what training leaves behind for evaluation and export.

``run.json`` (corpus spec, model, training and length settings), ``tokenizer.model``,
``data/{dev,test}.jsonl`` (the held-out splits with their groups), ``checkpoint_{best,last}.pt``
and ``train_log.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from export.data import NumberCorpusConfig, Pair, Splits, number_corpus, user_corpus

RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.model"


def load_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory ({RUN_FILE} is missing)")
    return json.loads(path.read_text(encoding="utf-8"))


def save_split(pairs: list[Pair], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")


def load_split(run_dir: Path, split: str) -> list[Pair]:
    path = run_dir / "data" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    with path.open(encoding="utf-8") as f:
        return [Pair(**json.loads(line)) for line in f if line.strip()]


def build_corpus(spec: dict[str, Any]) -> Splits:
    if spec["kind"] == "numbers":
        return number_corpus(NumberCorpusConfig(**spec["config"]))

    def files(v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    splits = user_corpus(
        files(spec["train"]),
        files(spec.get("dev")),
        files(spec.get("test")),
        held_out_fraction=spec["held_out_fraction"],
        seed=spec["seed"],
        max_chars=spec["max_chars"],
        on_error=spec["on_error"],
    )
    return splits
