"""Log set-up of the server: text lines or one JSON object per line, with the request id where
there is one."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


def request_ids(record: logging.LogRecord) -> list[str]:
    """The calls a line is about: its request_id, or the request_ids of a line about several
    (a failed decode batch holds sentences of many calls)."""
    rid = getattr(record, "request_id", None)
    return [rid] if rid else list(getattr(record, "request_ids", None) or [])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the call it is about as
    request_id, or the calls as request_ids (a list) when it is about more than one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = request_ids(record)
        if len(ids) == 1:
            out["request_id"] = ids[0]
        elif ids:
            out["request_ids"] = ids
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """A text line, ending in [request_id] (or [id, id, ...]) when it is about calls."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ids = request_ids(record)
        return f"{line} [{', '.join(ids)}]" if ids else line


class UnsentAnswer(logging.Filter):
    """gRPC logs an ERROR with a traceback when it cannot send an answer a handler returned
    because the client went away meanwhile (one that stopped reading, then disconnected): the
    client's doing, not a server error. Such records become one INFO line."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(self.PREFIX):
            method = str(record.getMessage())[len(self.PREFIX) :].strip()
            record.msg, record.args = (
                "an answer could not be sent (the client went away): %s",
                (method,),
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


def setup_logging(fmt: str, level: str) -> None:
    logging.getLogger("grpc._cython.cygrpc").addFilter(UnsentAnswer())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
