"""The client side's connection settings, shared by every client command (translate, health,
loadtest): TLS from PEM files and the bearer token. gRPC only, so the container's health check
stays light (no numpy, no onnxruntime).
"""

from __future__ import annotations

import argparse
import os

import grpc

TOKEN_ENV = "NMTSERVE_TOKEN"  # the bearer token of every client command, where no flag gives one


def add_tls_args(parser: argparse.ArgumentParser, env_prefix: str = "") -> None:
    """--tls-ca, --tls-cert, --tls-key (and --tls-server-name); with env_prefix each defaults to
    the environment variable <env_prefix>TLS_CA etc., so a container's fixed health-check
    command can be pointed at a TLS server through its environment."""

    def default(name: str) -> str | None:
        return os.environ.get(f"{env_prefix}{name}") if env_prefix else None

    def where(name: str) -> str:
        return f" [{env_prefix}{name}]" if env_prefix else ""

    for flag, name, text in (
        ("--tls-ca", "TLS_CA", "CA certificate of the server: connect with TLS"),
        ("--tls-cert", "TLS_CERT", "client certificate, for servers that need mutual TLS"),
        ("--tls-key", "TLS_KEY", "the client certificate's private key"),
    ):
        parser.add_argument(flag, metavar="PEM", default=default(name), help=text + where(name))
    parser.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=default("TLS_SERVER_NAME"),
        help="the name the server's certificate must carry, where it differs from the target's "
        "host (e.g. a health check on 127.0.0.1)" + where("TLS_SERVER_NAME"),
    )


def add_token_arg(parser: argparse.ArgumentParser) -> None:
    """--token; read it with ``token_of``, which falls back to the environment."""
    parser.add_argument(
        "--token",
        default=None,
        help=f"bearer token (default: ${TOKEN_ENV}; prefer the variable, argv is visible in ps)",
    )


def token_of(args: argparse.Namespace) -> str | None:
    """The --token flag, else $NMTSERVE_TOKEN, else None (no token is sent)."""
    return args.token or os.environ.get(TOKEN_ENV) or None


def credentials(
    tls_ca: str | None, tls_cert: str | None = None, tls_key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from PEM files, or None for plaintext (no CA and no certificate;
    an empty one counts as none, as an environment variable set to nothing does).
    ValueError when a client certificate comes without its key or the other way round."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key go together")
    if not tls_ca and not tls_cert:
        return None

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca), private_key=read(tls_key), certificate_chain=read(tls_cert)
    )


def server_name_option(name: str | None) -> list[tuple[str, str]]:
    """The channel option that checks the server's certificate against `name` instead of the
    target's host."""
    return [("grpc.ssl_target_name_override", name)] if name else []
