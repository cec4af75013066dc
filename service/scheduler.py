"""One scheduler for all requests: a bounded queue feeding continuous batching in decode lanes.

A lane is a decode thread that owns one running ``DecodeBatch`` (and its own ``Engine``; the
lanes share the onnxruntime sessions). Between two decoder steps a lane admits waiting
sentences into its batch, and finished rows leave the batch at once (their slots are reused,
see ``service.engine``). Newcomers join a running batch in groups: once half the lane's free
rows can be filled, or the oldest has waited ``max_wait_ms`` or two decoder steps. When a lane
is empty it waits up to ``max_wait_ms`` for more sentences to arrive before starting, so
concurrent single-sentence calls share a batch.

Fairness: the queue holds calls, each with its waiting sentences. Admission takes sentences
from the calls in turn, one each per round (``choose``), and a call that was served moves to
the back of the turn order, so a single-sentence call is never queued behind all 256 sentences
of another. The queue's limit counts work, in source tokens (``max_queue_tokens``), and one call
may hold at most ``max_call_tokens`` of it.

With several lanes (``SchedulerConfig.lanes``), all take from the one queue and each admits up
to its fair share of the work in flight: ceil((queued + rows in every lane) / lanes) rows, at
most ``max_batch_rows``. onnxruntime releases the GIL while it runs, so lanes decode in
parallel, and the asyncio server stays responsive beside them.

The decisions are pure functions: a lane's share (``fair_share``), whether a running batch
takes a group now (``group_ready``) and which sentences (``choose``); threads, the lock and the
clock stay in ``Scheduler``, whose admission (``_take``) waits when idle, reaps dead sentences
and applies the choice.

Every sentence ends through one path (``settle``): a result, an error, its deadline, or its
cancellation. Futures may be cancelled by their owner at any moment; completing one that is
already done is not an error. A sentence whose call is cancelled (``Ticket.cancel``) leaves the
queue at once; an expired or cancelled one never starts and is dropped from a running batch. A
failing batch fails only its own sentences. A lane that dies anyway (a bug in the scheduler
itself) fails what it held, and ``on_fatal`` tells the server, which stops serving and exits
non-zero so that its supervisor restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from service.engine import (
    DecodeBatch,
    EncodeStats,
    Engine,
    SentenceJob,
    SentenceResult,
    StepStats,
)
from service.runtime import Runtime
from service.settings import INT32, check, setting

log = logging.getLogger("nmtserve.scheduler")


class QueueFull(Exception):
    """The bounded queue cannot take these sentences now."""


class DeadlineExceeded(Exception):
    """The sentence's deadline passed before it finished."""


class Cancelled(Exception):
    """The caller went away; the sentence was dropped."""


class ShuttingDown(Exception):
    """The scheduler is stopping and takes no new work."""


class DecoderFailed(ShuttingDown):
    """A decode lane died; the server is restarting."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue_tokens: int = setting(
        16384,
        "source tokens of the sentences waiting, at most; a call that does not fit gets "
        "RESOURCE_EXHAUSTED at once",
        1,
        INT32,
    )
    max_call_tokens: int = setting(
        4096,
        "source tokens of one call, at most (INVALID_ARGUMENT above), so that no single call "
        "can fill the queue",
        1,
        INT32,
    )
    max_batch_rows: int = setting(64, "rows decoded together at most", 1, 65536)
    max_batch_tokens: int = setting(8192, "source tokens in the decoding batch at most", 1, INT32)
    max_wait_ms: float = setting(
        5.0, "how long an idle server waits for more sentences to fill a batch", 0, 10_000
    )
    lanes: int = setting(
        0,
        "batches decoded in parallel, each by its own thread (0: auto, one per usable core up "
        "to 4 on CPU, one on CUDA)",
        0,
        64,
    )

    max_failed_batches: int = setting(
        5,
        "decode batches failing in a row in one lane that stop the server (NOT_SERVING, exit 1): "
        "a fault that fails every batch, such as a sticky CUDA error, restarts the process "
        "instead of failing every call",
        1,
        1_000_000,
    )

    def __post_init__(self) -> None:
        over = self.max_call_tokens > self.max_queue_tokens
        check(self, "--max-call-tokens must not exceed --max-queue-tokens" if over else "")


def settle(
    fut: Future[SentenceResult],
    result: SentenceResult | None = None,
    error: BaseException | None = None,
) -> bool:
    """Completes fut, unless it is done already (its owner may cancel it at any moment, from
    any thread: checking first and setting after would race). Whether it was completed now."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]
        return True
    except InvalidStateError:
        return False


