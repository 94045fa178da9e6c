"""Shared helpers of the tailnet tests: a stand-in state and a condition poller."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from tests.localapi_standin import Standin

TAG = "tag:appconnector"


def base_state(style: str = "netmap") -> dict[str, Any]:
    return {
        "style": style,
        "self": {"stable_id": "nConn1", "node_id": 1, "name": "conn-1",
                 "addresses": ["100.100.0.1", "fd7a:115c:a1e0::1"], "tags": [TAG]},
        "peers": [
            {"stable_id": "nClientA", "node_id": 10, "name": "client-a", "addresses": ["100.101.0.10"]},
            {"stable_id": "nConn2", "node_id": 2, "name": "conn-2", "addresses": ["100.100.0.2"], "tags": [TAG]},
        ],
    }


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``cond`` until it holds or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def started(sock: str, state: dict[str, Any]) -> Standin:
    s = Standin(sock, state)
    await s.start()
    return s


