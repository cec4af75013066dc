"""``python -m service health``: exit 0 when a server's grpc.health.v1 service says SERVING.

The container's HEALTHCHECK runs it every few seconds, so it imports gRPC and the health
messages only (``service/__main__.py`` sends the command here before loading the rest of the
command line, which imports the server, onnxruntime and numpy).
"""

from __future__ import annotations

import argparse
import os
import sys

from service.channels import add_tls_args, credentials, server_name_option


def add_health_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=f"127.0.0.1:{os.environ.get('NMTSERVE_PORT', '50051')}",
        help="host:port of the server (default: this host, port $NMTSERVE_PORT)",
    )
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    add_tls_args(p, env_prefix="NMTSERVE_HEALTH_")  # health needs TLS, never a token


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server's grpc.health.v1 service answers SERVING (container HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        creds = credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except (ValueError, OSError) as e:
        print(f"{args.target}: {e}", file=sys.stderr)
        return 1
    options = server_name_option(args.tls_server_name)
    channel = (
        grpc.secure_channel(args.target, creds, options)
        if creds is not None
        else grpc.insecure_channel(args.target, options)
    )
    try:
        with channel as ch:
            status = (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
                .status
            )
    except grpc.RpcError as e:  # why, too: a TLS failure is UNAVAILABLE like a server down
        print(f"{args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{args.target}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str]) -> int:
    """The health command alone, with the same flags and help as under ``python -m service``."""
    p = argparse.ArgumentParser(
        prog="python -m service health", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_health_args(p)
    return cmd_health(p.parse_args(argv))
