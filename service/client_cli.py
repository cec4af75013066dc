"""`python -m service translate`: the command-line client (service.cli wires it in).

Reads sentences from arguments, a file or stdin, sends them in chunks of --batch through
`service.client.TranslatorClient` and prints one line (or JSON object) per sentence; errors
are printed with their status, field violations and a hint, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.channels import add_tls_args, add_token_arg, token_of
from service.client import (
    ATTENTION_MODES,
    DEFAULT_TARGET,
    TARGET_ENV,
    TOKEN_ENV,
    AttentionName,
    TranslateOptions,
    TranslatorClient,
)
from service.plots import save_attention_png
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb


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
    for flag, text in (
        ("--pieces", "return source and target SentencePiece pieces"),
        ("--scores", "return token and sequence log-probabilities"),
        ("--alignment", "return the hard alignment (Pharaoh i-j pairs)"),
    ):
        parser.add_argument(flag, action="store_true", help=text)
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
    add_tls_args(parser)
    add_token_arg(parser)


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
    """JSON-ready dict in proto field names, with every field present (zero values included),
    so consumers need no knowledge of proto3's omit-the-default rule (for ModelInfo)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _result_dict(result: pb.TranslationResult, index: int) -> dict[str, Any]:
    """What a result holds: its index and translation always (even 0 and ""), the rest only
    where the response carries it — no empty scores, pieces or attention nobody asked for."""
    held = json_format.MessageToDict(result, preserving_proto_field_name=True)
    return {"index": index, "translation": result.translation, **held} | {"index": index}


def _response_dict(response: pb.TranslateResponse) -> dict[str, Any]:
    results = [_result_dict(r, r.index) for r in response.results]
    return {"results": results, "request_id": response.request_id}


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
    options: TranslateOptions,
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
                    line = json.dumps(_result_dict(result, index), ensure_ascii=False)
                else:
                    line = f"{index}\t{_text_line(result, args)}"
                print(line, flush=True)
        else:
            response = client.translate(chunk, **options)
            if offset == 0 and response.results:
                first = (chunk[0], response.results[0])
            if args.json:
                print(json.dumps(_response_dict(response), ensure_ascii=False), flush=True)
            else:
                for result in response.results:
                    print(_text_line(result, args))
                sys.stdout.flush()
        offset += len(chunk)
    return first


def run_translate(args: argparse.Namespace) -> int:
    """Runs `translate`: 0 on success, 1 when a call fails, 2 for bad usage or input."""
    target: str = args.target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    token = token_of(args)
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
            tls_server_name=args.tls_server_name,
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
            options: TranslateOptions = {
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

    return _draw_attention(first, args) if args.attention_png else 0


def _draw_attention(
    first: tuple[str, pb.TranslationResult] | None, args: argparse.Namespace
) -> int:
    """--attention-png: the first sentence's heatmap; the exit code."""
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
