"""The gRPC server (grpc.aio): a thin servicer over ``service.translator``.

Health (``grpc.health.v1``: NOT_SERVING until the bundle is loaded and warmed up, and again
while draining), server reflection, message-size limits, Prometheus metrics on their own port,
structured logs with a request id, and a graceful drain on SIGTERM: NOT_SERVING → refuse new
calls → finish in-flight work within the grace period → exit 0.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from service.bundle import Bundle, load_bundle
from service.engine import SentenceJob, SentenceResult
from service.metrics import Metrics
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from service.runtime import RuntimeConfig
from service.scheduler import Cancelled, DeadlineExceeded, QueueFull, SchedulerConfig, ShuttingDown
from service.security import TokenAuth, load_tokens, server_credentials
from service.translator import InvalidRequest, RequestOptions, Translation, Translator
from service.worker import DecodeProcessDied

log = logging.getLogger("nmtserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name

# Request ids for calls that bring none: a random per-process prefix and a counter (unique per
# server process, and cheaper per call than uuid4's system call for random bytes).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):08x}"


@dataclass(frozen=True)
class ServerConfig:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0  # 0: no metrics endpoint
    metrics_host: str = "127.0.0.1"
    provider: str = "auto"
    io_binding: str = "auto"
    kv_cache: str = "auto"
    decode_in: str = "thread"
    encoder_packing: str = "auto"
    precision: str = "fp32"
    threads: int = 0
    lanes: int = 0
    max_queue: int = 1024
    max_batch_rows: int = 64
    max_batch_tokens: int = 8192
    max_wait_ms: float = 5.0
    max_sentences: int = 256
    max_message_bytes: int = 4 * 1024 * 1024
    grace_s: float = 20.0
    tls_cert: str = ""  # PEM certificate (chain) of the server: enables TLS
    tls_key: str = ""  # its private key
    tls_client_ca: str = ""  # CA for client certificates: enables mutual TLS
    auth_tokens_file: str = ""  # one bearer token per line
    auth_tokens: str = ""  # comma-separated bearer tokens (prefer the environment or a file)


# ----------------------------------------------------------------------------- errors


class NotReady(Exception):
    """The bundle is still loading."""


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, details: list[Any] | None = None):
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or []


def to_rpc_error(e: BaseException) -> RpcError:
    """The one table from domain errors to gRPC status codes."""
    if isinstance(e, RpcError):
        return e
    if isinstance(e, InvalidRequest):
        br = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in e.violations
            ]
        )
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(e), [br])
    if isinstance(e, QueueFull):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later")
    if isinstance(e, DeadlineExceeded):
        return RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
    if isinstance(e, Cancelled):
        return RpcError(grpc.StatusCode.CANCELLED, str(e))
    if isinstance(e, DecodeProcessDied):
        return RpcError(grpc.StatusCode.UNAVAILABLE, f"{e}; retry shortly")
    if isinstance(e, ShuttingDown):
        return RpcError(grpc.StatusCode.UNAVAILABLE, "the server is draining; retry elsewhere")
    if isinstance(e, NotReady):
        return RpcError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
    return RpcError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


async def abort(context: grpc.aio.ServicerContext, err: RpcError) -> None:
    details = []
    for d in err.details:
        packed = any_pb2.Any()
        packed.Pack(d)
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, err.code.name), message=err.message, details=details
    )
    await context.abort_with_status(rpc_status.to_status(status))


T = TypeVar("T")


# ----------------------------------------------------------------------------- conversion


def request_options(o: pb.TranslateOptions) -> RequestOptions:
    return RequestOptions(
        max_output_tokens=o.max_output_tokens,
        attention=int(o.attention),
        attention_layer=o.attention_layer if o.HasField("attention_layer") else None,
        pieces=o.return_pieces,
        scores=o.return_scores,
        alignment=o.return_alignment,
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


class TranslatorServicer(pb_grpc.TranslatorServicer):
    def __init__(self, translator: Translator | None, metrics: Metrics, cfg: ServerConfig) -> None:
        self._tr = translator
        self.metrics = metrics
        self.cfg = cfg
        self.draining = False

    @property
    def tr(self) -> Translator:
        if self._tr is None:
            raise NotReady()
        return self._tr

    def ready(self, translator: Translator) -> None:
        self._tr = translator

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        request_id: str,
        body: Callable[[], Awaitable[T]],
    ) -> T:
        """Every RPC runs through here: errors → status, metrics, a log line with the id."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if self.draining:
                raise ShuttingDown()
            return await body()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            log.info("request cancelled by the client", extra={"request_id": request_id})
            raise
        except Exception as e:
            err = to_rpc_error(e)
            code = err.code
            if code == grpc.StatusCode.INTERNAL:
                log.exception("request failed", extra={"request_id": request_id})
            else:
                log.info(
                    "request refused: %s %s",
                    code.name,
                    err.message,
                    extra={"request_id": request_id},
                )
            await abort(context, err)
            raise AssertionError("abort returned") from e  # pragma: no cover
        finally:
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _submit(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[RequestOptions, list[SentenceJob], list[asyncio.Future[SentenceResult]]]:
        opts = request_options(request.options)
        jobs, futures = self.tr.submit(list(request.sentences), opts, self._deadline(context))
        return opts, jobs, [asyncio.wrap_future(f) for f in futures]

    async def Translate(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> pb.TranslateResponse:
        rid = request.request_id or new_request_id()

        async def body() -> pb.TranslateResponse:
            opts, jobs, futures = await self._submit(request, context)
            try:
                results = await asyncio.gather(*futures)
            except BaseException:
                for j in jobs:  # the call failed or went away: drop its other sentences
                    j.cancelled.set()
                raise
            return pb.TranslateResponse(
                request_id=rid,
                results=[
                    result_message(i, self.tr.finish(jobs[i], r, opts))
                    for i, r in enumerate(results)
                ],
            )

        return await self._call("Translate", context, rid, body)

    async def TranslateStream(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        rid = request.request_id or new_request_id()

        async def indexed(i: int, fut: Awaitable[SentenceResult]) -> tuple[int, SentenceResult]:
            return i, await fut

        async def body() -> int:
            opts, jobs, futures = await self._submit(request, context)
            try:
                for nxt in asyncio.as_completed([indexed(i, f) for i, f in enumerate(futures)]):
                    i, res = await nxt
                    await context.write(result_message(i, self.tr.finish(jobs[i], res, opts)))
            except BaseException:
                for j in jobs:  # the call failed or went away: drop its other sentences
                    j.cancelled.set()
                raise
            return len(futures)

        await self._call("TranslateStream", context, rid, body)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        async def body() -> pb.ModelInfo:
            return model_info(self.tr, self.cfg)

        return await self._call("GetModelInfo", context, "-", body)


def model_info(tr: Translator, cfg: ServerConfig) -> pb.ModelInfo:
    b: Bundle = tr.bundle
    m = b.manifest
    model = m["model"]
    lim = tr.limits
    corpus = m.get("corpus", {})
    part = "decoder_kv" if tr.info.inplace else "decoder"  # the decoder graph in use
    decoder_file = m["onnx"]["graphs"][cfg.precision][part]
    return pb.ModelInfo(
        format_version=m["format_version"],
        vocab_size=model["vocab_size"],
        d_model=model["d_model"],
        heads=model["n_heads"],
        encoder_layers=model.get("n_encoder_layers", 0),
        decoder_layers=model["n_decoder_layers"],
        max_source_tokens=lim.max_source_tokens,
        max_target_tokens=lim.max_target_tokens,
        target_tokens_a=lim.a,
        target_tokens_b=lim.b,
        max_sentences_per_request=tr.max_sentences,
        execution_provider=tr.info.provider,
        precision=cfg.precision,
        corpus_json=json.dumps(corpus),
        metrics_json=json.dumps(m.get("metrics", {})),
        model_sha256=b.sha256(decoder_file),
        source_language=str(corpus.get("source_lang", "")),
        target_language=str(corpus.get("lang", "")),
        decode_lanes=tr.info.lanes,
        threads_per_lane=tr.info.threads,
    )


# ----------------------------------------------------------------------------- lifecycle


class Server:
    """Builds and runs the whole server; ``run()`` returns when it has drained."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.health = health.aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.translator: Translator | None = None
        self.servicer: TranslatorServicer | None = None
        self.port = cfg.port
        self._stop = asyncio.Event()

    async def start(self) -> None:
        cfg = self.cfg
        opts = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        interceptors: list[grpc.aio.ServerInterceptor] = []
        tokens = load_tokens(cfg.auth_tokens_file, cfg.auth_tokens)
        if tokens:
            interceptors.append(TokenAuth(tokens))
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
        pb_grpc.add_TranslatorServicer_to_server(self.servicer, self.grpc)
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
            "listening on %s:%d (%s%s; NOT_SERVING while loading)",
            cfg.host,
            self.port,
            "mutual TLS" if cfg.tls_client_ca else "TLS" if cfg.tls_cert else "plaintext",
            f", {len(tokens)} bearer token(s) required" if tokens else "",
        )
        if cfg.metrics_port:
            self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, cfg.metrics_port)
        loop = asyncio.get_running_loop()
        self.translator = await loop.run_in_executor(None, self._load)
        await loop.run_in_executor(None, self.translator.warm_up)
        self.servicer.ready(self.translator)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s on %s:%d", cfg.bundle, cfg.host, self.port)

    def _load(self) -> Translator:
        cfg = self.cfg
        t = time.perf_counter()
        bundle = load_bundle(cfg.bundle)
        tr = Translator(
            bundle,
            RuntimeConfig(
                cfg.provider,
                cfg.precision,
                cfg.threads,
                io_binding=cfg.io_binding,
                kv_cache=cfg.kv_cache,
                packing=cfg.encoder_packing,
            ),
            SchedulerConfig(
                cfg.max_queue,
                cfg.max_batch_rows,
                cfg.max_batch_tokens,
                cfg.max_wait_ms,
                cfg.lanes,
            ),
            cfg.max_sentences,
            self.metrics,
            cfg.decode_in,
        )
        tr.start()
        log.info("bundle loaded and verified in %.2fs", time.perf_counter() - t)
        return tr

    def request_stop(self) -> None:
        self._stop.set()

    async def drain(self) -> None:
        """NOT_SERVING → refuse new calls → finish in-flight ones within the grace period."""
        log.info("draining: grace %.1fs", self.cfg.grace_s)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.servicer is not None:
            self.servicer.draining = True
        if self.grpc is not None:
            await self.grpc.stop(self.cfg.grace_s)
        if self.translator is not None:
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(None, self.translator.stop, self.cfg.grace_s)
            if not done:
                log.warning("decode thread still busy after the grace period")
        log.info("drained, exiting")

    async def run(self, handle_signals: bool = True) -> None:
        """Starts, serves until SIGTERM/SIGINT (or request_stop()), then drains."""
        self._stop = asyncio.Event()  # bound to the loop that runs the server
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.drain()
