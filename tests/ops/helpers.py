"""Shared helpers of the ops tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the real ``appconnector`` command in a process of its own."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "appconnector.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=timeout, check=False)
