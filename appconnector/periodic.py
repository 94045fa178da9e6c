"""One way to run a background round on the event loop every few seconds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    """Awaits ``round()`` every ``interval`` seconds from ``start()`` until ``stop()``.

    A round that fails never ends the loop: an exception of a ``retried`` type (one the next round
    retries, e.g. ``pool.api.PoolError``: a write that was not committed) is logged at info; anything
    else is logged with its traceback.
    """

    def __init__(self, name: str, interval: float, round: Callable[[], Awaitable[None]], *,
                 retried: tuple[type[Exception], ...] = ()) -> None:
        self.name = name
        self.interval = interval
        self._round = round
        self._retried = retried
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin on the running loop; the first round runs at once."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Cancel the loop and wait for it; a round in progress is cancelled. Idempotent."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._round()
            except self._retried as e:
                log.info("%s: %s; the next round retries", self.name, e)
            except Exception:
                log.exception("%s: round failed", self.name)
            await asyncio.sleep(self.interval)
