"""The gRPC server (grpc.aio): a thin servicer over ``service.translator``.

Health (``grpc.health.v1``: NOT_SERVING until the bundle is loaded and warmed up, and again
while draining), server reflection, message-size limits, Prometheus metrics on their own port,
structured logs with a request id, and a graceful drain on SIGTERM: NOT_SERVING → refuse new
calls → finish in-flight work within the grace period → exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.bundle import load_bundle
from service.engine import SentenceJob, SentenceResult
from service.errors import NotReady, ResponseTooLarge, RpcError, abort, to_rpc_error
from service.metrics import Metrics
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from service.runtime import RuntimeConfig
from service.scheduler import (
    DeadlineExceeded,
    SchedulerConfig,
    ShuttingDown,
)
from service.security import TokenAuth, load_tokens, server_credentials
from service.settings import INT32, check, setting
from service.streaming import ResultBuffer, on_loop, stream, window_bytes
from service.translator import (
    CHARS_PER_CALL_TOKEN,
    MAX_REQUEST_ID,
    ModelInfo,
    RequestOptions,
    Translation,
    Translator,
)

log = logging.getLogger("nmtserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name
_DEADLINE_MARGIN_S = 0.01
_QUIET_S = 0.25  # a draining server stops once no call has arrived for this long
_STOP_FLOOR_S = 1.0  # gRPC's stop and the decode lanes' stop get at least this at the end

# Request ids for calls that bring none: a random per-process prefix and a counter (unique per
# server process, and cheaper per call than uuid4's system call for random bytes).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):08x}"


def _request_id(request: pb.TranslateRequest) -> str:
    """The caller's id when it is fit for logs and answers (else the call is refused, under
    an id of our own)."""
    rid = request.request_id
    return rid if rid and len(rid) <= MAX_REQUEST_ID and rid.isprintable() else new_request_id()


@dataclass(frozen=True)
class ServerConfig:
    """The server's own settings, and the runtime's and scheduler's (each in its own class)."""

    bundle: str = setting("", "model bundle directory (required)")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in a container)")
    port: int = setting(50051, "gRPC port (0: pick a free one, logged)", 0, 65535)
    metrics_port: int = setting(0, "Prometheus /metrics HTTP port (0: off)", 0, 65535)
    metrics_host: str = setting("127.0.0.1", "address of the metrics endpoint")
    max_sentences: int = setting(256, "sentences per request at most", 1, 1_000_000)
    max_call_chars: int = setting(
        0,
        "characters of one call's sentences together, at most (INVALID_ARGUMENT above), checked "
        "before tokenizing so that no call stalls the server on megabytes of text; a sentence "
        f"within the token limit is translated however many characters it has, up to this (0: "
        f"{CHARS_PER_CALL_TOKEN} per token of --max-call-tokens)",
        0,
        INT32,
    )
    max_message_bytes: int = setting(
        4 * 1024 * 1024, "largest gRPC message received or sent", 1024, INT32
    )
    result_buffer_bytes: int = setting(
        256 * 1024 * 1024,
        "bytes of results not yet received by their clients, all calls together, counted at "
        "their worst-case size from the moment a call is accepted until it ends (a stream "
        "reserves a window of up to 16 MiB); a call that does not fit gets RESOURCE_EXHAUSTED "
        "at once",
        1024,
        2**48,
    )
    drain_delay_s: float = setting(
        5.0,
        "after SIGTERM: seconds of NOT_SERVING while still serving, so that load balancers and "
        "health-checking clients move away before new calls are refused",
        0,
        3600,
    )
    grace_s: float = setting(
        20.0,
        "seconds accepted calls get to finish once new calls are refused (after the drain delay)",
        0,
        3600,
    )
    max_connection_age_s: float = setting(
        60.0,
        "seconds after which the server ends a client connection (GOAWAY, give or take a tenth), "
        "so that clients resolve the service name again and spread over replicas added since "
        "(0: never; else at least 1)",
        0,
        86400,
    )
    max_connection_age_grace_s: float = setting(
        30.0,
        "seconds the calls on a connection past its age get to finish before it is closed "
        "(calls still running then are cut: keep it above the longest call; at least 1)",
        0,
        86400,
    )
    tls_cert: str = setting("", "server certificate (PEM); with --tls-key enables TLS")
    tls_key: str = setting("", "server private key (PEM)")
    tls_client_ca: str = setting(
        "", "CA certificate (PEM) that client certificates must chain to: mutual TLS"
    )
    auth_tokens_file: str = setting(
        "", "file of bearer tokens, one per line; every RPC but health needs one"
    )
    auth_tokens: str = setting(
        "", "comma-separated bearer tokens (prefer the env variable or a file)", secret=True
    )
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        """Refuses a setting out of its range (NaN and infinity included), naming its flag."""
        # one connection may hold a quarter of the buffer, and must fit the largest answer
        small = self.result_buffer_bytes < 4 * self.max_message_bytes
        check(
            self,
            "--result-buffer-bytes must be at least 4 × --max-message-bytes" if small else "",
            *self._connection_age_problems(),
        )

    def _connection_age_problems(self) -> list[str]:
        """gRPC counts the age in whole milliseconds: under 1 ms it is 0, and every connection
        ended as it opened (calls hung until their deadline), and under a second clients only
        reconnect over and over. A grace under a second cuts calls under way when a connection
        ends (at 0, 55 of 1099 calls of a few ms failed UNAVAILABLE with an age of 1 s)."""
        age, grace = self.max_connection_age_s, self.max_connection_age_grace_s
        out = []
        if 0 < age < 1:
            out.append(f"--max-connection-age-s {age!r}: must be 0 (never) or at least 1")
        if age and grace < 1:
            out.append(
                f"--max-connection-age-grace-s {grace!r}: must be at least 1 with a connection age"
            )
        return out

    @classmethod
    def from_settings(cls, **values: Any) -> ServerConfig:
        """A config from flat settings (as flags name them): each goes to its class."""

        def take(kind: type[Any]) -> Any:
            return kind(**{f.name: values.pop(f.name) for f in fields(kind) if f.name in values})

        return cls(runtime=take(RuntimeConfig), scheduler=take(SchedulerConfig), **values)

    def longest_drain_s(self) -> float:
        """From SIGTERM to exit at worst (``Server.drain``): the drain delay, the grace, and the
        floor that gRPC's stop and the decode lanes' stop each get even with the grace spent."""
        return self.drain_delay_s + self.grace_s + 2 * _STOP_FLOOR_S


