"""Client library and command-line client for the nmtserve gRPC API.

`TranslatorClient` is a thin wrapper over the generated stub: it owns the channel (plain or TLS,
one server or a round-robin list), puts the bearer token and the deadline on every call, and
turns keyword arguments into a `TranslateRequest`. It returns the protobuf messages unchanged so
that callers see exactly what the server sent (the proto file is the documentation).

`add_translate_args` / `run_translate` are the `python -m service translate` subcommand; the
service CLI wires them in.

Like the rest of `service/`, this module never imports torch or `export/`, and matplotlib is
imported only when a heatmap is drawn, so the client needs nothing beyond the serving extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Any, Literal, TextIO

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc

__all__ = [
    "ATTENTION_MODES",
    "DEFAULT_TARGET",
    "TARGET_ENV",
    "TOKEN_ENV",
    "AttentionName",
    "TranslatorClient",
    "add_translate_args",
    "attention_array",
    "attention_matrix",
    "resolve_target",
    "run_translate",
    "save_attention_png",
    "wait_serving",
]

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "NMTSERVE_TARGET"
TOKEN_ENV = "NMTSERVE_TOKEN"

AttentionName = Literal["none", "layer-average", "layer-heads", "all"]
# CLI spelling -> proto enum. The CLI names are the public vocabulary; the enum stays internal.
ATTENTION_MODES: dict[str, pb.AttentionMode] = {
    "none": pb.ATTENTION_NONE,
    "layer-average": pb.ATTENTION_LAYER_AVERAGE,
    "layer-heads": pb.ATTENTION_LAYER_HEADS,
    "all": pb.ATTENTION_ALL_LAYERS,
}

# gRPC's default 4 MiB receive limit is far too small once attention is requested: "all" returns
# layers × heads × target × source floats per sentence, times a whole batch. The client chose to
# ask for it, so the client accepts it; 512 MiB still stops a runaway response.
_MAX_RECEIVE_BYTES = 512 * 1024 * 1024

# Every channel of the client: round_robin over all the addresses the target resolves to, each
# address watched through grpc.health.v1 (a replica that says NOT_SERVING, loading or draining,
# gets no new calls), and calls that end UNAVAILABLE retried with backoff (on another replica
# where there is one; translating is idempotent). A server without the health service counts as
# healthy.
TRANSLATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Translator"].full_name
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": TRANSLATOR_SERVICE},
        "methodConfig": [
            {
                "name": [{"service": TRANSLATOR_SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
# Targets that already name a gRPC resolver scheme are passed through untouched.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


# --------------------------------------------------------------------------------------------
# Target parsing


def _split_host_port(item: str) -> tuple[str, int]:
    """Splits `host:port` or `[v6]:port`; raises ValueError naming the bad item."""
    if item.startswith("["):
        host, sep, port = item[1:].partition("]:")
    else:
        host, sep, port = item.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {item!r}: expected host:port")
    return host, int(port)


def _ip_literals(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IP address(es) for one host of a comma-separated target.

    gRPC's `ipv4:`/`ipv6:` address lists take literal IPs only. "localhost" maps to 127.0.0.1
    without a lookup (the common local multi-replica case, and it must not pick ::1 on hosts
    where the servers listen on IPv4 only). Other names are resolved once, here, to all their
    IPv4 addresses: the list is then fixed for the channel's life — use `dns:///name:port` with
    round_robin when the set of addresses changes.
    """
    if host == "localhost":
        return [ipaddress.IPv4Address("127.0.0.1")]
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as err:
        raise ValueError(f"cannot resolve {host!r}: {err}") from err
    return list(dict.fromkeys(ipaddress.IPv4Address(info[4][0]) for info in infos))


def resolve_target(target: str) -> str:
    """The gRPC target string for `target`.

    A single `host:port` (or any target with a resolver scheme) is returned unchanged. A
    comma-separated list `host:p1,host:p2` — several replicas of the server — becomes a static
    address list `ipv4:127.0.0.1:p1,127.0.0.1:p2` (or `ipv6:[::1]:p1,...`), the only form in
    which gRPC accepts several addresses for one channel. Raises ValueError for malformed
    items, unresolvable names, or a list that mixes IPv4 and IPv6.
    """
    target = target.strip()
    if "," not in target or target.startswith(_SCHEMES):
        return target
    items = [item.strip() for item in target.split(",") if item.strip()]
    addresses: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    for item in items:
        host, port = _split_host_port(item)
        addresses += [(ip, port) for ip in _ip_literals(host, port)]
    versions = {ip.version for ip, _ in addresses}
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in addresses)
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in addresses)
    raise ValueError(f"bad target {target!r}: cannot mix IPv4 and IPv6 addresses in one list")


