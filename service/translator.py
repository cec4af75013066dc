"""The translation core: tokenization, request validation and decoding through the scheduler.

No gRPC here: the servicer converts protobuf to these calls and back. Validation errors carry
the field that is wrong (``sentences[3]``) so the servicer can report them precisely.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

import sentencepiece as spm

from service.bundle import Bundle
from service.engine import AttentionMode, DecodeOptions, SentenceJob, SentenceResult
from service.runtime import Runtime, RuntimeConfig, plan_lanes
from service.scheduler import Observer, Scheduler, SchedulerConfig
from service.worker import DecodeProcess, RuntimeInfo

_ATTENTION_MODES = frozenset(m.value for m in AttentionMode)


class InvalidRequest(ValueError):
    """A request the server will not decode; violations are (field, description) pairs."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{f}: {d}" for f, d in violations))


@dataclass(frozen=True)
class RequestOptions:
    max_output_tokens: int = 0
    attention: int = 0  # AttentionMode value
    attention_layer: int | None = None  # None: the last layer
    pieces: bool = False
    scores: bool = False
    alignment: bool = False


@dataclass
class Translation:
    result: SentenceResult
    text: str
    source_pieces: list[str] | None
    target_pieces: list[str] | None


class Translator:
    """Owns the tokenizer and the decoding for one bundle: a scheduler thread beside the
    sessions in this process (decode_in="thread"), or the same in a child process
    (decode_in="process", see ``service.worker``)."""

    def __init__(
        self,
        bundle: Bundle,
        runtime_cfg: RuntimeConfig | None = None,
        scheduler_cfg: SchedulerConfig | None = None,
        max_sentences: int = 256,
        observer: Observer | None = None,
        decode_in: str = "thread",
    ) -> None:
        if decode_in not in ("thread", "process"):
            raise ValueError(f"decode_in must be thread or process, not {decode_in!r}")
        self.bundle = bundle
        self.limits = bundle.limits
        self.max_sentences = max_sentences
        self.sp = spm.SentencePieceProcessor(model_file=str(bundle.tokenizer_path))
        self.n_layers = int(bundle.model["n_decoder_layers"])
        self.decode_in = decode_in
        scheduler_cfg = scheduler_cfg or SchedulerConfig()
        lanes, runtime_cfg = plan_lanes(scheduler_cfg.lanes, runtime_cfg or RuntimeConfig())
        scheduler_cfg = replace(scheduler_cfg, lanes=lanes)
        self.runtime: Runtime | None = None
        self.scheduler: Scheduler | DecodeProcess
        if decode_in == "process":
            self.scheduler = DecodeProcess(bundle.directory, runtime_cfg, scheduler_cfg, observer)
        else:
            self.runtime = Runtime(bundle, runtime_cfg)
            self.scheduler = Scheduler.over(self.runtime, scheduler_cfg, observer)

    @property
    def info(self) -> RuntimeInfo:
        """Execution provider, decoder and encoder settings actually in use."""
        if self.runtime is not None:
            return RuntimeInfo.of(self.runtime, self.scheduler.lanes)
        assert isinstance(self.scheduler, DecodeProcess) and self.scheduler.info is not None
        return self.scheduler.info

    def start(self) -> None:
        """Starts decoding (with a child process: once its sessions are loaded and warm)."""
        self.scheduler.start()

    def warm_up(self) -> None:
        """Each graph once, then one real decode through the scheduler, so the first caller
        pays no start-up cost."""
        if self.runtime is not None:
            self.runtime.warm_up()  # a decode process warms its own sessions up
        _, futures = self.submit(["warm up"], RequestOptions(max_output_tokens=4), None)
        for f in futures:
            f.result(timeout=60)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.sp.encode(text)]

    def validate(self, sentences: list[str], opts: RequestOptions) -> list[list[int]]:
        """Tokenizes and checks a request; raises InvalidRequest naming every problem."""
        problems: list[tuple[str, str]] = []
        if not sentences:
            problems.append(("sentences", "the request has no sentences"))
        if len(sentences) > self.max_sentences:
            problems.append(
                (
                    "sentences",
                    f"{len(sentences)} sentences, over the limit of {self.max_sentences} "
                    "per request",
                )
            )
        lim = self.limits
        if not 0 <= opts.max_output_tokens <= lim.max_target_tokens:
            problems.append(
                (
                    "options.max_output_tokens",
                    f"{opts.max_output_tokens} is out of range: 0 (model limit) to "
                    f"{lim.max_target_tokens}",
                )
            )
        if opts.attention not in _ATTENTION_MODES:
            problems.append(("options.attention", f"unknown attention mode {opts.attention}"))
        if opts.attention_layer is not None and not (
            -self.n_layers <= opts.attention_layer < self.n_layers
        ):
            problems.append(
                (
                    "options.attention_layer",
                    f"{opts.attention_layer} is out of range: the model has {self.n_layers} "
                    f"decoder layers (0..{self.n_layers - 1}, or -{self.n_layers}..-1)",
                )
            )
        encoded: list[list[int]] = []
        if len(sentences) <= self.max_sentences:
            for i, s in enumerate(sentences):
                ids = self.encode(s)
                if len(ids) > lim.max_source_tokens:
                    problems.append(
                        (
                            f"sentences[{i}]",
                            f"sentence {i} has {len(ids)} tokens, over the source limit of "
                            f"{lim.max_source_tokens} tokens",
                        )
                    )
                encoded.append(ids)
        if problems:
            raise InvalidRequest(problems)
        return encoded

    def submit(
        self, sentences: list[str], opts: RequestOptions, deadline: float | None
    ) -> tuple[list[SentenceJob], list[Future[SentenceResult]]]:
        """Validates and queues a request's sentences; the jobs let the caller cancel them."""
        encoded = self.validate(sentences, opts)
        layer = opts.attention_layer if opts.attention_layer is not None else -1
        dopts = DecodeOptions(
            max_output_tokens=opts.max_output_tokens,
            attention=AttentionMode(opts.attention),
            attention_layer=layer % self.n_layers,
            scores=opts.scores,
            alignment=opts.alignment,
        )
        now = time.monotonic()
        jobs = [
            SentenceJob(
                source_ids=ids,
                limit=self.limits.target_limit(len(ids), opts.max_output_tokens) if ids else 0,
                options=dopts,
                deadline=deadline,
                enqueued_at=now,
            )
            for ids in encoded
        ]
        return jobs, self.scheduler.submit(jobs)

    def finish(self, job: SentenceJob, result: SentenceResult, opts: RequestOptions) -> Translation:
        """The decoded text and, if asked, the pieces of a finished sentence."""
        text = self.sp.decode(result.token_ids).strip() if result.token_ids else ""
        src_pieces = tgt_pieces = None
        if opts.pieces:
            src_pieces = [self.sp.id_to_piece(t) for t in job.source_ids]
            tgt_pieces = [self.sp.id_to_piece(t) for t in result.token_ids]
        return Translation(result, text, src_pieces, tgt_pieces)

    def stop(self, timeout: float | None = None) -> bool:
        return self.scheduler.stop(timeout)
