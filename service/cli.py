"""Command line of the serving side.

    python -m service serve --bundle models/default --port 50051 [--metrics-port 9090]
    python -m service translate "three hundred and twenty-one"      # client
    python -m service info --bundle models/default                  # check a bundle offline

Every ``serve`` setting is a flag and an environment variable (``NMTSERVE_<FLAG>``, e.g.
``NMTSERVE_BUNDLE``, ``NMTSERVE_PORT``); a flag wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import fields
from typing import Any

from service.bundle import BundleError, load_bundle
from service.logs import setup_logging
from service.server import Server, ServerConfig

log = logging.getLogger("nmtserve")

SERVE_HELP = {
    "bundle": "model bundle directory (required)",
    "host": "address to listen on (0.0.0.0 in a container)",
    "port": "gRPC port (0: pick a free one, logged)",
    "metrics_port": "Prometheus /metrics HTTP port (0: off)",
    "metrics_host": "address of the metrics endpoint",
    "provider": "execution provider: cpu, cuda, or auto (CUDA where onnxruntime-gpu sees a GPU)",
    "precision": "graphs to serve: fp32, or int8 if the bundle has them",
    "threads": "onnxruntime intra-op threads of each decode lane (0: the cores this process "
    "may use, shared out among the lanes)",
    "lanes": "batches decoded in parallel, each by its own thread (0: auto, one per usable "
    "core up to 4 on CPU, one on CUDA)",
    "max_queue_tokens": "source tokens of the sentences waiting, at most; a call that does not "
    "fit gets RESOURCE_EXHAUSTED at once",
    "max_call_tokens": "source tokens of one call, at most (INVALID_ARGUMENT above), so that no "
    "single call can fill the queue",
    "max_batch_rows": "rows decoded together at most",
    "max_batch_tokens": "source tokens in the decoding batch at most",
    "max_wait_ms": "how long an idle server waits for more sentences to fill a batch",
    "max_sentences": "sentences per request at most",
    "max_message_bytes": "largest gRPC message received or sent",
    "result_buffer_bytes": "bytes of results not yet received by their clients, all calls "
    "together, counted at their worst-case size from the moment a call is accepted until it ends "
    "(a stream reserves a window of up to 16 MiB); a call that does not fit gets "
    "RESOURCE_EXHAUSTED at once",
    "drain_delay_s": "after SIGTERM: seconds of NOT_SERVING while still serving, so that load "
    "balancers and health-checking clients move away before new calls are refused",
    "grace_s": "seconds accepted calls get to finish once new calls are refused (after the drain "
    "delay)",
    "tls_cert": "server certificate (PEM); with --tls-key enables TLS",
    "tls_key": "server private key (PEM)",
    "tls_client_ca": "CA certificate (PEM) that client certificates must chain to: mutual TLS",
    "auth_tokens_file": "file of bearer tokens, one per line; every RPC but health needs one",
    "auth_tokens": "comma-separated bearer tokens (prefer the env variable or a file)",
}


# Settings whose values are secrets: their environment value is read after parsing, so that it
# never shows in --help as a default.
SECRET = frozenset({"auth_tokens"})


def add_serve_args(p: argparse.ArgumentParser) -> None:
    for f in fields(ServerConfig):
        env = f"NMTSERVE_{f.name.upper()}"
        flag = "--" + f.name.replace("_", "-")
        default = os.environ.get(env, None if f.name == "bundle" else f.default)
        if f.name in SECRET:
            default = None
        kind = type(f.default) if f.name != "bundle" else str
        kwargs: dict[str, Any] = {"default": default, "help": f"{SERVE_HELP[f.name]} [{env}]"}
        if f.name == "provider":
            kwargs["choices"] = ["cpu", "cuda", "auto"]
        if f.name == "precision":
            kwargs["choices"] = ["fp32", "int8"]
        p.add_argument(flag, type=kind, required=f.name == "bundle" and default is None, **kwargs)
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("NMTSERVE_LOG_FORMAT", "text"),
        help="log lines as text or JSON objects [NMTSERVE_LOG_FORMAT]",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("NMTSERVE_LOG_LEVEL", "info"),
        help="debug, info, warning, error [NMTSERVE_LOG_LEVEL]",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    # The decode thread needs the GIL briefly between onnxruntime calls while the event loop
    # holds it for gRPC work; the default 5 ms hand-over interval stalled decoder steps
    # (measured: +17% calls/s at concurrency 64 with 1 ms, benchmarks/service_throughput.py).
    sys.setswitchinterval(0.001)
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    for name in SECRET:
        if values[name] is None:
            values[name] = os.environ.get(f"NMTSERVE_{name.upper()}", "")
    try:
        cfg = ServerConfig(**values)
    except ValueError as e:
        log.error("cannot start: %s", e)
        return 2
    server = Server(cfg)
    try:
        asyncio.run(server.run())
    except BundleError as e:
        log.error("%s", e)
        return 2
    except (RuntimeError, ValueError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    return server.exit_code


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server's grpc.health.v1 service answers SERVING (container HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.target) as ch:
            status = (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
                .status
            )
    except grpc.RpcError as e:
        print(f"{args.target}: {e.code().name}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{args.target}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_info(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = bundle.manifest
    print(
        json.dumps(
            {k: m[k] for k in ("format_version", "model", "limits", "metrics") if k in m}
            | {"verification_passed": m.get("verification", {}).get("passed")},
            indent=2,
        )
    )
    return 0


DEMO_SENTENCES = [
    "three hundred and twenty-one",
    "seven",
    "forty-two thousand, nine hundred and five",
    "one thousand and one",
    "nine hundred and ninety-nine thousand, nine hundred and ninety-nine",
]


def cmd_demo(args: argparse.Namespace) -> int:
    """Starts `serve` as a child process, waits for SERVING, translates through gRPC, then
    keeps serving until Ctrl-C (which drains the server) — or stops at once with --once."""
    import signal
    import subprocess

    from service.client import TranslatorClient, wait_serving

    target = f"127.0.0.1:{args.port}"
    # No load balancer to move away from this local server: no drain delay.
    cmd = [sys.executable, "-m", "service", "serve", "--bundle", args.bundle,
           "--host", "127.0.0.1", "--port", str(args.port), "--drain-delay-s", "0"]  # fmt: skip
    if args.metrics_port:
        cmd += ["--metrics-port", str(args.metrics_port)]
    proc = subprocess.Popen(cmd)
    try:
        try:
            wait_serving(target, proc, timeout=120)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        sentences = args.sentence or DEMO_SENTENCES
        with TranslatorClient(target) as client:
            info = client.model_info()
            resp = client.translate(sentences)
        print(f"\nServing {args.bundle} on {target} ({info.execution_provider}).")
        print("Translations made through the gRPC server:")
        for s, r in zip(sentences, resp.results, strict=True):
            print(f"  {s}\n    → {r.translation}")
        print("\nFrom another terminal:")
        print(f'  .venv/bin/python -m service translate --target {target} "five hundred and six"')
        if args.metrics_port:
            print(f"  curl -s http://127.0.0.1:{args.metrics_port}/metrics | grep nmtserve_")
        if args.once:
            return 0
        print("Press Ctrl-C to stop (the server drains first).")
        proc.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def build_parser() -> argparse.ArgumentParser:
    from service.client_cli import add_translate_args, run_translate

    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "serve",
        help="serve a model bundle over gRPC",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser(
        "translate",
        help="translate through a running server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_translate_args(p)
    p.set_defaults(func=run_translate)
    from service.loadtest import __doc__ as loadtest_doc
    from service.loadtest import add_loadtest_args, run_loadtest

    p = sub.add_parser(
        "loadtest",
        help="load-test a running server (closed or open loop) and report",
        description=loadtest_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_loadtest_args(p)
    p.set_defaults(func=run_loadtest)
    p = sub.add_parser(
        "demo",
        help="start a server, translate a few sentences through it, keep serving",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bundle", default=os.environ.get("NMTSERVE_BUNDLE", "models/default"))
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=9090, help="metrics port (0: off)")
    p.add_argument("--sentence", action="append", help="a sentence to show (repeatable)")
    p.add_argument("--once", action="store_true", help="stop after showing the translations")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser(
        "health",
        help="check a server's health service (exit 0 when SERVING)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--target",
        default=f"127.0.0.1:{os.environ.get('NMTSERVE_PORT', '50051')}",
        help="host:port of the server (default: this host, port $NMTSERVE_PORT)",
    )
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.set_defaults(func=cmd_health)
    p = sub.add_parser("info", help="check a bundle offline and print its summary")
    p.add_argument("--bundle", default=os.environ.get("NMTSERVE_BUNDLE", "models/default"))
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