# Every class whose settings are serve flags, in --help order.
SETTINGS = (ServerConfig, RuntimeConfig, SchedulerConfig)


T = TypeVar("T")


def _unread(servicer: TranslatorServicer, method: str, message: Any) -> Callable[..., Any]:
    """The servicer's method as gRPC calls a request-streaming handler: the request not yet
    read, for the servicer to read and parse itself (``TranslatorServicer.serve``)."""

    async def call(_requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await servicer.serve(method, message, context)

    return call


def add_translator(servicer: TranslatorServicer, server: grpc.aio.Server) -> None:
    """Registers the Translator service as the generated add_TranslatorServicer_to_server
    does, except that every method is registered as taking a request stream, so that the
    servicer reads its one request itself. The wire is the same (a client of a unary method
    sends one message); what changes is who reads it. gRPC reads a unary request before it
    calls the handler, and a call that ends meanwhile (its deadline passes or its client
    cancels it while the event loop is behind) never reaches the handler, nor the request
    metrics: 240 to 268 of a burst of 300 calls with 50 ms deadlines or 20 ms cancels
    (tests/test_resilience.py)."""
    handlers = {
        "Translate": grpc.stream_unary_rpc_method_handler(
            _unread(servicer, "Translate", pb.TranslateRequest),
            response_serializer=pb.TranslateResponse.SerializeToString,
        ),
        "TranslateStream": grpc.stream_stream_rpc_method_handler(
            _unread(servicer, "TranslateStream", pb.TranslateRequest),
            response_serializer=pb.TranslationResult.SerializeToString,
        ),
        "GetModelInfo": grpc.stream_unary_rpc_method_handler(
            _unread(servicer, "GetModelInfo", pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


# ----------------------------------------------------------------------------- conversion


def request_options(o: pb.TranslateOptions) -> RequestOptions:
    return RequestOptions(
        max_output_tokens=o.max_output_tokens,
        attention=int(o.attention),
        attention_layer=o.attention_layer if o.HasField("attention_layer") else None,
        pieces=o.return_pieces,
        scores=o.return_scores,
        alignment=o.return_alignment,
        target_language=o.target_language,
    )


def result_message(index: int, t: Translation) -> pb.TranslationResult:
    r: SentenceResult = t.result
    msg = pb.TranslationResult(
        index=index, translation=t.text, token_ids=r.token_ids, finish_reason=r.finish_reason
    )
    if t.source_pieces is not None:
        msg.source_pieces.extend(t.source_pieces)
    if t.target_pieces is not None:
        msg.target_pieces.extend(t.target_pieces)
    if r.token_log_probs is not None:
        msg.token_log_probs.extend(r.token_log_probs)
        msg.sequence_log_prob = r.sequence_log_prob or 0.0
    if r.attention is not None:
        msg.attention.shape.extend(int(d) for d in r.attention.shape)
        msg.attention.values.extend(r.attention.ravel().tolist())
    if r.alignment is not None:
        msg.alignment.extend(r.alignment)
        msg.alignment_pharaoh = " ".join(f"{s}-{t}" for t, s in enumerate(r.alignment))
    return msg


# ----------------------------------------------------------------------------- servicer


def _all_done(
    loop: asyncio.AbstractEventLoop, futures: list[Future[SentenceResult]], timeout: float | None
) -> asyncio.Future[None]:
    """Resolves on the event loop once every future is done, or at the first failure: one
    wake-up per call, not per sentence; fails with DeadlineExceeded after `timeout` seconds.
    The decode threads' futures are never cancelled from here (the call cancels its Ticket)."""
    done: asyncio.Future[None] = loop.create_future()
    left = [len(futures)]
    lock = threading.Lock()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    def one(f: Future[SentenceResult]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last or f.cancelled() or f.exception() is not None:
            on_loop(loop, wake)

    if timeout is not None:
        timer = loop.call_later(timeout, _expire, done)
        done.add_done_callback(lambda _: timer.cancel())
    for f in futures:
        f.add_done_callback(one)
    return done


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(DeadlineExceeded("deadline passed before the translation finished"))


def _gone(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call gRPC ended under its handler, as its client sees it: its deadline
    (within the margin: gRPC's timer and ours read different clocks) or a cancel."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_MARGIN_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class TranslatorServicer(pb_grpc.TranslatorServicer):
    def __init__(self, translator: Translator | None, metrics: Metrics, cfg: ServerConfig) -> None:
        self._tr = translator
        self.metrics = metrics
        self.cfg = cfg
        self.draining = False
        self.active = 0  # calls inside a handler now
        self.last_call = 0.0  # time.monotonic() of the latest call's arrival (not refused)
        self.refused_draining = 0  # calls refused UNAVAILABLE while draining (one log line)
        self.results = ResultBuffer(cfg.result_buffer_bytes, metrics.result_buffer.set)
        # (active and last_call count accepted calls only)
        self._unread: set[asyncio.Task[Any]] = set()  # calls waiting for their request
        self._refusing: set[asyncio.Task[Any]] = set()  # of those, woken to be refused

    @property
    def tr(self) -> Translator:
        if self._tr is None:
            raise NotReady()
        return self._tr

    def ready(self, translator: Translator) -> None:
        self._tr = translator

    async def serve(self, method: str, message: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every RPC, from the moment gRPC hands it over: its request read and parsed, then
        the method; counted once, under the status its client sees."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            request = await self._read(method, message, context)
            return await getattr(self, method)(request, context)
        except asyncio.CancelledError:
            # gRPC ended the call: its client went away, its deadline passed (gRPC resets a
            # call whose deadline passes while its answer is being written), or the server
            # stopped
            code = _gone(context)
            raise
        except grpc.aio.AbortError:  # answered with a status
            code = context.code()
            raise
        except Exception:  # none comes past _call; gRPC would answer it UNKNOWN
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    async def _read(self, method: str, message: Any, context: grpc.aio.ServicerContext) -> Any:
        """The call's one request. Bytes that are not a valid message (a string field that is
        not UTF-8, a cut or corrupt message), no message, or a second one get INVALID_ARGUMENT
        naming the message (left to gRPC, a parse failed as UNKNOWN with an ERROR traceback
        in the log, and a second request was dropped without a word). A draining server
        refuses the call as it would once the request is read, and so also a call still
        waiting for it (``start_draining``), which would hold the stop for the whole grace."""
        if self.draining:
            await self._refuse(context)
        task = asyncio.current_task()
        assert task is not None
        self._unread.add(task)
        try:
            try:
                request, why = await self._receive(method, message, context)
            finally:
                self._unread.discard(task)
            if why:
                await abort(context, RpcError(grpc.StatusCode.INVALID_ARGUMENT, why))
            return request
        except asyncio.CancelledError:
            if task not in self._refusing:  # gRPC ended the call
                ended = self._ended_by(context, read=False)
                log.info("request %s, before it was read", ended, extra={"request_id": "-"})
                raise
        self._refusing.discard(task)
        await self._refuse(context)

    @staticmethod
    async def _receive(
        method: str, message: Any, context: grpc.aio.ServicerContext
    ) -> tuple[Any, str]:
        """(the request, "") or (None, why it is refused). A unary client sends its request
        and the end of its stream at once, so the second read costs no wait; a raw client that
        never ends its stream waits, until its deadline, as grpc-java's server has it wait."""
        name = message.DESCRIPTOR.full_name
        data = await context.read()
        if data is grpc.aio.EOF:  # gRPC ended the call first (abort raises), or none was sent
            return None, f"the call carried no {name} message"
        try:
            request = message.FromString(data)
        except Exception as e:  # google.protobuf.message.DecodeError, UnicodeDecodeError
            return None, f"the request is not a valid {name} message: {e}"
        if await context.read() is not grpc.aio.EOF:
            return None, f"the call carried more than one {name} message ({method} takes one)"
        return request, ""

    def start_draining(self) -> None:
        """From now on calls are refused UNAVAILABLE; those waiting for their request are
        woken to be refused at once (in ``_read``): a client that never sends it, or never
        ends its request stream, would otherwise hold the stop until the grace period ends."""
        self.draining = True
        for task in self._unread - self._refusing:
            self._refusing.add(task)
            task.cancel()

    async def _refuse(self, context: grpc.aio.ServicerContext) -> NoReturn:
        """A call refused while draining: answered and counted, logged once at the end of the
        drain."""
        self.refused_draining += 1
        await abort(context, to_rpc_error(ShuttingDown()))

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        request_id: str,
        body: Callable[[], Awaitable[T]],
    ) -> T:
        """Every RPC with a valid request runs through here: errors → status, a log line with
        the id."""
        if self.draining:
            await self._refuse(context)
        self.active += 1
        self.last_call = time.monotonic()
        try:
            return await body()
        except asyncio.CancelledError:
            log.info("request %s", self._ended_by(context), extra={"request_id": request_id})
            raise
        except Exception as e:
            if context.cancelled():  # gRPC ended the call meanwhile (its deadline): no answer
                log.info("request gone before its answer (%s)", e, extra={"request_id": request_id})
                raise asyncio.CancelledError() from e
            err = to_rpc_error(e)
            if err.code == grpc.StatusCode.INTERNAL:
                log.exception("request failed", extra={"request_id": request_id})
            else:
                log.info(
                    "request refused: %s %s",
                    err.code.name,
                    err.message,
                    extra={"request_id": request_id},
                )
            await abort(context, err)
        finally:
            self.active -= 1

    def _ended_by(self, context: grpc.aio.ServicerContext, read: bool = True) -> str:
        """Who ended a call that gRPC cancelled, for its log line. Before its request is read,
        gRPC's refusal of a request over --max-message-bytes looks the same as a cancel."""
        if _gone(context) == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "cancelled: its deadline passed"
        if self.draining:
            return "cancelled: the server stopped (grace period over) before it finished"
        if not read:
            return "cancelled by the client, or refused by gRPC (over --max-message-bytes)"
        return "cancelled by the client"

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        """When the call's sentences expire: when the handler stops waiting (``_patience``)."""
        patience = self._patience(context)
        return None if patience is None else time.monotonic() + patience

    @staticmethod
    def _patience(context: grpc.aio.ServicerContext) -> float | None:
        """Seconds to wait for results: the call's deadline less a margin, so that the caller
        is answered DEADLINE_EXCEEDED before gRPC itself cancels the call (which a client whose
        own timer runs late would see as CANCELLED)."""
        remaining = context.time_remaining()
        return None if remaining is None else max(0.0, remaining - _DEADLINE_MARGIN_S)

    def _prepare(
        self,
        request: pb.TranslateRequest,
        context: grpc.aio.ServicerContext,
        rid: str,
        streaming: bool,
    ) -> tuple[RequestOptions, list[SentenceJob]]:
        """The call's options and its validated sentences (InvalidRequest if not valid)."""
        self.tr.check_request_id(request.request_id)
        opts = request_options(request.options)
        deadline = self._deadline(context)
        return opts, self.tr.prepare(list(request.sentences), opts, deadline, rid, streaming)

    async def Translate(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> pb.TranslateResponse:
        rid = _request_id(request)

        async def body() -> pb.TranslateResponse:
            opts, jobs = self._prepare(request, context, rid, streaming=False)
            self.results.hold(self.tr.response_bound(jobs, opts), context)
            ticket = self.tr.queue(jobs)
            try:
                loop = asyncio.get_running_loop()
                await _all_done(loop, ticket.futures, self._patience(context))
                # Woken by the last result or by the first failure: raise that failure without
                # waiting (on the event loop) for sentences still decoding.
                for f in ticket.futures:
                    if f.done() and (f.cancelled() or f.exception() is not None):
                        f.result()
                results = [f.result() for f in ticket.futures]  # all done
            except BaseException:
                ticket.cancel()  # the call failed or went away: drop its other sentences
                raise
            response = pb.TranslateResponse(
                request_id=rid,
                results=[
                    result_message(i, self.tr.finish(ticket.jobs[i], r, opts))
                    for i, r in enumerate(results)
                ],
            )
            size = response.ByteSize()
            if size > self.cfg.max_message_bytes:
                raise ResponseTooLarge(
                    f"the response is {size:,} bytes, over the server's message limit of "
                    f"{self.cfg.max_message_bytes:,}: ask for fewer sentences or less attention"
                )
            return response

        return await self._call("Translate", context, rid, body)

    async def TranslateStream(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        rid = _request_id(request)

        async def body() -> int:
            opts, jobs = self._prepare(request, context, rid, streaming=True)

            async def write(i: int, result: SentenceResult) -> None:
                message = result_message(i, self.tr.finish(jobs[i], result, opts))
                try:
                    await context.write(message)
                except Exception as gone:  # the call ended under the write (cancel, deadline)
                    raise asyncio.CancelledError() from gone

            bounds = [self.tr.result_bytes(j, opts) for j in jobs]
            window = window_bytes(bounds, self.results.total)
            self.results.hold(window, context, stream=True)
            return await stream(self.tr, jobs, bounds, window, self._patience(context), write)

        await self._call("TranslateStream", context, rid, body)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        async def body() -> pb.ModelInfo:
            return model_info(self.tr.model_info())

        return await self._call("GetModelInfo", context, "-", body)


def model_info(info: ModelInfo) -> pb.ModelInfo:
    model, lim, corpus = info.model, info.limits, info.corpus
    return pb.ModelInfo(
        format_version=info.format_version,
        vocab_size=model["vocab_size"],
        d_model=model["d_model"],
        heads=model["n_heads"],
        encoder_layers=model.get("n_encoder_layers", 0),
        decoder_layers=model["n_decoder_layers"],
        max_source_tokens=lim.max_source_tokens,
        max_target_tokens=lim.max_target_tokens,
        target_tokens_a=lim.a,
        target_tokens_b=lim.b,
        max_sentences_per_request=info.max_sentences,
        execution_provider=info.provider,
        precision=info.precision,
        model_sha256=info.model_sha256,
        source_language=str(corpus.get("source_lang", "")),
        target_language=str(corpus.get("lang", "")),
        decode_lanes=info.lanes,
        threads_per_lane=info.threads,
        target_languages=info.target_languages,
        tokenizer=info.tokenizer,
        corpus=corpus_summary(corpus) if corpus else None,
        metrics=[test_metrics(p, m) for p, m in info.metrics.items()],
    )


def corpus_summary(c: dict[str, Any]) -> pb.CorpusSummary:
    return pb.CorpusSummary(
        kind=str(c.get("kind", "")),
        sizes={k: int(v) for k, v in c.get("sizes", {}).items()},
        seed=int(c.get("seed") or 0),
        files={
            split: f if isinstance(f, str) else " + ".join(f)
            for split, f in (c.get("files") or {}).items()
            if f
        },
        problems=int(c.get("problems") or 0),
    )


def test_metrics(precision: str, m: dict[str, Any]) -> pb.TestMetrics:
    return pb.TestMetrics(
        precision=precision,
        sentences=int(m.get("sentences", 0)),
        exact_match=float(m.get("exact_match", 0.0)),
        bleu=float(m.get("bleu", 0.0)),
        bleu_tokenize=str(m.get("bleu_tokenize", "")),
        chrf=float(m.get("chrf", 0.0)),
        exact_match_by_group={k: float(v) for k, v in m.get("exact_match_by_group", {}).items()},
        seconds=float(m.get("seconds", 0.0)),
    )


# ----------------------------------------------------------------------------- lifecycle


class Health(health.aio.HealthServicer):
    """grpc's health service, except that Watch streams end (with OK) when the server stops:
    an open Watch otherwise held the exit for the whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._closing: asyncio.Event | None = None  # made on the server's loop

    def _closed(self) -> asyncio.Event:
        if self._closing is None:
            self._closing = asyncio.Event()
        return self._closing

    async def Watch(self, request: Any, context: Any) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closed().wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, closing):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch  # raises what ended it, if not the close

    def close(self) -> None:
        """Ends every Watch (they have been told NOT_SERVING by then)."""
        self._closed().set()


class Server:
    """Builds and runs the whole server; ``run()`` returns when it has drained."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.health = Health()
        self.grpc: grpc.aio.Server | None = None
        self.translator: Translator | None = None
        self.servicer: TranslatorServicer | None = None
        self.port = cfg.port
        self._stop = asyncio.Event()
        self.exit_code = 0  # 1 after a fatal error: the supervisor should restart the process
        self.serving = False  # health has said SERVING
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        cfg = self.cfg
        opts = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if cfg.max_connection_age_s:  # gRPC's default: connections live for ever
            opts += [
                ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_s * 1000)),
            ]
        interceptors: list[grpc.aio.ServerInterceptor] = []
        tokens = load_tokens(cfg.auth_tokens_file, cfg.auth_tokens)
        if tokens:
            refused = self.metrics.requests.labels
            interceptors.append(TokenAuth(tokens, lambda m: refused(m, "UNAUTHENTICATED").inc()))
        auth = f"on, {len(tokens)} bearer token(s) accepted" if tokens else "off (no tokens)"
        log.info("authentication: %s", auth)
        if bool(cfg.tls_cert) != bool(cfg.tls_key):
            raise RuntimeError("--tls-cert and --tls-key go together")
        if cfg.tls_client_ca and not cfg.tls_cert:
            raise RuntimeError("--tls-client-ca needs --tls-cert and --tls-key")
        self.grpc = grpc.aio.server(options=opts, interceptors=interceptors)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.servicer = TranslatorServicer(None, self.metrics, cfg)
        add_translator(self.servicer, self.grpc)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port}")
        # Listen first (health answers NOT_SERVING), then load and warm up.
        await self.grpc.start()
        log.info(
            "listening on %s:%d (%s; NOT_SERVING while loading)",
            cfg.host,
            self.port,
            "mutual TLS" if cfg.tls_client_ca else "TLS" if cfg.tls_cert else "plaintext",
        )
        if cfg.metrics_port:
            self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, cfg.metrics_port)
        loop = asyncio.get_running_loop()
        self.translator = await loop.run_in_executor(None, self._load)
        await loop.run_in_executor(None, self.translator.warm_up)
        self.servicer.ready(self.translator)
        if self._stop.is_set():  # SIGTERM while loading: never say SERVING
            return
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        log.info("SERVING %s on %s:%d", cfg.bundle, cfg.host, self.port)

    def _load(self) -> Translator:
        cfg = self.cfg
        t = time.perf_counter()
        bundle = load_bundle(cfg.bundle)
        tr = Translator(
            bundle,
            cfg.runtime,
            cfg.scheduler,
            cfg.max_sentences,
            self.metrics,
            cfg.max_message_bytes,
            self._fatal_from_thread,
            cfg.max_call_chars,
        )
        tr.start()
        log.info("bundle loaded and verified in %.2fs", time.perf_counter() - t)
        return tr

    def request_stop(self) -> None:
        self._stop.set()

    def _fatal_from_thread(self, error: BaseException) -> None:
        """A decode lane died (called from its thread): stop serving and exit non-zero."""
        if self._loop is not None:
            on_loop(self._loop, self.fatal, error)

    def fatal(self, error: BaseException) -> None:
        log.critical("cannot go on serving (%s): draining, then exiting with code 1", error)
        self.exit_code = 1
        if self.servicer is not None:
            self.servicer.start_draining()
        self._stop.set()  # drain() turns health NOT_SERVING first

    async def drain(self) -> None:
        """NOT_SERVING, still serving for drain_delay_s (load balancers and health-checking
        clients move away), then new calls get UNAVAILABLE while every accepted and every
        already-received call finishes (within grace_s), then stop."""
        cfg = self.cfg
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        sv = self.servicer
        # No delay for a server that never served (stopped while loading, or failed to start)
        # or that cannot go on (a dead decode lane).
        delay = cfg.drain_delay_s if self.serving and not self.exit_code else 0.0
        log.info("draining: NOT_SERVING, serving %.1fs more, grace %.1fs", delay, cfg.grace_s)
        await asyncio.sleep(delay)
        end = time.monotonic() + cfg.grace_s
        if sv is not None:
            sv.start_draining()
            refusing = time.monotonic()
            # gRPC cancels calls it has received but not yet handed to a handler when it stops:
            # refuse for a moment first (those get UNAVAILABLE), and stop once no accepted call
            # is left in a handler. Callers that keep coming do not hold the drain up.
            while time.monotonic() < end and (
                sv.active or time.monotonic() - max(sv.last_call, refusing) < _QUIET_S
            ):
                await asyncio.sleep(0.02)
            if sv.refused_draining:
                log.info("refused %d call(s) while draining", sv.refused_draining)
        self.health.close()
        if self.grpc is not None:
            await self.grpc.stop(max(_STOP_FLOOR_S, end - time.monotonic()))
        if self.translator is not None:
            loop = asyncio.get_running_loop()
            left = max(_STOP_FLOOR_S, end - time.monotonic())
            done = await loop.run_in_executor(None, self.translator.stop, left)
            if not done:
                log.warning("decode lanes still busy after the grace period")
        log.info("drained, exiting")

    async def run(self, handle_signals: bool = True) -> None:
        """Starts, serves until SIGTERM/SIGINT (or request_stop()), then drains."""
        self._stop = asyncio.Event()  # bound to the loop that runs the server
        loop = self._loop = asyncio.get_running_loop()
        restore = self._take_signals(loop) if handle_signals else None
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.drain()
            if restore is not None:
                restore()

    def _take_signals(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """SIGTERM and SIGINT start the drain; returns what puts the previous handlers back.

        Not loop.add_signal_handler: asyncio learns of a signal from a byte in its self-pipe,
        which every call_soon_threadsafe writes to as well, and a dropped connection with
        thousands of sentences under way fills it (a wake-up per cancelled sentence); a signal
        arriving then was lost, and the pod was killed at the end of its grace period instead
        of draining. Here a socket that only signals write to wakes the loop, and the handler
        (which Python runs on this thread) schedules the stop: a full self-pipe delays it."""
        wake_r, wake_w = socket.socketpair()
        for s in (wake_r, wake_w):
            s.setblocking(False)

        def woken() -> None:
            with contextlib.suppress(OSError):
                wake_r.recv(4096)

        loop.add_reader(wake_r.fileno(), woken)
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        old = {
            sig: signal.signal(sig, lambda *_: loop.call_soon_threadsafe(self.request_stop))
            for sig in (signal.SIGTERM, signal.SIGINT)
        }

        def restore() -> None:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_fd)
            loop.remove_reader(wake_r.fileno())
            wake_r.close()
            wake_w.close()

        return restore
