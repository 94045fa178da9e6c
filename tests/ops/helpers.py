"""Shared helpers of the ops tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET, or a POST when ``data`` is given; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``cond`` until it returns something true (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
