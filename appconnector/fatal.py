"""The one place parts report a fatal error to, and the process exit codes (docs/operations.md).

A part that cannot go on (the Raft tick failing for seconds, a journal that diverged, a snapshot that
would not install, a NAT worker that died) calls :meth:`FatalReporter.report` from whatever thread it
runs on. ``serve`` (app.py) waits on :meth:`FatalReporter.wait` next to the signals, logs the reason once,
stops the parts and exits with the reported code, so systemd's ``Restart=on-failure`` can act:

    reporter = FatalReporter()            # the Connector owns one: connector.fatal
    reporter.report("nat worker: ...")    # any thread, any number of times; the first report wins
    fatal = await reporter.wait()         # on the event loop: Fatal(reason, exit_code)

Exit codes: 0 after SIGTERM/SIGINT, 1 runtime failure (restarting may help), 2 bad config (it would not),
3 untrusted state (this member's pool copy may differ from the cluster's: it must not serve again until
an operator runs ``appconnector state reset``; the systemd unit lists 2 and 3 in RestartPreventExitStatus).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
"""A runtime failure: the log line ``fatal:`` says which part and why; a restart may help."""
EXIT_CONFIG = 2
"""A bad config or bad usage: a restart would not help."""
EXIT_UNTRUSTED = 3
"""This member's state cannot be trusted (journal divergence, failed snapshot install). The marker file in
its state directory keeps it from serving after a restart until ``appconnector state reset``."""


@dataclass(frozen=True, slots=True)
class Fatal:
    reason: str
    exit_code: int


class FatalReporter:
    """Thread-safe collector of the first fatal error; wakes the event loop waiting in :meth:`wait`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fatal: Fatal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    @property
    def reported(self) -> Fatal | None:
        return self._fatal

    def report(self, reason: str, exit_code: int = EXIT_FAILURE) -> None:
        """Ask the process to stop with ``exit_code``. Safe from any thread; never raises, never blocks.
        Later reports are only logged at debug: the first failure is the cause, the rest follow from it."""
        with self._lock:
            if self._fatal is not None:
                log.debug("fatal (after the first, ignored): %s", reason)
                return
            self._fatal = Fatal(reason, exit_code)
            loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: the process is ending anyway
                loop.call_soon_threadsafe(event.set)

    async def wait(self) -> Fatal:
        """Return the first report (at once if one came before)."""
        with self._lock:
            if self._event is None:
                self._loop = asyncio.get_running_loop()
                self._event = asyncio.Event()
            event = self._event
            if self._fatal is not None:
                event.set()
        await event.wait()
        assert self._fatal is not None
        return self._fatal
