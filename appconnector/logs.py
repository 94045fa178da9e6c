"""Structured logging for the ``appconnector`` command: one line per record, ``key=value`` (default,
for people and journald) or JSON (``--log-format json`` / ``APPCONNECTOR_LOG_FORMAT=json``, for log
shippers). Fields passed with ``extra={...}`` become keys of their own."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is printed.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
FORMATS = ("kv", "json")
LEVELS = ("debug", "info", "warning", "error")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _kv_value(v: object) -> str:
    s = str(v)
    if s and not any(c in s for c in ' "=\n\t'):
        return s
    return json.dumps(s, ensure_ascii=False)


def _fields(formatter: logging.Formatter, record: logging.LogRecord) -> dict[str, object]:
    """The keys both formats print, in order: ts, level, logger, msg, the extras, exc."""
    fields: dict[str, object] = {"ts": _timestamp(record.created), "level": record.levelname.lower(),
                                 "logger": record.name, "msg": record.getMessage()}
    fields.update(_extras(record))
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    return fields


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=info logger=appconnector.dns msg="…" key=value``"""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_kv_value(v)}" for k, v in _fields(self, record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the same keys as the key=value format."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(self, record), default=str, ensure_ascii=False)


class RecentWarnings(logging.Handler):
    """The last ``size`` distinct WARNING-or-worse messages, for the status page. A row is keyed by
    logger and message *template* (``record.msg`` without its arguments: arguments name nodes, domains
    and addresses, per-node data the read-only page must not show); repeats count up and move the row
    to the top, so a flood of one warning cannot push the others out."""

    def __init__(self, size: int = 30) -> None:
        super().__init__(logging.WARNING)
        self.size = size
        self._rows: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._rows_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        key = (record.name, str(record.msg))
        with self._rows_lock:
            row = self._rows.pop(key, None) or {"logger": record.name, "template": str(record.msg), "count": 0,
                                                "first": record.created}
            row.update(count=row["count"] + 1, last=record.created, level=record.levelname.lower())
            self._rows[key] = row
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def rows(self) -> list[dict[str, Any]]:
        """Newest first; copies."""
        with self._rows_lock:
            return [dict(r) for r in reversed(self._rows.values())]


RECENT_WARNINGS = RecentWarnings()


def setup(level: str = "info", fmt: str = "kv", stream: TextIO | None = None) -> None:
    """Configure the root logger once (replacing earlier handlers). Raises ValueError on a bad name."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}: one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.addHandler(RECENT_WARNINGS)
    root.setLevel(level.upper())
    # pysyncobj logs every reconnect at INFO; keep it at WARNING unless debugging
    if level.lower() != "debug":
        logging.getLogger("pysyncobj").setLevel(logging.WARNING)
