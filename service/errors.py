"""The one table from the service's errors to gRPC status codes, and how an answer with a
status (and its google.rpc details) is sent."""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.scheduler import Cancelled, DeadlineExceeded, DecoderFailed, QueueFull, ShuttingDown
from service.streaming import ResultsFull
from service.translator import InvalidRequest


class NotReady(Exception):
    """The bundle is still loading."""


class ResponseTooLarge(Exception):
    """A built response is over the send limit (validation should have refused the call)."""


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
    if isinstance(e, ResultsFull):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later")
    if isinstance(e, ResponseTooLarge):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, DeadlineExceeded):
        return RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
    if isinstance(e, Cancelled):
        return RpcError(grpc.StatusCode.CANCELLED, str(e))
    if isinstance(e, DecoderFailed):
        return RpcError(grpc.StatusCode.UNAVAILABLE, f"{e}; retry elsewhere")
    if isinstance(e, ShuttingDown):
        return RpcError(grpc.StatusCode.UNAVAILABLE, "the server is draining; retry elsewhere")
    if isinstance(e, NotReady):
        return RpcError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
    return RpcError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


async def abort(context: grpc.aio.ServicerContext, err: RpcError) -> NoReturn:
    """Ends the call with err's status (raises grpc.aio.AbortError, as gRPC wants). A call that
    gRPC has ended meanwhile (its client went away, its deadline passed) can no longer be
    answered: that raises asyncio.CancelledError, as gRPC itself does to a handler whose call
    it ends, so that every call it ended is handled (and counted) alike."""
    details = []
    for d in err.details:
        packed = any_pb2.Any()
        packed.Pack(d)
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, err.code.name), message=err.message, details=details
    )
    try:
        await context.abort_with_status(rpc_status.to_status(status))
    except grpc.aio.AbortError:
        raise
    except Exception as gone:  # the answer failed: gRPC had ended the call
        raise asyncio.CancelledError() from gone
    raise AssertionError("abort_with_status returned")  # pragma: no cover
