"""The load tester against a real server: both modes, error accounting, percentiles."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from service.cli import main as service_main
from service.loadtest import (
    Corpus,
    Record,
    Run,
    Settings,
    load_corpus,
    markdown,
    percentiles,
    run_load,
    summarize,
)
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


def _run(*records: tuple[float, float, str]) -> Run:
    """A finished run of (scheduled s, latency s, code) calls of one sentence each."""
    run = Run(started=100.0)
    run.records = [Record(t, lat, code, [0], ["x"] if code == "OK" else [], 1)
                   for t, lat, code in records]  # fmt: skip
    run.ended = run.started + max(t + lat for t, lat, _ in records)
    return run


def test_failed_calls_are_reported_apart_from_the_latency() -> None:
    """Fast refusals under overload must not make the latency look better: the percentiles
    are the answered calls', the failed ones have their own."""
    answered = [(0.01 * i, 0.100, "OK") for i in range(10)]
    refused = [(0.01 * i, 0.001, "RESOURCE_EXHAUSTED") for i in range(90)]
    s = Settings("x:1", concurrency=4, requests=100, progress=False)
    summary = summarize(_run(*answered, *refused), s, Corpus(["a"], None))
    assert summary["latency_ms"]["p50"] == pytest.approx(100.0)
    assert summary["failed_latency_ms"]["p50"] == pytest.approx(1.0)
    assert summary["errors"] == {"RESOURCE_EXHAUSTED": 90} and summary["calls"] == 100
    assert "Failed calls (not in the latency columns): p50 1.0 ms" in markdown(summary)


def test_open_loop_throughput_counts_the_sending_period() -> None:
    """An open loop sends 10 calls/s for 1 s; the last answers come 4 s late. Throughput is
    what was answered over the sending period (10/s), not over the wait (2/s)."""
    calls = [(0.1 * i, 0.5 if i < 9 else 4.1, "OK") for i in range(10)]
    s = Settings("x:1", rate=10, duration=1.0, progress=False)
    summary = summarize(_run(*calls), s, Corpus(["a"], None))
    assert summary["calls_per_s"] == pytest.approx(10.0) and summary["measured_s"] == 1.0


def test_a_corpus_with_some_references_is_refused_naming_the_lines(tmp_path: Path) -> None:
    path = tmp_path / "corpus.tsv"
    path.write_text("one\teins\ntwo\nthree\tdrei\nfour\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"2 line\(s\) without a tab and reference \(2, 4\)"):
        load_corpus(str(path))
    path.write_text("one\ntwo\n", encoding="utf-8")  # sources only: no quality check, no error
    assert load_corpus(str(path)).references is None


def test_a_run_inside_its_warmup_measures_nothing_and_says_so(
    server: ServerThread, capsys: pytest.CaptureFixture
) -> None:
    args = ["loadtest", "--target", server.target, "--concurrency", "1", "--requests", "3",
            "--warmup", "60", "--no-progress"]  # fmt: skip
    assert service_main(args) == 1
    assert (
        "no call was measured: all 3 were sent within the 60 s warm-up" in capsys.readouterr().err
    )
