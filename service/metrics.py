"""Prometheus metrics, served on their own HTTP port (``--metrics-port``)."""

from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from service.engine import EncodeStats, SentenceResult, StepStats
from service.scheduler import Observer

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STEP = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics(Observer):
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        counter, gauge = partial(Counter, registry=r), partial(Gauge, registry=r)
        histogram = partial(Histogram, registry=r)
        self.requests = counter(
            "nmtserve_requests", "RPCs by method and status code", ["method", "code"]
        )
        self.latency = histogram(
            "nmtserve_request_seconds", "RPC latency", ["method"], buckets=_LATENCY
        )
        self.sentences = counter(
            "nmtserve_sentences", "Sentences finished, by reason", ["finish_reason"]
        )
        self.dropped_total = counter(
            "nmtserve_sentences_dropped",
            "Sentences dropped before or while decoding (cancelled, deadline)",
            ["reason"],
        )
        self.failed_total = counter(
            "nmtserve_sentences_failed",
            "Sentences failed by an error in decoding (their batch, or a dead decode lane)",
        )
        self.queue = gauge("nmtserve_queue_depth", "Sentences waiting in the queue")
        self.result_buffer = gauge(
            "nmtserve_result_buffer_bytes",
            "Bytes reserved by the calls in progress for results not yet received by their clients",
        )
        self.batches = counter(
            "nmtserve_batches",
            "Encoder runs: groups of sentences admitted into the decoding batch together",
        )
        self.steps = counter("nmtserve_decode_steps", "Decoder steps run")
        self.rows = histogram(
            "nmtserve_batch_rows",
            "Live rows per decoder step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.padding = histogram(
            "nmtserve_padding_waste",
            "Share of source positions computed for no live row (padding, free slots), per step",
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
        )
        self.tokens = counter("nmtserve_tokens_generated", "Output tokens generated")
        self.encoder_runs = counter(
            "nmtserve_encoder_runs",
            "Encoder runs by layout: packed (real tokens end to end) or padded",
            ["layout"],
        )
        self.encoder_positions = counter(
            "nmtserve_encoder_positions",
            "Source positions the encoder computed: real tokens, or padding",
            ["kind"],
        )
        self.encoder_seconds = histogram(
            "nmtserve_encoder_seconds", "Encoder run time", buckets=_STEP
        )
        self.decoder_seconds = histogram(
            "nmtserve_decoder_step_seconds", "Decoder step time", buckets=_STEP
        )

    # Observer hooks, called from the decode thread
    def queue_depth(self, n: int) -> None:
        self.queue.set(n)

    def admitted(self, stats: EncodeStats) -> None:
        self.batches.inc()
        self.encoder_runs.labels("packed" if stats.packed else "padded").inc()
        self.encoder_positions.labels("token").inc(stats.tokens)
        self.encoder_positions.labels("padding").inc(stats.positions - stats.tokens)
        self.encoder_seconds.observe(stats.seconds)

    def stepped(self, stats: StepStats) -> None:
        self.steps.inc()
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
