"""A connector that cannot start says why, exits 1 and leaves nothing running (docs/design.md §7)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from appconnector import app, config
from tests.ops.helpers import free_port
from tests.tailnet.helpers import base_state, started


def test_tailscaled_refusing_the_routes_is_exit_1_and_stops_the_watch(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[int, list[str]]:
        sock = str(tmp_path / "tailscaled.sock")
        standin = await started(sock, {**base_state(), "prefs_write": False})
        try:
            cfg = config.load(None, env={
                "APPCONNECTOR_TAILNET_LOCALAPI_SOCKET": sock, "APPCONNECTOR_CLUSTER_STATE_DIR": str(tmp_path / "s"),
                "APPCONNECTOR_NAT_ENABLED": "false", "APPCONNECTOR_DNS_LISTEN": f"127.0.0.1:{free_port()}",
                "APPCONNECTOR_HTTP_LISTEN": f"127.0.0.1:{free_port()}"})
            code = await app.serve(cfg)
            left = sorted(t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())
        finally:
            await standin.stop()
        return code, left

    with caplog.at_level(logging.ERROR, logger="appconnector.app"):
        code, left = asyncio.run(main())
    assert code == 1
    assert "cannot start: tailscaled" in caplog.text and "prefs write access denied" in caplog.text
    assert not [name for name in left if name.startswith("tailnet-")], left
