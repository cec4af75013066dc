"""The scheduler alone (no gRPC), with the real engine and onnxruntime sessions of the tiny
bundle: how newcomers join a running batch, and that they still get their solo results."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from service.bundle import load_bundle
from service.engine import EncodeStats, Engine, SentenceJob, StepStats
from service.runtime import Runtime, RuntimeConfig
from service.scheduler import (
    Cancelled,
    Observer,
    Scheduler,
    SchedulerConfig,
    choose,
    fair_share,
    group_ready,
)
from tests.doubles import Exact, ExactLength


class Counting(Observer):
    def __init__(self) -> None:
        self.admissions: list[int] = []
        self.rows: list[int] = []

    def admitted(self, stats: EncodeStats) -> None:
        self.admissions.append(stats.rows)

    def stepped(self, stats: StepStats) -> None:
        self.rows.append(stats.rows)


class Gate:
    """A before-step hook that holds every decoder step until the test lets it run, so that
    the test acts between two steps whatever this machine's speed."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.go = threading.Semaphore(0)
        self.open = False

    def __call__(self) -> None:
        if not self.open:
            self.entered.release()
            assert self.go.acquire(timeout=30), "the test never let the step run"

    def reached(self) -> None:
        """Waits until the lane is held before its next step."""
        assert self.entered.acquire(timeout=30), "the lane never came to its next step"

    def step(self) -> None:
        """Lets the held step run, then waits until the lane is held before the next one."""
        self.go.release()
        self.reached()

    def release(self) -> None:
        self.open = True
        self.go.release()


def test_newcomers_join_a_running_batch_in_groups(tiny_bundle: Path) -> None:
    """Sentences that arrive while a step runs join the running batch at the next step, all
    together: one admission (one encoder run) per group, whatever their number — here 7, 4
    and 4 single-sentence calls, each group a rule of its own (at least half the free rows
    filled: 7 of 15, 4 of 8, 2 of 4). The steps are held by the test, so the groups are the
    same on any machine. Each result equals the sentence decoded alone."""
    from tests.doubles import before_each_step

    b = load_bundle(tiny_bundle)
    engine = ExactLength(Runtime(b, RuntimeConfig("cpu", "fp32", 1)), b.limits)
    obs = Counting()
    sched = Scheduler(engine, SchedulerConfig(max_batch_rows=16, max_wait_ms=1.0), obs)
    gate = Gate()
    groups = [7, 4, 4]
    sched.start()
    try:
        with before_each_step(sched, gate):
            long = Exact([7, 8, 9], b.limits.max_target_tokens)  # runs past every newcomer
            futures = sched.submit([long]).futures
            gate.reached()  # the long row, admitted alone, is about to take its first step
            sources: list[list[int]] = []
            for n in groups:
                for _ in range(n):
                    i = len(sources)
                    sources.append([5 + i % 50, 6 + (i * 7) % 40, 9])
                    futures += sched.submit([Exact(sources[-1], 8)]).futures
                gate.step()
            gate.release()
            results = [f.result(timeout=30) for f in futures]
    finally:
        sched.stop(10)
    assert obs.admissions == [1, *groups]
    assert obs.rows[:4] == [1, 8, 12, 16]  # the newcomers decoded beside the long row
    assert len(results[0].token_ids) == b.limits.max_target_tokens
    for src, res in zip(sources, results[1:], strict=True):
        assert res.token_ids == engine.decode_all([Exact(src, 8)])[0].token_ids


class PerLane(Observer):
    """Rows of every step, by the decode thread that ran it."""

    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}

    def stepped(self, stats: StepStats) -> None:
        self.rows.setdefault(threading.current_thread().name, []).append(stats.rows)