@dataclass(eq=False)
class _Pending:
    job: SentenceJob
    future: Future[SentenceResult]
    call: _Call


@dataclass(eq=False)
class _Call:
    """The waiting sentences of one submitted call, in order."""

    waiting: deque[_Pending] = field(default_factory=deque)
    tokens: int = 0

    @property
    def oldest(self) -> float:
        return self.waiting[0].job.enqueued_at


class Ticket:
    """What submitting a call returns: a future per sentence, and ``cancel()``, which drops the
    sentences that have not finished (queued ones leave the queue at once)."""

    def __init__(
        self,
        jobs: list[SentenceJob],
        futures: list[Future[SentenceResult]],
        canceller: Callable[[list[SentenceJob]], None],
    ) -> None:
        self.jobs, self.futures, self._canceller = jobs, futures, canceller

    def cancel(self) -> None:
        self._canceller(self.jobs)


class _Lane:
    """One decode thread's state: its engine, running batch rows and step time."""

    def __init__(self, index: int, engine: Engine) -> None:
        self.index = index
        self.engine = engine
        self.running: dict[int, _Pending] = {}  # id(job) → pending, for rows in its batch
        self.rows = 0  # live rows in its batch, as of its last admission check
        self.step_s = 0.0  # moving average of a decoder step's time
        self.admitting: list[_Pending] = []  # taken from the queue, not yet in its batch
        self.thread: threading.Thread | None = None
        self.alive = True
        self.failed_in_a_row = 0  # batches failed since its last good step


class Observer:
    """Hooks for metrics; the default does nothing."""

    def queue_depth(self, n: int) -> None: ...
    def admitted(self, stats: EncodeStats) -> None: ...
    def stepped(self, stats: StepStats) -> None: ...
    def finished(self, result: SentenceResult) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def failed(self, sentences: int) -> None: ...


def choose(
    calls: Sequence[Sequence[int]],
    free_rows: int,
    running_tokens: int,
    max_tokens: int,
    running: bool,
) -> list[int]:
    """Which waiting sentences join a batch: for each call (its waiting sentences' source
    lengths, in turn order), how many of its first sentences are taken.

    Round by round, each call in turn gives its next sentence while rows are free. A sentence
    that would take the batch past ``max_tokens`` source tokens ends its call's turns for this
    admission; if the very first one does not fit beside a running batch, nothing is taken (the
    batch must shrink first, so a long sentence is not passed over for ever). An empty batch
    always takes the first one."""
    taken = [0] * len(calls)
    blocked = [False] * len(calls)
    tokens, rows = running_tokens, 0
    for depth in range(max((len(c) for c in calls), default=0)):
        for i, lengths in enumerate(calls):
            if rows >= free_rows:
                return taken
            if blocked[i] or depth >= len(lengths):
                continue
            n = lengths[depth]
            if tokens + n > max_tokens and (rows or running):
                if not rows:  # the first candidate does not fit beside the running batch
                    return taken
                blocked[i] = True
                continue
            taken[i] += 1
            tokens += n
            rows += 1
    return taken


