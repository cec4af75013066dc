"""Client library for the nmtserve gRPC API.

`TranslatorClient` is a thin wrapper over the generated stub: it owns the channel (plain or TLS,
one server or a round-robin list), puts the bearer token and the deadline on every call, and
turns keyword arguments into a `TranslateRequest`. It returns the protobuf messages unchanged so
that callers see exactly what the server sent (the proto file is the documentation).
`attention_array` / `attention_matrix` give a result's attention as numpy arrays.

The command line (`python -m service translate`) is in `service.client_cli`, the attention
heatmap in `service.plots`. Like the rest of `service/`, this module never imports torch or
`export/`.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, TypedDict, Unpack

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.channels import TOKEN_ENV, credentials, server_name_option
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc

__all__ = [
    "ATTENTION_MODES",
    "DEFAULT_TARGET",
    "TARGET_ENV",
    "TOKEN_ENV",
    "AttentionName",
    "TranslateOptions",
    "TranslatorClient",
    "attention_array",
    "attention_matrix",
    "resolve_target",
    "wait_serving",
]

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "NMTSERVE_TARGET"

AttentionName = Literal["none", "layer-average", "layer-heads", "all"]
# CLI spelling -> proto enum. The CLI names are the public vocabulary; the enum stays internal.
ATTENTION_MODES: dict[str, pb.AttentionMode] = {
    "none": pb.ATTENTION_NONE,
    "layer-average": pb.ATTENTION_LAYER_AVERAGE,
    "layer-heads": pb.ATTENTION_LAYER_HEADS,
    "all": pb.ATTENTION_ALL_LAYERS,
}


class TranslateOptions(TypedDict, total=False):
    """The keyword options of `TranslatorClient.translate` and `translate_stream`."""

    max_output_tokens: int  # output token limit per sentence (default 0: the model's limit)
    attention: AttentionName  # cross-attention to return (default "none")
    attention_layer: int | None  # decoder layer, negative from the end (default None: the last)
    pieces: bool  # return source and target pieces
    scores: bool  # return token and sequence log-probabilities
    alignment: bool  # return the hard alignment
    request_id: str  # echoed in the server's logs and answer
    target_language: str  # a multilingual model's target-language code, e.g. "fra"


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
    read the status code and the rich details (see `service.client_cli.run_translate`).
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
        tls_server_name: str | None = None,
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
        tls_server_name: the name the server's certificate must carry, where it is not the
        target's host.
        """
        self.target = target
        self.channel_target = resolve_target(target)
        self.timeout = timeout
        self.options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES),
            ("grpc.service_config", SERVICE_CONFIG),
            *server_name_option(tls_server_name),
        ]
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        creds = credentials(tls_ca, tls_cert, tls_key)
        if creds is not None:
            self._channel = grpc.secure_channel(self.channel_target, creds, self.options)
        else:
            self._channel = grpc.insecure_channel(self.channel_target, self.options)
        self._stub = pb_grpc.TranslatorStub(self._channel)

    @staticmethod
    def _request(
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
        self, sentences: Sequence[str], **options: Unpack[TranslateOptions]
    ) -> pb.TranslateResponse:
        """Translates `sentences` in one call: one result per sentence, in input order."""
        response: pb.TranslateResponse = self._stub.Translate(
            self._request(sentences, **options), timeout=self.timeout, metadata=self._metadata
        )
        return response

    def translate_stream(
        self, sentences: Sequence[str], **options: Unpack[TranslateOptions]
    ) -> Iterator[pb.TranslationResult]:
        """Yields each result as soon as the server finishes its sentence (not in input order:
        `result.index` says which sentence it is).

        Closing the generator early (break, or garbage collection) cancels the call, so the
        server drops the sentences still being decoded instead of finishing them for nobody.
        The deadline covers the whole stream.
        """
        request = self._request(sentences, **options)
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