# --------------------------------------------------------------------------------------------
# The client


def wait_serving(
    target: str, proc: subprocess.Popen[Any] | None = None, timeout: float = 120
) -> None:
    """Waits until the server at `target` says SERVING on grpc.health.v1; raises RuntimeError if
    `proc` (the server's process, when this side started it) exits first or time runs out."""
    end = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        hs = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}")
            try:
                status = hs.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"the server did not become ready in {timeout:.0f} s")
            time.sleep(0.05)


class TranslatorClient:
    """A connection to one nmtserve server (or a round-robin set of replicas).

    The channel connects lazily: constructing a client never fails because the server is down;
    the first call does, with UNAVAILABLE. Calls raise `grpc.RpcError` unchanged, so callers can
    read the status code and the rich details (see `run_translate` for an example).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        tls_ca: str | None = None,
        token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        """Opens the channel.

        target: `host:port`, a gRPC target with a scheme (`dns:///svc:50051`), or a
            comma-separated `host:p1,host:p2` list of replicas. Calls are balanced round-robin
            over every address, skip replicas whose health service says NOT_SERVING, and are
            retried on UNAVAILABLE (SERVICE_CONFIG).
        timeout: per-call deadline in seconds; None waits forever.
        tls_ca: PEM file of the CA that signed the server's certificate; switches to TLS.
        token: sent as `authorization: Bearer <token>` metadata on every call.
        tls_cert, tls_key: the client's own certificate and key (PEM), for mutual TLS.
        """
        self.target = target
        self.channel_target = resolve_target(target)
        self.timeout = timeout
        self.options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES),
            ("grpc.service_config", SERVICE_CONFIG),
        ]
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if tls_ca is not None or tls_cert:

            def read(path: str | None) -> bytes | None:
                if not path:
                    return None
                with open(path, "rb") as f:
                    return f.read()

            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(tls_ca),
                private_key=read(tls_key),
                certificate_chain=read(tls_cert),
            )
            self._channel = grpc.secure_channel(self.channel_target, credentials, self.options)
        else:
            self._channel = grpc.insecure_channel(self.channel_target, self.options)
        self._stub = pb_grpc.TranslatorStub(self._channel)

    @staticmethod
    def _request(
        sentences: Sequence[str],
        *,
        max_output_tokens: int,
        attention: AttentionName,
        attention_layer: int | None,
        pieces: bool,
        scores: bool,
        alignment: bool,
        request_id: str,
        target_language: str = "",
    ) -> pb.TranslateRequest:
        """Builds the request; rejects an unknown attention name before anything is sent."""
        if attention not in ATTENTION_MODES:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_MODES)}, not {attention!r}"
            )
        options = pb.TranslateOptions(
            max_output_tokens=max_output_tokens,
            attention=ATTENTION_MODES[attention],
            return_pieces=pieces,
            return_scores=scores,
            return_alignment=alignment,
            target_language=target_language,
        )
        if attention_layer is not None:  # proto3 `optional`: unset means the last layer
            options.attention_layer = attention_layer
        return pb.TranslateRequest(
            sentences=list(sentences), options=options, request_id=request_id
        )

    def translate(
        self,
        sentences: Sequence[str],
        *,
        max_output_tokens: int = 0,
        attention: AttentionName = "none",
        attention_layer: int | None = None,
        pieces: bool = False,
        scores: bool = False,
        alignment: bool = False,
        request_id: str = "",
        target_language: str = "",
    ) -> pb.TranslateResponse:
        """Translates `sentences` in one call: one result per sentence, in input order."""
        request = self._request(
            sentences,
            max_output_tokens=max_output_tokens,
            attention=attention,
            attention_layer=attention_layer,
            pieces=pieces,
            scores=scores,
            alignment=alignment,
            request_id=request_id,
            target_language=target_language,
        )
        response: pb.TranslateResponse = self._stub.Translate(
            request, timeout=self.timeout, metadata=self._metadata
        )
        return response

    def translate_stream(
        self,
        sentences: Sequence[str],
        *,
        max_output_tokens: int = 0,
        attention: AttentionName = "none",
        attention_layer: int | None = None,
        pieces: bool = False,
        scores: bool = False,
        alignment: bool = False,
        request_id: str = "",
        target_language: str = "",
    ) -> Iterator[pb.TranslationResult]:
        """Yields each result as soon as the server finishes its sentence (not in input order:
        `result.index` says which sentence it is).

        Closing the generator early (break, or garbage collection) cancels the call, so the
        server drops the sentences still being decoded instead of finishing them for nobody.
        The deadline covers the whole stream.
        """
        request = self._request(
            sentences,
            max_output_tokens=max_output_tokens,
            attention=attention,
            attention_layer=attention_layer,
            pieces=pieces,
            scores=scores,
            alignment=alignment,
            request_id=request_id,
            target_language=target_language,
        )
        call = self._stub.TranslateStream(request, timeout=self.timeout, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream has ended

    def model_info(self) -> pb.ModelInfo:
        """The served model, its execution provider and the limits the server enforces."""
        info: pb.ModelInfo = self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
        )
        return info

    def close(self) -> None:
        """Closes the channel, cancelling calls still in flight."""
        self._channel.close()

    def __enter__(self) -> TranslatorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def attention_array(result: pb.TranslationResult) -> npt.NDArray[np.float32]:
    """`result.attention` as a numpy array of shape `result.attention.shape`.

    The wire format is a flat packed float list plus a shape (protobuf has no n-d arrays); this
    restores the n-d view: [target, source], [heads, target, source] or
    [layers, heads, target, source]. A result without attention gives an empty 1-d array.
    Raises ValueError when the value count does not match the shape (a server bug).
    """
    values = np.asarray(result.attention.values, dtype=np.float32)
    shape = tuple(int(d) for d in result.attention.shape)
    if not shape:
        if values.size:
            raise ValueError(f"attention has {values.size} values but no shape")
        return values
    if values.size != int(np.prod(shape)):
        raise ValueError(f"attention has {values.size} values, shape {list(shape)} needs more")
    return values.reshape(shape)


def attention_matrix(
    result: pb.TranslationResult, layer: int | None = None
) -> npt.NDArray[np.float32]:
    """One [target, source] matrix from whatever attention the result carries.

    Heads are averaged (as the server does for layer-average); from all layers, `layer` is taken
    (default the last, the one the alignment uses too).
    """
    matrix = attention_array(result)
    if matrix.ndim == 4:
        matrix = matrix[-1 if layer is None else layer]
    if matrix.ndim == 3:
        matrix = matrix.mean(axis=0, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"attention of shape {list(matrix.shape)} is not a matrix")
    return matrix


def save_attention_png(
    result: pb.TranslationResult,
    path: str,
    *,
    source: str = "",
    layer: int | None = None,
) -> None:
    """Draws `result`'s cross-attention as a heatmap PNG at `path`.

    Source pieces run along x, target pieces along y (the matrix is [target, source]); where the
    piece lists do not match the matrix (pieces not requested), positions are numbered instead.
    Uses the Figure API with no pyplot, so nothing needs a display and no global backend or
    figure registry is touched. Raises ModuleNotFoundError when matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    matrix = attention_matrix(result, layer)
    rows, cols = matrix.shape
    if rows == 0 or cols == 0:
        raise ValueError("the translation has no attention to draw (empty sentence?)")
    xs = list(result.source_pieces) if len(result.source_pieces) == cols else list(range(cols))
    ys = list(result.target_pieces) if len(result.target_pieces) == rows else list(range(rows))

    fig = Figure(figsize=(min(2.0 + 0.45 * cols, 40.0), min(1.8 + 0.4 * rows, 40.0)))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), [str(x) for x in xs], rotation=60, ha="right")
    ax.set_yticks(range(rows), [str(y) for y in ys])
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    title = source if len(source) <= 80 else source[:77] + "..."
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="attention")
    fig.savefig(path, dpi=120, bbox_inches="tight")