def test_lanes_share_the_work_and_give_solo_results(tiny_bundle: Path) -> None:
    """Two lanes over one set of sessions: 64 sentences submitted at once are split between
    them (neither holds more than its fair share of 32 rows), and every result equals the
    sentence decoded alone."""
    b = load_bundle(tiny_bundle)
    rt = Runtime(b, RuntimeConfig("cpu", "fp32", 1))
    obs = PerLane()
    sched = Scheduler.over(rt, SchedulerConfig(max_batch_rows=64, max_wait_ms=5.0, lanes=2), obs)
    assert sched.lanes == 2
    sources = [[5 + i % 50, 6 + (i * 7) % 40, 9][: 1 + i % 3] for i in range(64)]
    sched.start()
    try:
        futures = sched.submit([SentenceJob(src, 10) for src in sources]).futures
        results = [f.result(timeout=60) for f in futures]
    finally:
        assert sched.stop(10)
    assert sorted(obs.rows) == ["nmtserve-decode-0", "nmtserve-decode-1"], obs.rows
    assert max(max(r) for r in obs.rows.values()) <= 32
    alone = Engine(rt, b.limits)
    for src, res in zip(sources, results, strict=True):
        assert res.token_ids == alone.decode_all([SentenceJob(src, 10)])[0].token_ids


