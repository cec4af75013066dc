"""The translation core: tokenization, request validation and decoding through the scheduler.

No gRPC here: the servicer converts protobuf to these calls and back. Validation errors carry
the field that is wrong (``sentences[3]``) so the servicer can report them precisely.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from service.bundle import Bundle, Limits
from service.engine import AttentionMode, DecodeOptions, SentenceJob, SentenceResult
from service.runtime import Runtime, RuntimeConfig, plan_lanes
from service.scheduler import Observer, Scheduler, SchedulerConfig, Ticket
from service.tokenizer import TextTokenizer, load_tokenizer

_ATTENTION_MODES = frozenset(m.value for m in AttentionMode)
MAX_REQUEST_ID = 128


# A response also carries the request id: at most MAX_REQUEST_ID characters of up to 4 bytes
# each, with its tag and length.
_REQUEST_ID_BYTES = 4 * MAX_REQUEST_ID + 4
# Characters of one call's sentences together, at most (the server's --max-call-chars; 0, its
# default, follows --max-call-tokens): checked before anything is tokenized, since tokenizing
# runs on the event loop (about a microsecond a character: a megabyte stalls every call for a
# second). The token limits are what bound a sentence; this only bounds the work of finding
# out: 16 characters per token of the per-call limit (65,536 for the default 4096 tokens),
# several times what text in any script needs.
CHARS_PER_CALL_TOKEN = 16
MAX_VIOLATIONS = 10  # listed in an error (the rest counted), so that it fits the metadata limit


def language_code(target_language: str) -> str:
    """A request's target language as the model's vocabulary writes it: "fra" → ">>fra<<"
    (a code given with its brackets stays as it is); "" → ""."""
    code = target_language.strip()
    if not code or (code.startswith(">>") and code.endswith("<<")):
        return code
    return f">>{code}<<"


class InvalidRequest(ValueError):
    """A request the server will not decode; violations are (field, description) pairs, the
    first MAX_VIOLATIONS of them and then how many more there were (a client's default limit
    on the size of an error's metadata is 8 KiB)."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        more = len(violations) - MAX_VIOLATIONS
        self.violations = violations[:MAX_VIOLATIONS]
        if more > 0:
            self.violations.append(("", f"and {more} more problem(s) of the same request"))
        super().__init__("; ".join(f"{f}: {d}" if f else d for f, d in self.violations))


@dataclass(frozen=True)
class RequestOptions:
    max_output_tokens: int = 0
    attention: int = 0  # AttentionMode value
    attention_layer: int | None = None  # None: the last layer
    pieces: bool = False
    scores: bool = False
    alignment: bool = False
    target_language: str = ""  # a code of the model's target_languages, with or without >> <<


@dataclass
class Translation:
    result: SentenceResult
    text: str
    source_pieces: list[str] | None
    target_pieces: list[str] | None


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo reports: the bundle's model and limits, and the settings in use."""

    format_version: int
    model: dict[str, Any]  # the manifest's hyper-parameters
    limits: Limits
    max_sentences: int
    provider: str  # the execution provider that runs the graphs
    precision: str
    lanes: int
    threads: int  # intra-op threads of each lane
    model_sha256: str  # of the decoder graph being served
    corpus: dict[str, Any]  # the manifest's corpus summary ({} where it has none)
    metrics: dict[str, dict[str, Any]]  # test metrics per precision
    tokenizer: str  # the tokenizer kind: "sentencepiece" or "marian"
    target_languages: list[str]  # codes a request may choose (without >> <<); [] for one


class Translator:
    """Owns the tokenizer and the decoding for one bundle: the onnxruntime sessions and the
    scheduler's decode lanes, in this process."""

    def __init__(
        self,
        bundle: Bundle,
        runtime_cfg: RuntimeConfig | None = None,
        scheduler_cfg: SchedulerConfig | None = None,
        max_sentences: int = 256,
        observer: Observer | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        on_fatal: Callable[[BaseException], None] | None = None,
        max_call_chars: int = 0,
    ) -> None:
        self.bundle = bundle
        self.limits = bundle.limits
        self.max_sentences = max_sentences
        self.max_message_bytes = max_message_bytes
        self.tok: TextTokenizer = load_tokenizer(bundle)
        # The longest piece in bytes bounds the text of a translation of T tokens.
        self.max_piece_bytes = max(len(p.encode("utf-8")) for p in self.tok.all_pieces())
        self.n_layers = int(bundle.model["n_decoder_layers"])
        self.n_heads = int(bundle.model["n_heads"])
        scheduler_cfg = scheduler_cfg or SchedulerConfig()
        lanes, runtime_cfg = plan_lanes(scheduler_cfg.lanes, runtime_cfg or RuntimeConfig())
        scheduler_cfg = replace(scheduler_cfg, lanes=lanes)
        self.scheduler_cfg = scheduler_cfg
        tokens = scheduler_cfg.max_call_tokens
        self.max_call_chars = max_call_chars or CHARS_PER_CALL_TOKEN * tokens
        # where the cap comes from, in its refusals: the flag an operator would raise
        self._char_cap_origin = (
            "--max-call-chars"
            if max_call_chars
            else f"{CHARS_PER_CALL_TOKEN} per token of --max-call-tokens {tokens}, "
            "as --max-call-chars is 0"
        )
        self.runtime = Runtime(bundle, runtime_cfg)
        self.scheduler = Scheduler.over(self.runtime, scheduler_cfg, observer, on_fatal)

    def model_info(self) -> ModelInfo:
        rt, m = self.runtime, self.bundle.manifest
        decoder = self.bundle.graph(rt.cfg.precision, "decoder_kv" if rt.inplace else "decoder")
        return ModelInfo(
            format_version=int(m["format_version"]),
            model=self.bundle.model,
            limits=self.limits,
            max_sentences=self.max_sentences,
            provider=rt.provider,
            precision=rt.cfg.precision,
            lanes=self.scheduler.lanes,
            threads=rt.threads,
            model_sha256=self.bundle.sha256(decoder.name),
            corpus=m.get("corpus") or {},
            metrics=m.get("metrics") or {},
            tokenizer=self.tok.kind,
            target_languages=[c[2:-2] for c in self.tok.target_languages],
        )

    def start(self) -> None:
        """Starts the decode lanes."""
        self.scheduler.start()

    def warm_up(self) -> None:
        """Each graph once, then one real decode through the scheduler, so the first caller
        pays no start-up cost."""
        self.runtime.warm_up()
        ticket = self.queue(self.prepare(["warm up"], RequestOptions(max_output_tokens=4), None))
        for f in ticket.futures:
            f.result(timeout=60)

    def encode(self, text: str, target_language: str = "") -> list[int]:
        """Token ids of a sentence; a target language's code goes in front, as a user of a
        multilingual Marian model writes it (">>fra<< text")."""
        if not text:
            return []  # an empty sentence translates to an empty one, whatever the tokenizer
        code = language_code(target_language)
        return self.tok.encode(f"{code} {text}" if code else text)

    def validate(
        self, sentences: list[str], opts: RequestOptions, streaming: bool = False
    ) -> list[list[int]]:
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
        option_problems = self._option_problems(opts)
        problems += option_problems
        # a code that is refused is not put in front of the sentences: a sentence is reported
        # over the source limit for its own tokens, not for those of a code it will never get
        refused = any(f == "options.target_language" for f, _ in option_problems)
        language = "" if refused else opts.target_language
        encoded: list[list[int]] = []
        if len(sentences) <= self.max_sentences:
            too_long = self._character_problems(sentences)
            problems += too_long
            if not too_long:
                encoded = self._encode_all(sentences, problems, language)
        if not problems:
            problems += self._check_size(encoded, opts, streaming)
        if problems:
            raise InvalidRequest(problems)
        return encoded

    def _option_problems(self, opts: RequestOptions) -> list[tuple[str, str]]:
        problems = self._language_problems(opts.target_language)
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
        return problems

    def _language_problems(self, target_language: str) -> list[tuple[str, str]]:
        if not target_language:
            return []
        codes = self.tok.target_languages
        if not codes:
            return [
                (
                    "options.target_language",
                    "this model has no target-language codes: leave target_language empty",
                )
            ]
        if language_code(target_language) not in codes:
            shown = ", ".join(c[2:-2] for c in codes[:20]) + (", …" if len(codes) > 20 else "")
            # at most 40 characters of it: the whole error must fit gRPC's metadata limit
            given = repr(target_language[:40]) + ("…" if len(target_language) > 40 else "")
            return [
                (
                    "options.target_language",
                    f"unknown target language {given}; this model knows {shown}",
                )
            ]
        return []

    def _character_problems(self, sentences: list[str]) -> list[tuple[str, str]]:
        """A call over the character limit, refused before any of it is tokenized: each
        sentence over the limit by itself named, else the call."""
        cap = self.max_call_chars
        chars = sum(len(s) for s in sentences)
        if chars <= cap:
            return []
        limit = f"the server's limit of {cap} characters per call ({self._char_cap_origin})"
        named = [
            (
                f"sentences[{i}]",
                f"sentence {i} has {len(s)} characters, over {limit}: refused before tokenizing",
            )
            for i, s in enumerate(sentences)
            if len(s) > cap
        ]
        return named or [
            ("sentences", f"{chars} characters in one call, over {limit}: split the request")
        ]

    def _encode_all(
        self, sentences: list[str], problems: list[tuple[str, str]], target_language: str = ""
    ) -> list[list[int]]:
        """Every sentence's token ids; those over the source limit are added to problems."""
        lim = self.limits
        encoded: list[list[int]] = []
        for i, s in enumerate(sentences):
            ids = self.encode(s, target_language)
            if len(ids) > lim.max_source_tokens:
                problems.append(
                    (
                        f"sentences[{i}]",
                        f"sentence {i} has {len(ids)} tokens, over the source limit of "
                        f"{lim.max_source_tokens} tokens",
                    )
                )
            encoded.append(ids)
        return encoded

    @staticmethod
    def check_request_id(request_id: str) -> None:
        """A caller's request id is echoed in the answer and in log lines: short and printable."""
        if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
            raise InvalidRequest(
                [
                    (
                        "request_id",
                        f"at most {MAX_REQUEST_ID} printable characters "
                        f"(got {len(request_id)} characters)",
                    )
                ]
            )

    def _check_size(
        self, encoded: list[list[int]], opts: RequestOptions, streaming: bool
    ) -> list[tuple[str, str]]:
        """The work one call may queue, and the size of the answer it asks for, against the
        per-call limit and the message limit: refused before any decoding."""
        tokens = sum(len(ids) for ids in encoded)
        cap = self.scheduler_cfg.max_call_tokens
        if tokens > cap:
            return [
                (
                    "sentences",
                    f"{tokens} source tokens in one call, over the per-call limit of {cap}: "
                    "split the request",
                )
            ]
        sizes = [
            self.response_bytes(len(ids), self._limit(ids, opts), opts) for ids in encoded if ids
        ]
        size = max(sizes, default=0) if streaming else sum(sizes) + _REQUEST_ID_BYTES
        if size <= self.max_message_bytes:
            return []
        what = "one result" if streaming else f"the response to {len(encoded)} sentences"
        field = "options.attention" if opts.attention else "sentences"
        # a stream sends each result alone: fewer sentences or streaming would not help it
        hint = (
            "less attention (one layer, averaged) or a lower max_output_tokens"
            if streaming
            else "less attention (one layer, averaged), a lower max_output_tokens, fewer "
            "sentences per call, or use TranslateStream"
        )
        return [
            (
                field,
                f"{what} could reach {size:,} bytes, over the server's message limit of "
                f"{self.max_message_bytes:,}: ask for {hint}",
            )
        ]

    def response_bytes(self, source_len: int, limit: int, opts: RequestOptions) -> int:
        """An upper bound on one serialized TranslationResult of at most `limit` tokens."""
        t, s = limit, source_len
        n = 64 + t * (5 + self.max_piece_bytes)  # fields, token ids, the translation's text
        if opts.pieces:
            n += (s + t) * (self.max_piece_bytes + 2)
        if opts.scores:
            n += 16 + 5 * t
        if opts.alignment:
            n += 16 + t * 16  # ids, and "s-t" pairs
        cells = {
            AttentionMode.LAYER_AVERAGE: t * s,
            AttentionMode.LAYER_HEADS: self.n_heads * t * s,
            AttentionMode.ALL_LAYERS: self.n_layers * self.n_heads * t * s,
        }.get(AttentionMode(opts.attention), 0)
        if cells:
            n += 32 + 4 * cells
        return n + 8  # its tag and length inside the response

    def _limit(self, ids: list[int], opts: RequestOptions) -> int:
        return self.limits.target_limit(len(ids), opts.max_output_tokens) if ids else 0

    def queue(self, jobs: list[SentenceJob]) -> Ticket:
        """Queues prepared sentences (all or none: QueueFull when they do not fit)."""
        return self.scheduler.submit(jobs)

    def prepare(
        self,
        sentences: list[str],
        opts: RequestOptions,
        deadline: float | None,
        request_id: str = "",
        streaming: bool = False,
    ) -> list[SentenceJob]:
        """Validates a request: its sentences as jobs, for ``queue`` (a stream queues them a
        window at a time)."""
        encoded = self.validate(sentences, opts, streaming)
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
                limit=self._limit(ids, opts),
                options=dopts,
                deadline=deadline,
                enqueued_at=now,
                request_id=request_id,
            )
            for ids in encoded
        ]
        return jobs

    def response_bound(self, jobs: list[SentenceJob], opts: RequestOptions) -> int:
        """An upper bound on the serialized TranslateResponse to these sentences."""
        return sum(self.result_bytes(j, opts) for j in jobs) + _REQUEST_ID_BYTES

    def result_bytes(self, job: SentenceJob, opts: RequestOptions) -> int:
        """An upper bound on the serialized result of a prepared sentence."""
        return self.response_bytes(len(job.source_ids), job.limit, opts)

    def finish(self, job: SentenceJob, result: SentenceResult, opts: RequestOptions) -> Translation:
        """The decoded text and, if asked, the pieces of a finished sentence."""
        text = self.tok.decode(result.token_ids) if result.token_ids else ""
        src_pieces = tgt_pieces = None
        if opts.pieces:
            src_pieces = self.tok.source_pieces(job.source_ids)
            tgt_pieces = self.tok.target_pieces(result.token_ids)
        return Translation(result, text, src_pieces, tgt_pieces)

    def stop(self, timeout: float | None = None) -> bool:
        return self.scheduler.stop(timeout)
