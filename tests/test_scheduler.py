"""The scheduler alone (no gRPC), with the real engine and onnxruntime sessions of the tiny
bundle: how newcomers join a running batch, and that they still get their solo results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from service.bundle import load_bundle
from service.engine import DecodeOptions, EncodeStats, Engine, SentenceJob, StepStats
from service.runtime import Runtime, RuntimeConfig
from service.scheduler import Observer, Scheduler, SchedulerConfig


class Counting(Observer):
    def __init__(self) -> None:
        self.admissions: list[int] = []
        self.rows: list[int] = []

    def admitted(self, stats: EncodeStats) -> None:
        self.admissions.append(stats.rows)

    def stepped(self, stats: StepStats) -> None:
        self.rows.append(stats.rows)


def test_newcomers_join_a_running_batch_in_groups(tiny_bundle: Path) -> None:
    """One sentence arriving every 2 ms while ~7 ms decoder steps run: they are encoded in
    groups (each admission is an encoder run), not one by one, and each result equals the
    sentence decoded alone."""
    b = load_bundle(tiny_bundle)
    engine = Engine(Runtime(b, RuntimeConfig("cpu", "fp32", 1)), b.limits)
    obs = Counting()
    sched = Scheduler(engine, SchedulerConfig(max_batch_rows=64, max_wait_ms=1.0), obs)
    name = "step_inplace" if engine.rt.inplace else "step"  # the decoder in use
    step = getattr(engine.rt, name)

    def slow_step(*args: Any) -> Any:
        time.sleep(0.006)  # decoder steps slower than arrivals, as with a bigger model
        return step(*args)

    setattr(engine.rt, name, slow_step)
    sched.start()
    try:
        n = b.limits.max_target_tokens  # the longest a row may run
        long = SentenceJob([7, 8, 9], n, DecodeOptions(min_output_tokens=n))
        futures = sched.submit([long])
        time.sleep(0.1)  # the long row is decoding
        sources = [[5 + i % 50, 6 + (i * 7) % 40, 9] for i in range(24)]
        for src in sources:
            futures += sched.submit([SentenceJob(src, 8)])
            time.sleep(0.002)
        results = [f.result(timeout=30) for f in futures]
    finally:
        sched.stop(10)
    newcomers = obs.admissions[1:]
    assert sum(newcomers) == len(sources)
    assert len(newcomers) <= len(sources) // 4, obs.admissions
    assert max(obs.rows) > 3  # newcomers really shared steps with the long row
    assert len(results[0].token_ids) == n
    for src, res in zip(sources, results[1:], strict=True):
        assert res.token_ids == engine.decode_all([SentenceJob(src, 8)])[0].token_ids