# --------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def add_translate_args(parser: argparse.ArgumentParser) -> None:
    """Adds the `translate` subcommand's arguments to `parser`."""
    parser.add_argument(
        "sentences",
        nargs="*",
        metavar="SENTENCE",
        help="sentences to translate; none (or '-'): read one per line from --file or stdin",
    )
    parser.add_argument(
        "--target",
        default=None,
        help=f"server host:port, or host:p1,host:p2 to round-robin over replicas "
        f"(default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--file",
        metavar="PATH",
        help="read sentences one per line from PATH ('-' for stdin); empty lines are kept",
    )
    parser.add_argument(
        "--batch",
        type=_positive_int,
        default=32,
        metavar="N",
        help="sentences per request (default: 32); long inputs are sent in chunks",
    )
    _option_args(parser)
    _connection_args(parser)
    _output_args(parser)


def _option_args(parser: argparse.ArgumentParser) -> None:
    """translate: what each result carries."""
    parser.add_argument(
        "--max-output-tokens",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="output token limit per sentence (default: 0 = the model's limit)",
    )
    parser.add_argument(
        "--attention",
        choices=list(ATTENTION_MODES),
        default=None,
        help="cross-attention to return (default: none; shown with --json or --attention-png)",
    )
    parser.add_argument(
        "--attention-layer",
        type=int,
        default=None,
        metavar="L",
        help="decoder layer for the attention, 0-based, negative from the end (default: last)",
    )
    parser.add_argument(
        "--pieces", action="store_true", help="return source and target SentencePiece pieces"
    )
    parser.add_argument(
        "--scores", action="store_true", help="return token and sequence log-probabilities"
    )
    parser.add_argument(
        "--alignment", action="store_true", help="return the hard alignment (Pharaoh i-j pairs)"
    )
    parser.add_argument(
        "--target-language",
        default="",
        metavar="CODE",
        help="target language of a multilingual model, e.g. fra (see --info's target_languages)",
    )


