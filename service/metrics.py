"""Prometheus metrics, served on their own HTTP port (``--metrics-port``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from service.engine import EncodeStats, SentenceResult, StepStats
from service.scheduler import Observer

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STEP = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics(Observer):
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "nmtserve_requests", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "nmtserve_request_seconds", "RPC latency", ["method"], buckets=_LATENCY, registry=r
        )
        self.sentences = Counter(
            "nmtserve_sentences", "Sentences finished, by reason", ["finish_reason"], registry=r
        )
        self.dropped_total = Counter(
            "nmtserve_sentences_dropped",
            "Sentences dropped before or while decoding (cancelled, deadline)",
            ["reason"],
            registry=r,
        )
        self.failed_total = Counter(
            "nmtserve_sentences_failed",
            "Sentences failed by an error in decoding (their batch, or a dead decode lane)",
            registry=r,
        )
        self.queue = Gauge("nmtserve_queue_depth", "Sentences waiting in the queue", registry=r)
        self.result_buffer = Gauge(
            "nmtserve_result_buffer_bytes",
            "Bytes reserved by the calls in progress for results not yet received by their clients",
            registry=r,
        )
        self.queue_clock = QueueClock()
        r.register(self.queue_clock)
        self._add_decoding(r)

    def _add_decoding(self, r: CollectorRegistry) -> None:
        """What the decode lanes do: admissions, steps, rows, encoder and decoder times."""
        self.batches = Counter(
            "nmtserve_batches",
            "Encoder runs: groups of sentences admitted into the decoding batch together",
            registry=r,
        )
        self.steps = Counter("nmtserve_decode_steps", "Decoder steps run", registry=r)
        self.late_rows = Counter(
            "nmtserve_decode_rows_past_deadline",
            "Rows decoded in a step that began after their sentence's deadline: work for nobody "
            "(the row leaves the batch after that step, so at most one per sentence)",
            registry=r,
        )
        self.rows = Histogram(
            "nmtserve_batch_rows",
            "Live rows per decoder step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.padding = Histogram(
            "nmtserve_padding_waste",
            "Share of source positions computed for no live row (padding, free slots), per step",
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.tokens = Counter("nmtserve_tokens_generated", "Output tokens generated", registry=r)
        self.encoder_runs = Counter(
            "nmtserve_encoder_runs",
            "Encoder runs by layout: packed (real tokens end to end) or padded",
            ["layout"],
            registry=r,
        )
        self.encoder_positions = Counter(
            "nmtserve_encoder_positions",
            "Source positions the encoder computed: real tokens, or padding",
            ["kind"],
            registry=r,
        )
        self.encoder_seconds = Histogram(
            "nmtserve_encoder_seconds", "Encoder run time", buckets=_STEP, registry=r
        )
        self.decoder_seconds = Histogram(
            "nmtserve_decoder_step_seconds", "Decoder step time", buckets=_STEP, registry=r
        )

    # Observer hooks, called from the decode thread
    def queue_depth(self, n: int) -> None:
        self.queue.set(n)
        self.queue_clock.depth(n)

    def admitted(self, stats: EncodeStats) -> None:
        self.batches.inc()
        self.encoder_runs.labels("packed" if stats.packed else "padded").inc()
        self.encoder_positions.labels("token").inc(stats.tokens)
        self.encoder_positions.labels("padding").inc(stats.positions - stats.tokens)
        self.encoder_seconds.observe(stats.seconds)

    def stepped(self, stats: StepStats) -> None:
        self.steps.inc()
        self.late_rows.inc(stats.late_rows)
        self.rows.observe(stats.rows)
        self.padding.observe(stats.padding_waste)
        self.decoder_seconds.observe(stats.seconds)

    def finished(self, result: SentenceResult) -> None:
        self.sentences.labels(result.finish_reason).inc()
        self.tokens.inc(len(result.token_ids))

    def dropped(self, reason: str) -> None:
        self.dropped_total.labels(reason).inc()

    def failed(self, sentences: int) -> None:
        self.failed_total.inc(sentences)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Starts the /metrics HTTP endpoint in a background thread."""
        start_http_server(port, addr=host, registry=self.registry)


class QueueClock(Collector):
    """How long sentences wait in the queue, the autoscaling signal (deploy/k8s): the sentence-
    seconds spent waiting, all sentences together, and the sentences that left the queue, as
    two counters. Over a window, the first's rate is the queue's time-averaged depth and the
    ratio of the two rates is the mean wait of a sentence before decoding starts. A pod that
    keeps up queues a sentence only for the scheduler's grouping (max_wait_ms or two decoder
    steps); a pod that cannot keep up makes it wait longer and longer, whatever the model size,
    which is what adding a pod cures. CPU use is no such signal: a decode lane keeps its core
    busy while it holds a single sentence.

    Fed by the scheduler's queue_depth hook, whose every call either adds sentences (a call
    queued) or takes some away (admitted, cancelled, expired). The wait is integrated exactly
    between changes and up to the moment of each scrape, so a stuck queue keeps counting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._since = time.monotonic()
        self._waited = 0.0  # sentence-seconds up to self._since
        self._left = 0

    def depth(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._waited += self._depth * (now - self._since)
            self._left += max(0, self._depth - n)
            self._depth, self._since = n, now

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            waited = self._waited + self._depth * (time.monotonic() - self._since)
            left = self._left
        yield CounterMetricFamily(
            "nmtserve_queue_wait_seconds",
            "Seconds sentences spent waiting in the queue, all sentences together",
            value=waited,
        )
        yield CounterMetricFamily(
            "nmtserve_queue_exits",
            "Sentences that left the queue: taken into a batch, cancelled or expired",
            value=left,
        )
