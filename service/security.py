"""TLS / mutual TLS credentials and the optional bearer-token check.

Tokens come from a file (one per line, ``#`` comments) and/or the environment
(``NMTSERVE_AUTH_TOKENS``, comma-separated). Every RPC except the health service must carry
``authorization: Bearer <token>``; a missing or wrong token gets UNAUTHENTICATED. Tokens are
compared in constant time, against every configured token, so timing reveals nothing.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def load_tokens(file: str = "", inline: str = "") -> list[bytes]:
    """The bearer tokens of a file and/or a comma-separated list; [] when neither is given.
    Authentication asked for but no usable token found is an error (it must never be turned off
    silently); messages never quote a token."""
    tokens: list[str] = []
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:  # its message would quote the token's bytes
            raise ValueError(
                f"auth tokens file {file} is not UTF-8 text (byte {e.start}): refusing to start"
            ) from None
        from_file = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
        if not from_file:
            raise ValueError(
                f"auth tokens file {file} has no tokens (only blank lines or comments): "
                "refusing to start without authentication"
            )
        tokens += from_file
    if inline:
        listed = [t.strip() for t in inline.split(",") if t.strip()]
        if not listed:
            raise ValueError(
                "--auth-tokens / NMTSERVE_AUTH_TOKENS is set but lists no token: refusing to "
                "start without authentication"
            )
        tokens += listed
    if any(len(t) < 16 for t in tokens):
        raise ValueError("every auth token must be at least 16 characters long")
    if not all(t.isascii() and t.isprintable() and " " not in t for t in tokens):
        # gRPC metadata carries printable ASCII only: such a token could never be presented
        raise ValueError("auth tokens must be printable ASCII without spaces (one per line)")
    return [t.encode("utf-8") for t in tokens]


def token_ok(header: str, tokens: list[bytes]) -> bool:
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":  # RFC 7235: the scheme is case-insensitive
        return False
    given = credentials.strip().encode("utf-8")
    ok = False
    for t in tokens:  # no early exit: the time taken does not depend on which token matched
        ok |= hmac.compare_digest(given, t)
    return ok


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[bytes], refused: Callable[[str], None] | None = None) -> None:
        """refused(method): told of every call refused here (the request metrics count them;
        the servicer never sees them)."""
        if not tokens:
            raise ValueError("TokenAuth needs at least one token")
        self.tokens = tokens
        self.refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        if isinstance(header, bytes):
            header = header.decode("utf-8", "replace")
        if token_ok(header, self.tokens):
            return handler
        reason = "missing bearer token" if not header else "invalid bearer token"
        if self.refused is not None:
            self.refused(method.rsplit("/", 1)[-1])
        return _denying(handler, f"{reason}: send 'authorization: Bearer <token>'")


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS with the server's certificate and key; with client_ca, clients must present a
    certificate signed by it (mutual TLS)."""
    pair = (Path(key).read_bytes(), Path(cert).read_bytes())
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))
