"""Logging: key=value lines by default, JSON lines with --log-format json, klog-like -v levels."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

# klog's -v N maps onto the stdlib's levels: 0 is info, 1..3 add per-peer detail, 4 and more
# add every etcd and netlink call (flannel-compat.md section 8 lists what each level shows).
DETAIL = 15
TRACE = 5


def level_for_verbosity(verbosity: int) -> int:
    if verbosity <= 0:
        return logging.INFO
    if verbosity < 4:
        return DETAIL if verbosity < 2 else logging.DEBUG
    return TRACE


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-._:/,+@=[]" for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        return " ".join(f"{key}={_quote(str(value))}" for key, value in fields.items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), ensure_ascii=False, default=str)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    fields: dict[str, Any] = {
        "ts": f"{stamp}.{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name.removeprefix("flannel_bpf."),
        "msg": record.getMessage(),
    }
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        fields.update(extra)
    if record.exc_info and record.levelno <= logging.DEBUG:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


def setup_logging(verbosity: int = 0, fmt: str = "text", stream: IO[str] | None = None) -> None:
    logging.addLevelName(DETAIL, "DETAIL")
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_for_verbosity(verbosity))
    # Library chatter (gRPC, pyroute2) only when asked for the most detail.
    for noisy in ("grpc", "pyroute2", "asyncio", "etcd3aio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity >= 6 else logging.WARNING)
