"""Structured JSON logs that carry the request id of the work being done.

A tiny formatter rather than a dependency: it needs only the stdlib and a contextvar, and it
must never log message text or keys (fields are whitelisted by the caller via `extra`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_STD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            doc["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup(service: str, level: str = "INFO") -> logging.Logger:
    """Route the root logger to JSON lines on stderr; idempotent."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_colloquy", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler._colloquy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # kafka-python is chatty at INFO (every rebalance, every connection).
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    return logging.getLogger(service)