def test_one_sentence_is_decoded_by_one_lane(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    obs = PerLane()
    rt = Runtime(b, RuntimeConfig("cpu", "fp32", 1))
    engines: list[Engine] = [ExactLength(rt, b.limits, 32) for _ in range(2)]
    sched = Scheduler(engines, SchedulerConfig(max_wait_ms=1.0, lanes=2), obs)
    sched.start()
    try:
        job = Exact([7, 8, 9], 12)
        sched.submit([job]).futures[0].result(30)
    finally:
        assert sched.stop(10)
    assert len(obs.rows) == 1 and sum(len(r) for r in obs.rows.values()) == 12, obs.rows


def test_scheduler_lanes_must_match_its_engines(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    engine = ExactLength(Runtime(b, RuntimeConfig("cpu", "fp32", 1)), b.limits)
    with pytest.raises(ValueError, match="2 lanes configured, 1 engines given"):
        Scheduler(engine, SchedulerConfig(lanes=2))
    with pytest.raises(ValueError, match="lanes"):
        SchedulerConfig(lanes=-1)


def test_plan_lanes(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert runtime.plan_lanes(0, RuntimeConfig("cpu")) == (2, RuntimeConfig("cpu", threads=1))
    assert runtime.plan_lanes(1, RuntimeConfig("cpu")) == (1, RuntimeConfig("cpu", threads=2))
    assert runtime.plan_lanes(3, RuntimeConfig("cpu")) == (3, RuntimeConfig("cpu", threads=1))
    explicit = RuntimeConfig("cpu", threads=4)
    assert runtime.plan_lanes(2, explicit) == (2, explicit)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 16)
    assert runtime.plan_lanes(0, RuntimeConfig("cpu")) == (4, RuntimeConfig("cpu", threads=4))
    monkeypatch.setattr(runtime, "providers_for", lambda choice: [runtime.CUDA, runtime.CPU])
    assert runtime.plan_lanes(0, RuntimeConfig("auto")) == (1, RuntimeConfig("auto", threads=16))
    with pytest.raises(ValueError, match="lanes"):
        runtime.plan_lanes(-1, RuntimeConfig("cpu"))


def test_offline_decoding_in_lanes_equals_one_engine(tiny_bundle: Path) -> None:
    from service.engine import decode_all_lanes

    b = load_bundle(tiny_bundle)
    rt = Runtime(b, RuntimeConfig("cpu", "fp32", 1))
    jobs = [SentenceJob([5 + i % 50, 6 + (i * 7) % 40, 9][: i % 4], 10) for i in range(50)]
    alone = Engine(rt, b.limits).decode_all(jobs, max_rows=8)
    lanes = decode_all_lanes([Engine(rt, b.limits) for _ in range(3)], jobs, max_rows=8)
    assert [r.token_ids for r in lanes] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in lanes] == [r.finish_reason for r in alone]


def test_choose_takes_calls_in_turn() -> None:
    """The admission choice alone: (each call's waiting source lengths) → sentences taken."""
    # a 256-sentence call and a single-sentence one behind it: one each per round
    assert choose([[5] * 256, [3]], 4, 0, 8192, running=True) == [3, 1]
    assert choose([[5] * 10, [3]], 1, 0, 8192, running=True) == [1, 0]  # one row: first in turn
    # a sentence over the token budget ends its call's turns; the others go on
    assert choose([[6, 6], [2, 2]], 10, 0, 10, running=True) == [1, 2]
    # the first candidate does not fit beside the running batch: nothing (the batch shrinks first)
    assert choose([[9], [1]], 10, 5, 10, running=True) == [0, 0]
    # an empty batch always takes the first, even over the budget
    assert choose([[20], [1]], 10, 0, 10, running=False) == [1, 0]
    assert choose([], 5, 0, 10, running=False) == []


def test_choose_exact_choices() -> None:
    # rows run out mid-round: the calls earlier in the turn order get the extra sentence
    assert choose([[1, 1, 1], [1, 1], [1]], 4, 0, 100, running=True) == [2, 1, 1]
    assert choose([[1]], 0, 0, 100, running=True) == [0]  # no free row: nothing
    # a sentence that brings the batch exactly to the budget fits; one token more does not
    assert choose([[4], [6]], 5, 0, 10, running=True) == [1, 1]
    assert choose([[4], [7]], 5, 0, 10, running=True) == [1, 0]
    # the running batch's tokens count against the budget
    assert choose([[3, 3]], 10, 5, 10, running=True) == [1]
    # a call whose sentence did not fit takes no more turns, even with a shorter one next
    assert choose([[5, 1], [5, 1]], 10, 0, 9, running=True) == [2, 0]
    # an empty batch takes an over-budget first sentence alone; then the budget binds
    assert choose([[20, 1], [1]], 10, 0, 10, running=False) == [1, 0]
    # calls with nothing left waiting (their sentences expired) are passed over
    assert choose([[], [2], []], 3, 0, 10, running=True) == [0, 1, 0]


def test_fair_share_of_rows() -> None:
    assert fair_share(64, 500, [0], lanes=1) == 64  # the only lane may fill max_batch_rows
    assert fair_share(64, 10, [20, 3], lanes=2) == 17  # (10 queued + 23 rows) / 2, rounded up
    assert fair_share(64, 200, [0, 0], lanes=2) == 64  # never over max_batch_rows
    assert fair_share(64, 0, [0, 0], lanes=2) == 1  # nothing in flight: still one row
    assert fair_share(64, 9, [4], lanes=2) == 13  # a dead lane's share goes to the living


def test_a_running_batch_takes_newcomers_in_groups() -> None:
    # half the free rows can be filled, or the oldest has waited its patience
    assert group_ready(queued=16, free=32, waited=0.0, patience=0.005)
    assert not group_ready(queued=15, free=32, waited=0.0049, patience=0.005)
    assert group_ready(queued=1, free=32, waited=0.005, patience=0.005)
    assert group_ready(queued=1, free=1, waited=0.0, patience=0.005)  # one free row: one is a group
    assert not group_ready(queued=0, free=0, waited=0.0, patience=0.005)


def test_a_single_sentence_call_is_not_queued_behind_a_big_one(tiny_bundle: Path) -> None:
    """256 sentences of one call, then one of another: served calls go to the back of the turn
    order, so the single sentence is admitted at the next free row, not after the 256."""
    b = load_bundle(tiny_bundle)
    engine = ExactLength(Runtime(b, RuntimeConfig("cpu", "fp32", 1)), b.limits)
    sched = Scheduler(engine, SchedulerConfig(max_batch_rows=8, max_wait_ms=1.0))
    sched.start()
    try:
        n = 12
        big = sched.submit([Exact([7, 8, 9], n) for _ in range(256)])
        time.sleep(0.02)
        before = sum(f.done() for f in big.futures)
        single = sched.submit([SentenceJob([5, 6], 4)]).futures[0]
        single.result(timeout=30)
        meanwhile = sum(f.done() for f in big.futures) - before
        assert meanwhile <= 16, meanwhile  # at most the batch running and the one beside it
        for f in big.futures:
            assert len(f.result(timeout=60).token_ids) == n
    finally:
        sched.stop(10)


def test_cancelled_sentences_leave_the_queue_at_once(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    engine = ExactLength(Runtime(b, RuntimeConfig("cpu", "fp32", 1)), b.limits)
    obs = Dropped()
    sched = Scheduler(engine, SchedulerConfig(max_batch_rows=4, max_wait_ms=1.0), obs)
    sched.start()
    try:
        n = b.limits.max_target_tokens
        slow: list[SentenceJob] = [Exact([7, 8, 9], n) for _ in range(4)]
        running = sched.submit(slow)
        time.sleep(0.05)
        queued = sched.submit([SentenceJob([5, 6, 7], 8) for _ in range(10)])
        assert sched.queued == 10 and sched.queued_tokens == 30
        queued.cancel()
        assert sched.queued == 0 and sched.queued_tokens == 0  # at once, not at admission
        for f in queued.futures:
            with pytest.raises(Cancelled, match="before it started"):
                f.result(timeout=1)
        assert obs.reasons == ["cancelled"] * 10
        assert all(len(f.result(timeout=60).token_ids) == n for f in running.futures)
    finally:
        sched.stop(10)


class Dropped(Observer):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def dropped(self, reason: str) -> None:
        self.reasons.append(reason)


def test_batches_failing_in_a_row_stop_the_lane(tiny_bundle: Path) -> None:
    """A fault that fails every batch (a sticky CUDA error) must not leave a server that says
    SERVING and fails every call: after max_failed_batches failures in a row the lane dies,
    on_fatal is told (the server turns NOT_SERVING and exits 1), and calls are refused. Fewer
    failures, with a good step between, only fail their own batches."""
    from service.scheduler import DecoderFailed
    from tests.doubles import before_each_step

    b = load_bundle(tiny_bundle)
    engine = Engine(Runtime(b, RuntimeConfig("cpu", "fp32", 1)), b.limits)
    fatal: list[BaseException] = []
    cfg = SchedulerConfig(max_batch_rows=4, max_wait_ms=1.0, max_failed_batches=3)
    sched = Scheduler(engine, cfg, None, fatal.append)
    sched.start()
    failing = [True]

    def hook() -> None:
        if failing[0]:
            raise RuntimeError("sticky device fault")

    try:
        with before_each_step(sched, hook):
            for _ in range(2):  # two failures, then a good batch: the count starts again
                with pytest.raises(RuntimeError, match="sticky device fault"):
                    sched.submit([SentenceJob([5, 6, 7], 4)]).futures[0].result(timeout=30)
            failing[0] = False
            assert sched.submit([SentenceJob([5, 6, 7], 4)]).futures[0].result(timeout=30)
            failing[0] = True
            for _ in range(2):
                with pytest.raises(RuntimeError, match="sticky device fault"):
                    sched.submit([SentenceJob([5, 6, 7], 4)]).futures[0].result(timeout=30)
            assert not fatal
            with pytest.raises(RuntimeError, match="sticky device fault"):
                sched.submit([SentenceJob([5, 6, 7], 4)]).futures[0].result(timeout=30)
            deadline = time.monotonic() + 10
            while not fatal and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(fatal) == 1 and "3 decode batches failed in a row" in str(fatal[0])
            with pytest.raises(DecoderFailed, match="decode lane 0 died"):
                sched.submit([SentenceJob([5, 6, 7], 4)])
    finally:
        sched.stop(10)
