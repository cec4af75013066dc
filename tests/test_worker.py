"""Decoding in a child process (service.worker.DecodeProcess) against decoding in this one:
the same results, deadlines and cancellations honoured across the process boundary, the
queue bound, metrics hooks forwarded, a killed child replaced while the server keeps going."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.bundle import load_bundle
from service.engine import (
    AttentionMode,
    DecodeOptions,
    EncodeStats,
    Engine,
    SentenceJob,
    SentenceResult,
    StepStats,
)
from service.runtime import Runtime, RuntimeConfig
from service.scheduler import (
    Cancelled,
    DeadlineExceeded,
    Observer,
    QueueFull,
    SchedulerConfig,
    ShuttingDown,
)
from service.worker import DecodeProcess, DecodeProcessDied

OPTS = DecodeOptions(attention=AttentionMode.ALL_LAYERS, scores=True)
RT = RuntimeConfig("cpu", "fp32", 1)


class Recording(Observer):
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.rows: list[int] = []

    def _count(self, hook: str) -> None:
        self.calls[hook] = self.calls.get(hook, 0) + 1

    def queue_depth(self, n: int) -> None:
        self._count("queue_depth")

    def admitted(self, stats: EncodeStats) -> None:
        self._count("admitted")
        self.rows.append(stats.rows)

    def stepped(self, stats: StepStats) -> None:
        self._count("stepped")

    def finished(self, result: SentenceResult) -> None:
        self._count("finished")

    def dropped(self, reason: str) -> None:
        self._count("dropped_" + reason)


@pytest.fixture(scope="module")
def worker(tiny_bundle: Path):
    obs = Recording()
    w = DecodeProcess(
        tiny_bundle,
        RT,
        SchedulerConfig(
            max_queue_tokens=88, max_call_tokens=88, max_batch_rows=4, max_batch_tokens=44
        ),
        obs,
    )
    w.start()
    yield w, obs
    assert w.stop(30)
    assert not w._proc.is_alive()


def sources(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(4, 40, size=int(rng.integers(1, 12)))) for _ in range(n)]


def wait(futures: list[Future[SentenceResult]]) -> list[SentenceResult]:
    return [f.result(timeout=60) for f in futures]


def test_results_equal_decoding_in_this_process(worker, tiny_bundle: Path) -> None:
    w, obs = worker
    assert w.info is not None and w.info.inplace and w.info.provider == "CPUExecutionProvider"
    b = load_bundle(tiny_bundle)
    local = Engine(Runtime(b, RT), b.limits)
    srcs = sources(7, seed=1)
    jobs = [SentenceJob([int(t) for t in s], 6 + i, OPTS) for i, s in enumerate(srcs)]
    got = wait(w.submit([replace(j) for j in jobs]).futures)
    for a, e in zip(got, local.decode_all(jobs), strict=True):
        assert a.token_ids == e.token_ids and a.finish_reason == e.finish_reason
        assert a.attention is not None and e.attention is not None
        np.testing.assert_allclose(a.attention, e.attention, atol=1e-5)
        np.testing.assert_allclose(a.token_log_probs or [], e.token_log_probs or [], atol=1e-4)
    # the child's metrics hooks reach this process's observer
    deadline = time.monotonic() + 5
    while obs.calls.get("stepped", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert obs.calls["finished"] >= 7 and obs.calls["admitted"] >= 2 and obs.calls["stepped"]
    assert max(obs.rows) <= 4  # the child's batch limit
    # an empty sentence is answered here without a trip to the child
    empty = w.submit([SentenceJob([], 0, OPTS)]).futures[0]
    assert empty.done() and empty.result().finish_reason == "empty"
    assert empty.result().attention is not None and empty.result().attention.shape == (2, 4, 0, 0)


def test_deadlines_and_cancellations_cross_the_process(worker) -> None:
    w, obs = worker
    src = [int(t) for t in sources(1, seed=2)[0]]
    expired = SentenceJob(src, 8, OPTS, deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        w.submit([expired]).futures[0].result(timeout=30)
    # 12 rows of 28 tokens (EOS not allowed before) for a batch of 4: the last waits in the
    # child's queue for three rounds, and is cancelled there
    slow = replace(OPTS, min_output_tokens=28)
    jobs = [SentenceJob(src, 28, slow) for _ in range(12)]
    futures = w.submit(jobs).futures
    jobs[-1].cancelled.set()
    with pytest.raises(Cancelled):
        futures[-1].result(timeout=30)
    assert all(len(r.token_ids) == 28 for r in wait(futures[:-1]))
    deadline = time.monotonic() + 5
    while "dropped_cancelled" not in obs.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert obs.calls["dropped_deadline"] >= 1 and obs.calls["dropped_cancelled"] >= 1
    assert wait(w.submit([SentenceJob(src, 4, OPTS)]).futures)[0].token_ids  # and it keeps going


def test_queue_bound_counts_what_the_child_holds(worker) -> None:
    w, _ = worker
    src = list(range(5, 16))  # 11 tokens
    slow = replace(OPTS, min_output_tokens=28)
    with pytest.raises(QueueFull, match="at most 88 waiting beside 44 decoding"):
        w.submit([SentenceJob(src, 28, slow) for _ in range(13)])  # 8 + 4 sentences at most
    held = w.submit([SentenceJob(src, 28, slow) for _ in range(12)]).futures
    with pytest.raises(QueueFull):
        w.submit([SentenceJob(src, 4, OPTS)])
    assert all(len(r.token_ids) == 28 for r in wait(held))
    assert wait(w.submit([SentenceJob(src, 4, OPTS)]).futures)


def test_a_killed_child_is_replaced(tiny_bundle: Path) -> None:
    w = DecodeProcess(tiny_bundle, RT, SchedulerConfig(max_batch_rows=4))
    w.start()
    try:
        src = [int(t) for t in sources(1, seed=4)[0]]
        first = w._proc.pid
        slow = replace(OPTS, min_output_tokens=28)
        running = w.submit([SentenceJob(src, 28, slow) for _ in range(12)]).futures
        os.kill(first, signal.SIGKILL)
        outcomes = []
        for fut in running:  # each either finished before the kill or failed, none hangs
            try:
                fut.result(timeout=30)
                outcomes.append("ok")
            except RuntimeError as e:
                assert "decode process exited with code -9" in str(e)
                outcomes.append("failed")
        assert "failed" in outcomes
        deadline = time.monotonic() + 60
        while True:  # refused, clearly, until the new child is up
            try:
                res = wait(w.submit([SentenceJob(src, 4, OPTS)]).futures)
                break
            except DecodeProcessDied:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert res[0].token_ids and w.restarts == 1 and w._proc.pid != first
    finally:
        assert w.stop(30)
    with pytest.raises(ShuttingDown):
        w.submit([SentenceJob([5], 4, OPTS)])


def test_a_child_that_cannot_load_says_why(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    graphs = {p: {k: v for k, v in g.items() if k != "encoder_packed"}
              for p, g in b.manifest["onnx"]["graphs"].items()}  # fmt: skip
    copy = tiny_bundle.parent / "no-packed-bundle"
    if not copy.exists():
        import json
        import shutil

        shutil.copytree(tiny_bundle, copy)
        manifest = {**b.manifest, "onnx": {**b.manifest["onnx"], "graphs": graphs}}
        (copy / "manifest.json").write_text(json.dumps(manifest))
    w = DecodeProcess(copy, replace(RT, packing="always"), SchedulerConfig())
    with pytest.raises(RuntimeError, match=r"could not start: .*no fp32 encoder_packed graph"):
        w.start()
    assert w.stop(5)  # never started: nothing to finish
    with pytest.raises(ShuttingDown):
        w.submit([SentenceJob([5], 4, OPTS)])
