"""Telling systemd how we are: sd_notify and its watchdog, a small implementation of our own.

systemd (``Type=notify``) puts a unix datagram socket in ``NOTIFY_SOCKET``: a path, or ``@name`` for the
abstract namespace. Each datagram is newline-separated ``KEY=value`` fields. We send ``READY=1`` once
the connector serves, ``STOPPING=1`` when it starts to stop, and, when ``WATCHDOG_USEC`` asks for it
(``WatchdogSec=``; ``WATCHDOG_PID``, if set, must be us), ``WATCHDOG=1`` every half interval, but only
after a call through the Raft tick thread came back to the event loop: a blocked loop or a hung tick
means no ping, and systemd kills and restarts the connector. While starting (waiting for tailscaled
or for the cluster can take long) the pinger extends systemd's start timeout instead
(``EXTEND_TIMEOUT_USEC``), again only while the loop runs.

Without ``NOTIFY_SOCKET`` (not under systemd) everything here does nothing. The variables are removed
from our environment so child processes (``nft``, forked compaction) never talk to systemd for us.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping

from appconnector.periodic import Periodic

log = logging.getLogger(__name__)

Probe = Callable[[float], Awaitable[bool]]
"""``probe(timeout)``: True when the Raft tick answered within ``timeout`` seconds."""


def socket_address(value: str) -> str | bytes | None:
    """``NOTIFY_SOCKET`` as a ``sendto`` address: ``@name`` is the abstract namespace (a leading NUL),
    an absolute path a filesystem socket; anything else (e.g. ``vsock:``) is not supported: None."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends notifications to ``NOTIFY_SOCKET``. ``watchdog`` is the interval systemd asked for (seconds),
    or None."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog if address is not None else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """Read (and remove) ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID`` from ``env``."""
        env = os.environ if env is None else env
        raw = env.pop("NOTIFY_SOCKET", "")
        usec, wpid = env.pop("WATCHDOG_USEC", ""), env.pop("WATCHDOG_PID", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path or @abstract name: not notifying systemd", raw)
        watchdog = None
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid() if pid is None else pid)):
            watchdog = int(usec) / 1e6
        return cls(address, watchdog)

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``fields``; never blocks or raises (a failure is logged once)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as e:
            if not self._warned:
                log.warning("cannot notify systemd through NOTIFY_SOCKET: %s", e)
                self._warned = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """The pinger. ``start()`` at once (it extends the start timeout), ``serving(probe)`` when ready (it
    pings ``WATCHDOG=1`` from then on), ``await stop()`` before stopping. Idle without a watchdog."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._probe: Probe | None = None
        self._serving = False
        self._periodic: Periodic | None = None
        self.missed = 0  # pings withheld because the Raft tick did not answer

    def start(self) -> None:
        if self.notifier.watchdog is not None and self._periodic is None:
            # a round takes a few ms when healthy, so the pings come every half interval
            self._periodic = Periodic("systemd-watchdog", self.notifier.watchdog / 2, self._round)
            self._periodic.start()

    def serving(self, probe: Probe | None) -> None:
        self._probe = probe
        self._serving = True

    async def _round(self) -> None:
        interval = self.notifier.watchdog
        assert interval is not None
        wait = interval / 8  # how long the Raft tick may take to answer before this ping is withheld
        if not self._serving:
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(interval * 1e6)}")
        elif self._probe is None or await self._probe(wait):
            self.notifier.send("WATCHDOG=1")
        else:
            self.missed += 1
            log.warning("the Raft tick did not answer within %.1fs: withholding the systemd watchdog ping "
                        "(systemd restarts the connector when this lasts %.0fs)", wait, interval)

    async def stop(self) -> None:
        if self._periodic is not None:
            await self._periodic.stop()
            self._periodic = None
