"""The node directory on a real tailscaled (≥1.100, watched with NotifyPeerChanges): a peer change
arrives as PeersChanged and is applied from the watch alone. tailscaled also sends notifications that
carry nothing about peers (only ``Version``, or ``UserProfiles``) right after it; re-reading the whole
status for each of those cost a full status (megabytes on a large tailnet) per netmap change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from appconnector.tailnet.directory import TailnetDirectory
from appconnector.tailnet.localapi import LocalAPIClient
from tests.realnet.tailnet import Tailnet

PEER_FIELDS = ("NetMap", "PeersChanged", "PeersRemoved", "PeerChangedPatch", "SelfChange", "InitialStatus")


class _CountingClient(LocalAPIClient):
    """Counts status reads, and notifications the directory has finished handling."""

    def __init__(self, socket_path: str) -> None:
        super().__init__(socket_path)
        self.status_reads = 0
        self.notes: list[dict[str, Any]] = []
        self.handled = 0

    async def status(self) -> dict[str, Any]:
        self.status_reads += 1
        return await super().status()

    async def watch_ipn_bus(self, mask: int) -> AsyncIterator[dict[str, Any]]:
        async for n in super().watch_ipn_bus(mask):
            self.notes.append(n)
            yield n
            self.handled = len(self.notes)  # the consumer asks for the next: this one is done


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_peer_changes_are_applied_from_the_watch_without_status_reads(shared: Tailnet) -> None:
    c1, cl2 = shared.nodes["c1"], shared.nodes["cl2"]
    sid = cl2.stable_id()

    async def body() -> tuple[int, int, list[dict[str, Any]]]:
        client = _CountingClient(c1.socket)
        d = TailnetDirectory(client)
        await d.start()
        try:
            await _until(lambda: client.handled > 0, 30, "the watch streaming")
            before, start = client.status_reads, len(client.notes)
            for i in range(3):  # until tailscaled has sent (and we handled) a notification without peers
                name = f"watched-cl2-{i}"
                await asyncio.to_thread(cl2.cli, "set", f"--hostname={name}")
                def applied(name: str = name) -> bool:
                    return d.nodes()[sid].name.startswith(name) and client.handled == len(client.notes)
                await _until(applied, 30, f"the rename to {name} applied")
                if any(not any(k in n for k in PEER_FIELDS) for n in client.notes[start:]):
                    break
            return before, client.status_reads, client.notes[start:]
        finally:
            await d.stop()
            await asyncio.to_thread(cl2.cli, "set", f"--hostname={cl2.name}")

    before, after, notes = asyncio.run(body())
    assert any(not any(k in n for k in PEER_FIELDS) for n in notes), notes  # what this test is about
    assert after == before, f"{after - before} full status read(s) for one peer change ({notes})"
