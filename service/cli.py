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
import shlex
import sys
from collections.abc import Callable
from typing import Any

from service.bundle import BundleError, load_bundle
from service.healthcheck import add_health_args, cmd_health
from service.logs import setup_logging
from service.server import SETTINGS, Server, ServerConfig
from service.settings import env_name, flag, flags_of

log = logging.getLogger("nmtserve")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """One flag per setting of the server, runtime and scheduler configs, its default from the
    environment (NMTSERVE_<NAME>) or the config class (secrets: never shown as a default)."""
    for cls in SETTINGS:
        for f in flags_of(cls):
            env = env_name(f.name)
            secret, required = f.metadata["secret"], f.name == "bundle"
            default = None if secret else os.environ.get(env, None if required else f.default)
            p.add_argument(
                flag(f.name),
                type=type(f.default),
                default=default,
                required=required and default is None,
                choices=f.metadata["choices"] or None,
                help=f"{f.metadata['help']} [{env}]",
            )
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


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """The config the flags give (secrets not given as flags come from the environment)."""
    values = {}
    for f in (f for cls in SETTINGS for f in flags_of(cls)):
        value = getattr(args, f.name)
        values[f.name] = os.environ.get(env_name(f.name), "") if value is None else value
    return ServerConfig.from_settings(**values)


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    # The decode thread needs the GIL briefly between onnxruntime calls while the event loop
    # holds it for gRPC work; the default 5 ms hand-over interval stalled decoder steps
    # (measured: +17% calls/s at concurrency 64 with 1 ms, benchmarks/service_throughput.py).
    sys.setswitchinterval(0.001)
    try:
        cfg = serve_config(args)
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
        example = shlex.quote(sentences[0])
        print(f"  .venv/bin/python -m service translate --target {target} {example}")
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


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default=os.environ.get("NMTSERVE_BUNDLE", "models/default"))
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=9090, help="metrics port (0: off)")
    p.add_argument("--sentence", action="append", help="a sentence to show (repeatable)")
    p.add_argument("--once", action="store_true", help="stop after showing the translations")


def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default=os.environ.get("NMTSERVE_BUNDLE", "models/default"))


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]


def build_parser() -> argparse.ArgumentParser:
    from service.client_cli import add_translate_args, run_translate
    from service.loadtest import __doc__ as loadtest_doc
    from service.loadtest import add_loadtest_args, run_loadtest

    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands: list[Command] = [
        ("serve", "serve a model bundle over gRPC", add_serve_args, cmd_serve),
        ("translate", "translate through a running server", add_translate_args, run_translate),
        (
            "loadtest",
            "load-test a running server (closed or open loop) and report",
            add_loadtest_args,
            run_loadtest,
        ),
        (
            "demo",
            "start a server, translate a few sentences through it, keep serving",
            add_demo_args,
            cmd_demo,
        ),
        (
            "health",
            "check a server's health service (exit 0 when SERVING)",
            add_health_args,
            cmd_health,
        ),
        ("info", "check a bundle offline and print its summary", add_info_args, cmd_info),
    ]
    for name, help, add_args, func in commands:
        kwargs: dict[str, Any] = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
        if name == "loadtest":  # its docstring is its description, laid out by hand
            kwargs = {
                "description": loadtest_doc,
                "formatter_class": argparse.RawDescriptionHelpFormatter,
            }
        elif name == "info":
            kwargs = {}
        p = sub.add_parser(name, help=help, **kwargs)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