def _connection_args(parser: argparse.ArgumentParser) -> None:
    """translate: deadline, TLS and token."""
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline per request (default: 30; 0 = none)",
    )
    parser.add_argument(
        "--tls-ca", metavar="PEM", help="CA certificate of the server: connect with TLS"
    )
    parser.add_argument(
        "--tls-cert", metavar="PEM", help="client certificate, for servers that need mutual TLS"
    )
    parser.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    parser.add_argument(
        "--token",
        default=None,
        help=f"bearer token (default: ${TOKEN_ENV}; prefer the variable, argv is visible in ps)",
    )


def _output_args(parser: argparse.ArgumentParser) -> None:
    """translate: how the results are shown."""
    parser.add_argument(
        "--stream",
        action="store_true",
        help="use TranslateStream: print 'INDEX<TAB>translation' as each sentence finishes",
    )
    parser.add_argument(
        "--info", action="store_true", help="print the server's model info as JSON and exit"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print each response as one JSON line (with --stream: each result, index global)",
    )
    parser.add_argument(
        "--attention-png",
        metavar="FILE",
        help="draw the first sentence's cross-attention heatmap to FILE (needs matplotlib)",
    )


class _UsageError(Exception):
    """A problem with the command line or its input files: exit code 2."""


def _lines(stream: TextIO) -> Iterator[str]:
    """Lines without their newline; blank lines stay, so output lines align with input lines."""
    for line in stream:
        yield line.removesuffix("\n").removesuffix("\r")


def _open_sentences(args: argparse.Namespace, stack: ExitStack) -> Iterable[str]:
    """The input sentences, lazily: a large file or a pipe is read chunk by chunk as it is sent."""
    positional: list[str] = list(args.sentences)
    path: str | None = args.file
    if positional == ["-"]:
        positional, path = [], path or "-"
    if positional:
        if path is not None:
            raise _UsageError("give sentences as arguments or with --file, not both")
        return positional
    if path is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise _UsageError("no sentences: give them as arguments, with --file, or on stdin")
        path = "-"
    if path == "-":
        if sys.stdin is None:
            raise _UsageError("no stdin to read sentences from")
        return _lines(sys.stdin)
    try:
        # Closed by the caller's ExitStack: the file is read lazily, chunk by chunk.
        stream = stack.enter_context(open(path, encoding="utf-8"))  # noqa: SIM115
    except OSError as err:
        raise _UsageError(f"cannot read {path}: {err.strerror or err}") from err
    return _lines(stream)