def fair_share(max_rows: int, queued: int, lane_rows: Sequence[int], lanes: int) -> int:
    """The most rows a lane should hold: max_rows for the only lane; with several, an even
    share of the work in flight (`queued` sentences and the rows of each lane still alive,
    `lane_rows`), rounded up, 1..max_rows."""
    if lanes == 1:
        return max_rows
    return max(1, min(max_rows, -(-(queued + sum(lane_rows)) // max(1, len(lane_rows)))))


def group_ready(queued: int, free: int, waited: float, patience: float) -> bool:
    """Whether a running batch with `free` rows (of its even share of max_batch_rows) takes
    the `queued` sentences now. Each admission is an encoder run, and small encoder batches
    cost up to 2.5x more per sentence, so it waits until half the free rows can be filled, or
    the oldest sentence has `waited` the patience: max_wait_ms or two decoder steps, whichever
    is longer (measured: +25% throughput on a d256 3+3 model at concurrency 64; a newcomer's
    latency grows by at most two steps)."""
    return queued >= max(1, free // 2) or waited >= patience


class Scheduler:
    """The queue and its decode lanes: one engine per lane (``Scheduler.over`` makes them),
    or one engine for a single lane."""

    def __init__(
        self,
        engine: Engine | list[Engine],
        cfg: SchedulerConfig | None = None,
        observer: Observer | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        engines = engine if isinstance(engine, list) else [engine]
        self.cfg = cfg or SchedulerConfig()
        if self.cfg.lanes not in (0, len(engines)):
            raise ValueError(f"{self.cfg.lanes} lanes configured, {len(engines)} engines given")
        self.engine = engines[0]
        self.obs = observer or Observer()
        self.on_fatal = on_fatal
        self._lanes = [_Lane(i, e) for i, e in enumerate(engines)]
        # A lane's rows when the work is spread evenly: the group sizes it waits for
        self._lane_rows = -(-self.cfg.max_batch_rows // len(self._lanes))
        self._calls: deque[_Call] = deque()  # calls with waiting sentences, in turn order
        self._queued = 0  # sentences waiting
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._failure: BaseException | None = None  # set when a lane died

    @classmethod
    def over(
        cls,
        runtime: Runtime,
        cfg: SchedulerConfig,
        observer: Observer | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> Scheduler:
        """cfg.lanes engines over one runtime (onnxruntime sessions take concurrent runs), each
        first allocating its cache for its share of the rows. lanes 0 counts as 1 here: resolve
        "auto" with ``service.runtime.plan_lanes`` first, as the translator does."""
        lanes = max(1, cfg.lanes)
        capacity = -(-cfg.max_batch_rows // lanes)
        limits = runtime.bundle.limits
        log.info("%d decode lane(s), %d intra-op thread(s) each", lanes, runtime.threads)
        engines = [Engine(runtime, limits, capacity) for _ in range(lanes)]
        return cls(engines, cfg, observer, on_fatal)

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> None:
        for lane in self._lanes:
            name = "nmtserve-decode" + (f"-{lane.index}" if len(self._lanes) > 1 else "")
            lane.thread = threading.Thread(target=self._run, args=(lane,), name=name, daemon=True)
            lane.thread.start()

    def submit(self, jobs: list[SentenceJob]) -> Ticket:
        """Queues all the jobs or none: QueueFull when they do not fit."""
        futures: list[Future[SentenceResult]] = [Future() for _ in jobs]
        call = _Call()
        for job, fut in zip(jobs, futures, strict=True):
            if job.source_ids and job.limit > 0:
                call.waiting.append(_Pending(job, fut, call))
                call.tokens += len(job.source_ids)
        if call.tokens > self.cfg.max_call_tokens:  # the translator refuses such calls first
            raise ValueError(
                f"{call.tokens} source tokens in one call, over the per-call limit of "
                f"{self.cfg.max_call_tokens}"
            )
        with self._cond:
            if self._failure is not None:
                raise DecoderFailed(f"the decoder failed ({self._failure}); restarting")
            if self._stopping:
                raise ShuttingDown("the server is draining")
            if self._queued_tokens + call.tokens > self.cfg.max_queue_tokens:
                raise QueueFull(
                    f"queue full: {self._queued_tokens} of {self.cfg.max_queue_tokens} source "
                    "tokens waiting"
                )
            if call.waiting:
                self._calls.append(call)
                self._queued += len(call.waiting)
                self._queued_tokens += call.tokens
                self.obs.queue_depth(self._queued)
                self._cond.notify()  # wake an idle lane only when there is work for it
        for job, fut in zip(jobs, futures, strict=True):
            if not (job.source_ids and job.limit > 0):
                settle(fut, self.engine.empty_result(job))
        return Ticket(jobs, futures, self.cancel)

    def cancel(self, jobs: list[SentenceJob]) -> None:
        """Drops these sentences: waiting ones leave the queue now (their futures fail), rows
        being decoded leave the batch at the lane's next step."""
        for job in jobs:
            job.cancelled.set()
        now = time.monotonic()
        ids = {id(j) for j in jobs}
        with self._cond:
            gone = self._take_out(lambda job: id(job) in ids)
            if gone:
                self.obs.queue_depth(self._queued)
        for p in gone:
            self._drop(p, now, "before it started")

    def stop(self, timeout: float | None = None) -> bool:
        """Refuses new work, finishes what was accepted, then ends the threads. Returns whether
        everything finished within timeout."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for lane in self._lanes:
            if lane.thread is not None:
                lane.thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(lane.thread is not None and lane.thread.is_alive() for lane in self._lanes)

    @property
    def queued(self) -> int:
        """Sentences waiting."""
        return self._queued

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def holding(self, request_id: str) -> int:
        """Sentences of the call(s) under this request id that the scheduler holds now: waiting
        in the queue, being admitted into a lane, or being decoded. 0 once a call has ended,
        whether its sentences finished or were dropped."""
        with self._cond:
            held = {id(p): p for call in self._calls for p in call.waiting}
            for lane in self._lanes:
                # a lane's own thread changes its rows without the lock; tuple() copies them in
                # one step under the GIL (a row moving from admitting to running is in both)
                held |= {id(p): p for p in (*lane.admitting, *tuple(lane.running.values()))}
        return sum(1 for p in held.values() if p.job.request_id == request_id)

    # ------------------------------------------------------------------ completion

    # Counted before the caller is told: a caller that has its answer finds it in the metrics.

    def _finish(self, lane: _Lane, job: SentenceJob, result: SentenceResult) -> None:
        p = lane.running.pop(id(job))
        self.obs.finished(result)
        settle(p.future, result)

    def _drop(self, p: _Pending, now: float, where: str) -> None:
        """Ends a sentence whose deadline passed or whose caller went away."""
        expired = p.job.expired(now)
        error: Exception = (
            DeadlineExceeded(f"deadline passed {where}")
            if expired
            else Cancelled(f"cancelled {where}")
        )
        self.obs.dropped("deadline" if expired else "cancelled")
        settle(p.future, error=error)

    def _fail(self, pending: list[_Pending], error: BaseException) -> None:
        for p in pending:
            settle(p.future, error=error)

    # ------------------------------------------------------------------ the decode threads

    def _run(self, lane: _Lane) -> None:
        """A lane's thread: the loop, and what happens if the loop itself dies."""
        try:
            self._loop(lane)
        except BaseException as e:  # a bug in the scheduler: nothing here may vanish silently
            log.critical("decode lane %d died", lane.index, exc_info=True)
            self._lane_died(lane, e)

    def _lane_died(self, lane: _Lane, error: BaseException) -> None:
        failure = DecoderFailed(f"decode lane {lane.index} died: {type(error).__name__}: {error}")
        if self.on_fatal is not None:  # first: health says NOT_SERVING before callers hear
            self.on_fatal(failure)
        with self._cond:
            lane.alive = False
            self._failure = failure
            lost = list(lane.running.values()) + lane.admitting
            lane.running.clear()
            lane.admitting = []
            if not any(x.alive for x in self._lanes):  # nobody is left to decode the queue
                for call in self._calls:
                    lost += call.waiting
                self._calls.clear()
                self._queued = self._queued_tokens = 0
            self._cond.notify_all()
        self._fail(lost, failure)
        self.obs.failed(len(lost))

    def _loop(self, lane: _Lane) -> None:
        engine = lane.engine
        batch: DecodeBatch | None = None
        while True:
            admit = self._take(lane, batch)
            if admit is None:  # stopping, nothing left anywhere
                return
            try:
                if admit:
                    batch = engine.admit(batch, [p.job for p in admit])
                    for p in admit:
                        lane.running[id(p.job)] = p
                    lane.admitting = admit = []
                    assert engine.last_encode is not None
                    self.obs.admitted(engine.last_encode)
                if batch is None:
                    continue
                done, batch, stats = engine.step(batch)
                lane.failed_in_a_row = 0
                lane.step_s = 0.9 * lane.step_s + 0.1 * stats.seconds
                self.obs.stepped(stats)
                for job, res in done:
                    self._finish(lane, job, res)
                batch = self._drop_dead(lane, batch)
            except Exception as e:  # one failing batch fails only its own sentences
                failed = list(lane.running.values()) + admit
                ids = sorted({p.job.request_id for p in failed} - {""})
                log.exception(  # the ids in the line's request_id(s) field (service.logs)
                    "decode batch failed: %d sentence(s) of %d request(s)",
                    len(failed),
                    len(ids),
                    extra={"request_ids": ids},
                )
                lane.running.clear()
                lane.admitting = []
                batch = None
                self._fail(failed, e)
                self.obs.failed(len(failed))
                lane.failed_in_a_row += 1
                if lane.failed_in_a_row >= self.cfg.max_failed_batches:  # not one batch's fault
                    n = lane.failed_in_a_row
                    raise RuntimeError(f"{n} decode batches failed in a row, the last: {e}") from e

    def _share(self) -> int:
        """The most rows this lane should hold now: its fair share of the work in flight."""
        alive = [x.rows for x in self._lanes if x.alive]
        return fair_share(self.cfg.max_batch_rows, self._queued, alive, len(self._lanes))

    def _remove(self, call: _Call, gone: list[_Pending]) -> None:
        """Takes sentences out of a call's waiting list (with the lock held)."""
        ids = {id(p) for p in gone}
        call.waiting = deque(p for p in call.waiting if id(p) not in ids)
        self._uncount(call, gone)
        if not call.waiting:
            self._calls.remove(call)

    def _uncount(self, call: _Call, gone: list[_Pending]) -> None:
        n = sum(len(p.job.source_ids) for p in gone)
        call.tokens -= n
        self._queued -= len(gone)
        self._queued_tokens -= n

    def _take_out(self, doomed: Callable[[SentenceJob], bool]) -> list[_Pending]:
        """Takes the sentences whose job is doomed out of the queue (with the lock held)."""
        out: list[_Pending] = []
        for call in list(self._calls):
            gone = [p for p in call.waiting if doomed(p.job)]
            if gone:
                self._remove(call, gone)
                out += gone
        return out

    def _take(self, lane: _Lane, batch: DecodeBatch | None) -> list[_Pending] | None:
        """Waits when idle, then picks sentences to admit: [] for none, None to exit."""
        dead: list[_Pending] = []
        with self._cond:
            lane.rows = len(batch.live) if batch is not None else 0
            if batch is None and not self._idle_wait():
                return None
            chosen = self._pick(lane, batch, dead) if self._calls else []
        now = time.monotonic()
        for p in dead:
            self._drop(p, now, "while queued")
        return chosen

    def _idle_wait(self) -> bool:
        """An idle lane waits for work, then max_wait_ms for more callers to share its first
        batch. False once stopping with nothing queued (with the lock held)."""
        while not self._calls:
            if self._stopping:
                return False
            self._cond.wait(0.5)
        wait_until = min(c.oldest for c in self._calls) + self.cfg.max_wait_ms / 1000.0
        while self._queued < self._lane_rows and not self._stopping and self._calls:
            left = wait_until - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        return True

    def _pick(self, lane: _Lane, batch: DecodeBatch | None, dead: list[_Pending]) -> list[_Pending]:
        """Sentences for this lane now, taken out of the queue (with the lock held). Expired
        and cancelled ones found on the way are moved to `dead`."""
        running = batch.live_rows() if batch is not None else []
        share = self._share()
        if not self._ready(lane, len(running), share):
            return []
        now = time.monotonic()
        dead += self._take_out(lambda job: job.expired(now) or job.cancelled.is_set())
        calls = list(self._calls)
        taken = choose(
            [[len(p.job.source_ids) for p in c.waiting] for c in calls],
            share - len(running),
            sum(r.source_len for r in running),
            self.cfg.max_batch_tokens,
            running=bool(running),
        )
        chosen = self._dequeue(calls, taken)
        lane.rows = len(running) + len(chosen)
        lane.admitting = chosen
        self.obs.queue_depth(self._queued)
        if self._calls and len(self._lanes) > 1:
            self._cond.notify()  # another lane may take what this one left
        return chosen

    def _ready(self, lane: _Lane, rows: int, share: int) -> bool:
        """Whether the lane admits now (with the lock held): under its share, and empty, or
        stopping, or with a group ready (``group_ready``)."""
        if rows >= share:
            return False
        if not rows or self._stopping:
            return True
        waited = time.monotonic() - min(c.oldest for c in self._calls)
        patience = max(self.cfg.max_wait_ms / 1e3, 2 * lane.step_s)
        return group_ready(self._queued, self._lane_rows - rows, waited, patience)

    def _dequeue(self, calls: list[_Call], taken: list[int]) -> list[_Pending]:
        """The first taken[i] sentences of calls[i], out of the queue (with the lock held)."""
        chosen: list[_Pending] = []
        for call, n in zip(calls, taken, strict=True):
            if not n:
                continue
            got = [call.waiting.popleft() for _ in range(n)]
            self._uncount(call, got)
            chosen += got
            self._calls.remove(call)
            if call.waiting:  # a served call goes to the back of the turn order
                self._calls.append(call)
        return chosen

    def _drop_dead(self, lane: _Lane, batch: DecodeBatch | None) -> DecodeBatch | None:
        """Rows whose caller cancelled or whose deadline passed leave the batch now."""
        if batch is None:
            return None
        now = time.monotonic()
        for i in batch.live:
            job = batch.rows[i].job  # type: ignore[union-attr]
            if job.cancelled.is_set() or job.expired(now):
                self._drop(lane.running.pop(id(job)), now, "while decoding")
                batch.release(i)
        return batch if batch.live else None
