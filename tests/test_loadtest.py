"""The load tester against a real server: both modes, error accounting, percentiles; the
open loop's Poisson schedule and its latency counted from each call's scheduled send time;
the answers' quality equal to the model's offline."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import grpc
import numpy as np
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
    poisson_schedule,
    run_load,
    summarize,
)
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
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
    # one scored answer per sentence of a measured call (what they score: the next test)
    assert summary["quality"]["sentences"] == summary["calls"]
    assert "| calls | calls/s |" in capsys.readouterr().out


def test_the_answers_quality_equals_the_models_offline(
    server: ServerThread, tiny_bundle: Path
) -> None:
    """Quality under load is the model's quality: the load tester's exact match, BLEU and chrF
    of the answers equal those of exactly the sentences it sent, decoded offline through the
    exporter's engine path (same bundle, same precision as the server) and scored by
    sacreBLEU here — several sentences per call, so each answer must meet its own reference."""
    import sacrebleu

    from export.tokenizer import Tokenizer
    from export.verify import engine_translate, served
    from service.bundle import load_bundle

    corpus = load_corpus(None)  # the built-in numbers: one word each side, char BLEU
    assert corpus.references is not None
    s = Settings(server.target, concurrency=4, requests=40, sentences_per_request=3,
                 progress=False)  # fmt: skip
    run = asyncio.run(run_load(s, corpus))
    summary = summarize(run, s, corpus)
    assert summary["errors"] == {} and summary["calls"] == 40
    sent = [i for r in run.records for i in r.indices]
    bundle = load_bundle(tiny_bundle)
    tok = Tokenizer(tiny_bundle / "tokenizer.model")
    precision = server.server.translator.runtime.cfg.precision  # type: ignore[union-attr]
    ids = engine_translate(served(bundle, precision), bundle.limits,
                           tok.encode_batch([corpus.sources[i] for i in sent]))  # fmt: skip
    offline = [tok.decode(x) for x in ids]
    refs = [corpus.references[i] for i in sent]
    exact = sum(h == r for h, r in zip(offline, refs, strict=True)) / len(sent)
    assert 0 < exact < 1, "a mix of right and wrong answers, or the comparison shows little"
    quality = summary["quality"]
    assert quality["sentences"] == len(sent) == 120
    assert quality["exact_match"] == pytest.approx(exact, abs=1e-12)
    assert quality["bleu_tokenize"] == "char"
    assert quality["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(offline, [refs], tokenize="char").score, abs=1e-9
    )
    assert quality["chrf"] == pytest.approx(sacrebleu.corpus_chrf(offline, [refs]).score, abs=1e-9)


def test_open_loop_counts_queueing_from_the_scheduled_time(server: ServerThread) -> None:
    with before_each_step(server.scheduler, lambda: time.sleep(0.05)):  # steps ≥ 50 ms
        s = Settings(server.target, rate=40, requests=40, progress=False, timeout=30)
        run = asyncio.run(run_load(s, Corpus(["seven hundred"], None)))
    summary = summarize(run, s, Corpus(["seven hundred"], None))
    assert summary["calls"] == 40 and summary["errors"] == {}
    # every call needs several ≥ 50 ms steps; nothing can come back faster
    assert summary["latency_ms"]["p50"] >= 100


def test_open_loop_arrivals_are_poisson() -> None:
    """The open loop's gaps between scheduled sends are exponential with mean 1/rate: their
    mean, a coefficient of variation of 1 (a fixed or uniform gap has 0 or 0.58), and a
    Kolmogorov–Smirnov distance to the exponential below its 0.1% critical value (uniform gaps
    are ten times further). A fixed seed gives the same schedule every run; another seed
    another one."""
    rate, n = 200.0, 20_000
    times = np.fromiter(islice(poisson_schedule(rate, seed=1), n), dtype=np.float64)
    gaps = np.diff(times, prepend=0.0)
    assert gaps.min() > 0
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)  # its standard error: 0.7%
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)  # standard error 1%
    x = np.sort(gaps)
    cdf = 1.0 - np.exp(-rate * x)
    i = np.arange(1, n + 1)
    ks = max(float((i / n - cdf).max()), float((cdf - (i - 1) / n).max()))
    assert ks < 1.95 / math.sqrt(n), ks
    again = list(islice(poisson_schedule(rate, seed=1), 5))
    assert again == times[:5].tolist()
    assert again != list(islice(poisson_schedule(rate, seed=2), 5))


class Stalling(pb_grpc.TranslatorServicer):
    """A Translator that answers at once, except that the first call `at` seconds or more
    after the first one stops the event loop it shares with the load tester for `stall`
    seconds, as a stop-the-world pause (a collector, swapping) stops a process: nothing is
    sent or answered meanwhile."""

    def __init__(self, at: float = 0.0, stall: float = 0.0) -> None:
        self.at, self.stall = at, stall
        self.arrivals: list[float] = []
        self.stalled: tuple[float, float] | None = None  # monotonic start and end

    async def Translate(self, request: pb.TranslateRequest, context: object) -> object:
        now = time.monotonic()
        self.arrivals.append(now)
        if self.stall and self.stalled is None and now - self.arrivals[0] >= self.at:
            time.sleep(self.stall)  # blocks the whole loop, on purpose
            self.stalled = (now, time.monotonic())
        results = [pb.TranslationResult(index=i, translation=t)
                   for i, t in enumerate(request.sentences)]  # fmt: skip
        return pb.TranslateResponse(results=results)


def open_loop_against(servicer: Stalling, s: Settings, corpus: Corpus) -> Run:
    """The load tester's open loop against servicer, both on one event loop."""

    async def scenario() -> Run:
        server = grpc.aio.server()
        pb_grpc.add_TranslatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await run_load(replace(s, targets=f"127.0.0.1:{port}"), corpus)
        finally:
            await server.stop(None)

    return asyncio.run(scenario())


def test_a_stall_raises_the_open_loop_p99_though_nothing_was_sent_meanwhile() -> None:
    """Coordinated omission: a server that stalls for a second while the load tester itself
    cannot send (one call in flight, the others held back) must still raise the open loop's
    p99 by about a second, because latency counts from each call's scheduled send time: every
    call scheduled during the stall waited at least until its end. Measured from the actual
    send, those calls would look fast. The calls are sent on the Poisson schedule."""
    corpus = Corpus(["seven"], None)
    s = Settings("", rate=50, duration=3.0, progress=False, timeout=10)
    calm = summarize(open_loop_against(Stalling(), s, corpus), s, corpus)
    stalling = Stalling(at=1.0, stall=1.0)
    run = open_loop_against(stalling, s, corpus)
    summary = summarize(run, s, corpus)
    assert calm["errors"] == summary["errors"] == {}
    want = list(islice(poisson_schedule(s.rate, s.seed), len(run.records)))
    assert sorted(r.scheduled for r in run.records) == pytest.approx(want, abs=1e-6)
    assert stalling.stalled is not None
    start, end = stalling.stalled
    # nothing reached the server during the stall: the sender was stopped with it
    assert not [t for t in stalling.arrivals if start < t < end]
    held = [r for r in run.records if start < run.started + r.scheduled < end]
    assert len(held) >= 20, len(held)  # about 50 at 50 calls/s
    for r in held:
        assert r.latency >= end - (run.started + r.scheduled) - 1e-3, r
    rise = summary["latency_ms"]["p99"] - calm["latency_ms"]["p99"]
    assert 700 <= rise <= 1500, (calm["latency_ms"], summary["latency_ms"])


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