def _chunks(sentences: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(sentences)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _to_dict(message: Message) -> dict[str, Any]:
    """JSON-ready dict in proto field names, with every field present (zero `index` included),
    so consumers need no knowledge of proto3's omit-the-default rule."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _text_line(result: pb.TranslationResult, args: argparse.Namespace) -> str:
    """The translation, then tab-separated the extras asked for, so one line stays one sentence."""
    fields = [result.translation]
    if args.scores:
        fields.append(f"{result.sequence_log_prob:.4f}")
    if args.alignment:
        fields.append(result.alignment_pharaoh)
    if args.pieces:
        fields += [" ".join(result.source_pieces), " ".join(result.target_pieces)]
    return "\t".join(fields)


_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is a server running at {target}? "
    f"(set it with --target or ${TARGET_ENV})",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the server did not answer in time: raise --timeout, "
    "or send fewer sentences per request with --batch",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the server is busy: retry later",
    grpc.StatusCode.UNAUTHENTICATED: f"check --token or ${TOKEN_ENV}",
}


def _report_rpc_error(err: grpc.RpcError, target: str) -> None:
    """Prints the status code, its message, the BadRequest field violations and a hint."""
    code = err.code() if isinstance(err, grpc.Call) else None
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    name = code.name if code is not None else "UNKNOWN"
    print(f"error: {name}: {details}", file=sys.stderr)
    try:
        status = rpc_status.from_call(err) if isinstance(err, grpc.Call) else None
    except ValueError:  # trailers inconsistent with the status: show what we have
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)
    if code in _HINTS:
        print("hint: " + _HINTS[code].format(target=target), file=sys.stderr)


def _print_translations(
    client: TranslatorClient,
    sentences: Iterable[str],
    options: dict[str, Any],
    args: argparse.Namespace,
) -> tuple[str, pb.TranslationResult] | None:
    """Translates in calls of --batch sentences, printing one line (or JSON object) per
    sentence or per call; returns the first sentence and its result (for --attention-png)."""
    first: tuple[str, pb.TranslationResult] | None = None
    offset = 0
    for chunk in _chunks(sentences, args.batch):
        if args.stream:
            for result in client.translate_stream(chunk, **options):
                index = offset + result.index
                if index == 0:
                    first = (chunk[0], result)
                if args.json:
                    line = json.dumps({**_to_dict(result), "index": index}, ensure_ascii=False)
                else:
                    line = f"{index}\t{_text_line(result, args)}"
                print(line, flush=True)
        else:
            response = client.translate(chunk, **options)
            if offset == 0 and response.results:
                first = (chunk[0], response.results[0])
            if args.json:
                print(json.dumps(_to_dict(response), ensure_ascii=False), flush=True)
            else:
                for result in response.results:
                    print(_text_line(result, args))
                sys.stdout.flush()
        offset += len(chunk)
    return first


def run_translate(args: argparse.Namespace) -> int:
    """Runs `translate`: 0 on success, 1 when a call fails, 2 for bad usage or input."""
    target: str = args.target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    token: str | None = args.token or os.environ.get(TOKEN_ENV) or None
    timeout: float | None = args.timeout if args.timeout and args.timeout > 0 else None
    attention: AttentionName = args.attention or "none"
    pieces: bool = args.pieces
    if args.attention_png:
        # Check before translating: failing after the work would waste the call.
        if importlib.util.find_spec("matplotlib") is None:
            print(
                "error: --attention-png needs matplotlib: pip install matplotlib "
                "(or the project's plot extra: pip install -e '.[plot]')",
                file=sys.stderr,
            )
            return 2
        attention = "layer-average" if attention == "none" else attention
        pieces = True
    try:
        client = TranslatorClient(
            target,
            timeout=timeout,
            tls_ca=args.tls_ca,
            token=token,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except (ValueError, OSError) as err:  # a malformed target, an unreadable CA file
        print(f"error: {err}", file=sys.stderr)
        return 2

    with client, ExitStack() as stack:
        try:
            if args.info:
                print(json.dumps(_to_dict(client.model_info()), indent=2, ensure_ascii=False))
                return 0
            sentences = _open_sentences(args, stack)
            options: dict[str, Any] = {
                "max_output_tokens": args.max_output_tokens,
                "attention": attention,
                "attention_layer": args.attention_layer,
                "pieces": pieces,
                "scores": args.scores,
                "alignment": args.alignment,
                "target_language": args.target_language,
            }
            first = _print_translations(client, sentences, options, args)
        except _UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except grpc.RpcError as err:
            _report_rpc_error(err, target)
            return 1

    if args.attention_png:
        if first is None:
            print("error: no sentence to draw the attention of", file=sys.stderr)
            return 2
        try:
            save_attention_png(
                first[1], args.attention_png, source=first[0], layer=args.attention_layer
            )
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        # stderr: stdout holds exactly one line (or JSON object) per input and must stay so.
        print(f"attention heatmap: {args.attention_png}", file=sys.stderr)
    return 0
