"""The load tester against a real server: both modes, error accounting, percentiles."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from service.cli import main as service_main
from service.loadtest import Corpus, Settings, load_corpus, percentiles, run_load, summarize
from tests.conftest import ServerThread
from tests.doubles import before_each_step, fail_once


def test_percentiles_on_a_known_set() -> None:
    p = percentiles([float(x) for x in range(100, 0, -1)])  # order does not matter
    expected = {"p50": 50.5, "p90": 90.1, "p99": 99.01, "p99.9": 99.901, "max": 100.0}
    assert p == pytest.approx(expected, abs=1e-9)
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "p99.9": 7.0, "max": 7.0}


def test_builtin_corpus_has_references() -> None:
    c = load_corpus(None)
    assert len(c.sources) == 1000 and c.references is not None
    assert c.bleu_tokenize == "char"


def test_closed_loop(server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "summary.json"
    code = service_main(
        [
            "loadtest",
            "--target",
            server.target,
            "--concurrency",
            "4",
            "--duration",
            "1.5",
            "--warmup",
            "0.3",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["mode"] == "closed" and summary["errors"] == {}
    assert summary["calls"] > 10 and summary["calls_excluded_as_warmup"] > 0
    assert summary["calls_per_s"] > 0 and summary["tokens_per_s"] > 0
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert 0.0 <= summary["quality"]["exact_match"] <= 1.0 and "chrf" in summary["quality"]
    assert "| calls | calls/s |" in capsys.readouterr().out


def test_open_loop_counts_queueing_from_the_scheduled_time(server: ServerThread) -> None:
    with before_each_step(server.scheduler, lambda: time.sleep(0.05)):  # steps ≥ 50 ms
        s = Settings(server.target, rate=40, requests=40, progress=False, timeout=30)
        run = asyncio.run(run_load(s, Corpus(["seven hundred"], None)))
    summary = summarize(run, s, Corpus(["seven hundred"], None))
    assert summary["calls"] == 40 and summary["errors"] == {}
    # every call needs several ≥ 50 ms steps; nothing can come back faster
    assert summary["latency_ms"]["p50"] >= 100


def test_errors_are_counted_by_code(server: ServerThread) -> None:
    too_long = " ".join(["seven hundred"] * 20)  # over the tiny bundle's 24-token limit
    corpus = Corpus(["twelve", too_long, "three"], None)
    s = Settings(f"{server.target},{server.target}", concurrency=1, requests=30, progress=False)
    with before_each_step(server.scheduler, fail_once("injected")):
        run = asyncio.run(run_load(s, corpus))
    summary = summarize(run, s, corpus)
    bad = sum(1 in r.indices for r in run.records)
    assert bad > 0
    assert summary["errors"]["INVALID_ARGUMENT"] == bad
    assert summary["errors"]["INTERNAL"] == 1
    assert summary["calls"] == 30


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="either"):
        Settings("x:1", concurrency=2, rate=3, duration=1)
    with pytest.raises(ValueError, match="bound"):
        Settings("x:1", concurrency=2)
