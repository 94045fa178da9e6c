"""Rate-limited logging: bad input (or a failing loop) can repeat thousands of times a second; the log must not."""

from __future__ import annotations

import logging
import time

DEFAULT_INTERVAL = 10.0


class RateLimitedLog:
    """At most one line per ``key`` per ``interval`` seconds; the next line says how many were skipped."""

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def _allow(self, key: str) -> int | None:
        now = time.monotonic()
        last, skipped = self._last.get(key, (-self._interval, 0))
        if now - last < self._interval:
            self._last[key] = (last, skipped + 1)
            return None
        self._last[key] = (now, 0)
        return skipped

    def _emit(self, level: int, key: str, msg: str, args: tuple[object, ...], exc_info: bool) -> None:
        skipped = self._allow(key)
        if skipped is None:
            return
        if skipped:
            msg += f" ({skipped} similar lines suppressed)"
        self._log.log(level, msg, *args, exc_info=exc_info)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self._emit(logging.WARNING, key, msg, args, False)

    def info(self, key: str, msg: str, *args: object) -> None:
        self._emit(logging.INFO, key, msg, args, False)

    def exception(self, key: str, msg: str, *args: object) -> None:
        self._emit(logging.ERROR, key, msg, args, True)
