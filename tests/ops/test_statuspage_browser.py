"""The status page in a real headless browser (Debian's chromium, over the DevTools protocol), served by
a running 3-member cluster of ``appconnector run`` processes (standalone, static peers, shared secret).

The screenshot is saved under ``${APPCONNECTOR_ARTIFACTS:-/tmp}/appconnector-statuspage/`` (the path
is printed); ``docs/statuspage.png`` is one of these.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appconnector.statuspage import REFRESH_SECONDS
from tests.faults.dnsclient import DnsTarget
from tests.ops.helpers import REPO, free_port, http, wait_until

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (./dev deps installs it)")


# ---- a cluster of real connectors -------------------------------------------------------------------


@dataclass
class Member:
    raft: str
    dns_port: int
    http: str
    admin: str
    state: Path
    proc: subprocess.Popen[bytes] | None = None

    def get(self, path: str, admin: bool = False, headers: dict[str, str] | None = None) -> tuple[int, str]:
        try:
            return http(f"http://{self.admin if admin else self.http}{path}", None, headers)
        except OSError as e:
            return 0, str(e)

    def token(self) -> str:
        return (self.state / "admin.token").read_text().strip()


@contextmanager
def cluster(tmp: Path, size: int = 3) -> Iterator[list[Member]]:
    secret = tmp / "secret"
    secret.write_text("status-page-test-secret\n")
    secret.chmod(0o600)
    members = [Member(f"127.0.0.1:{free_port()}", free_port(), f"127.0.0.1:{free_port()}",
                      f"127.0.0.1:{free_port()}", tmp / f"state{i}") for i in range(size)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    try:
        for i, m in enumerate(members):
            peers = ", ".join(f'"{o.raft}"' for o in members if o is not m)
            cfg = tmp / f"c{i}.toml"
            cfg.write_text(f"""[tailnet]
mode = "standalone"
[dns]
listen = ["127.0.0.1:{m.dns_port}"]
verify_upstream = false
[cluster]
state_dir = "{m.state}"
self = "{m.raft}"
peers = [{peers}]
secret_file = "{secret}"
[nat]
enabled = false
[http]
listen = "{m.http}"
admin_listen = "{m.admin}"
""")
            with (tmp / f"m{i}.log").open("wb") as log:
                m.proc = subprocess.Popen([sys.executable, "-m", "appconnector.cli", "run", "--config", str(cfg)],
                                          cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True)

        def all_ready() -> bool:
            for i, m in enumerate(members):
                assert m.proc is not None and m.proc.poll() is None, \
                    f"member {i} exited: {(tmp / f'm{i}.log').read_text()[-3000:]}"
            return all(m.get("/readyz")[0] == 200 for m in members)
        wait_until(all_ready, 90, "all three members ready (a leader known, caught up)")
        yield members
    finally:
        for m in members:
            if m.proc is not None and m.proc.poll() is None:
                os.killpg(m.proc.pid, signal.SIGTERM)
        for m in members:
            if m.proc is not None:
                try:
                    m.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(m.proc.pid, signal.SIGKILL)
                    m.proc.wait()


# ---- chromium over the DevTools protocol -------------------------------------------------------------


class Browser:
    """Headless chromium; one page driven over its DevTools websocket (aiohttp's client)."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        self.profile = profile
        self.proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                      f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self._id = 0
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self) -> None:
        port_file = self.profile / "DevToolsActivePort"  # chromium writes its port here once it listens
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port in 60 s"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        pages: list[dict[str, Any]] = []
        while not pages:  # the first tab may appear just after the port opens
            assert time.monotonic() < deadline, "chromium opened no page in 60 s"
            async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t.get("type") == "page"]
            if not pages:
                await asyncio.sleep(0.05)
        page = pages[0]
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self._id += 1
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # events in between are not needed here
            msg = json.loads((await asyncio.wait_for(self.ws.receive(), 30)).data)
            if msg.get("id") == self._id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                result: dict[str, Any] = msg.get("result", {})
                return result

    async def js(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, f"{expression}: {r['exceptionDetails']}"
        return r["result"].get("value")

    async def wait_js(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what} ({expression})")

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_js(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", 30,
                           f"{url} to load")

    async def type_into(self, element_id: str, text: str) -> None:
        """Focus a field and type into it as keystrokes would."""
        await self.js(f"document.getElementById({json.dumps(element_id)}).focus()")
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> None:
        height = int(await self.js("document.documentElement.scrollHeight"))
        await self.send("Emulation.setDeviceMetricsOverride", width=1200, height=height, deviceScaleFactor=1,
                        mobile=False)
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _artifacts() -> Path:
    out = Path(os.environ.get("APPCONNECTOR_ARTIFACTS") or tempfile.gettempdir()) / "appconnector-statuspage"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_status_page_in_chromium_shows_the_cluster_and_answers_lookups(tmp_path: Path) -> None:
    with cluster(tmp_path) as members:
        # a mapping to look up: node 127.0.0.1 asks a follower for example.com
        st = json.loads(members[0].get("/cluster/members")[1])
        leader = next(m for m in members if m.raft == st["leader"])
        follower = next(m for m in members if m is not leader)
        address = str(ipaddress.IPv4Address(
            DnsTarget("follower", "127.0.0.1", follower.dns_port).checkout("127.0.0.1", "example.com", 10)))

        for i, domain in enumerate(("example.org", "example.net")):  # the leader answers some too
            DnsTarget("leader", "127.0.0.1", leader.dns_port).checkout(f"127.0.0.{2 + i}", domain, 10)

        # JavaScript off: the numbers are in the HTML of a plain GET (here a follower's read-only page)
        code, html = follower.get("/")
        fst = json.loads(follower.get("/cluster/members")[1])
        assert code == 200 and f'<code id="leader">{fst["leader"]}</code>' in html
        assert f'<span id="term">{fst["term"]:,}</span>' in html
        for m in fst["members"]:
            assert f'<code class="member">{m}</code>' in html, m
        wait_until(lambda: '<span id="mappings">3</span>' in follower.get("/")[1], 10,
                   "the follower's page to count the mapping")
        assert address not in follower.get("/")[1], "no pool address on the read-only page"

        asyncio.run(_drive_browser(tmp_path, leader, address))


async def _drive_browser(tmp_path: Path, leader: Member, address: str) -> None:
    browser = Browser(tmp_path / "chromium")
    try:
        await browser.connect()
        # the leader's admin listener: the copy of the page with the lookup box (and every member's lag)
        await browser.open(f"http://{leader.admin}/")
        doc = json.loads(leader.get("/cluster/members")[1])
        shown = await browser.js("[...document.querySelectorAll('code.member')].map(e => e.textContent)")
        assert sorted(shown) == sorted(doc["members"]) and len(shown) == 3
        assert await browser.js("document.getElementById('leader').textContent") == doc["leader"]
        roles = await browser.js("Object.fromEntries([...document.querySelectorAll('#s-members tbody tr')]"
                                 ".map(r => [r.querySelector('code.member').textContent,"
                                 " r.querySelector('.role').textContent]))")
        assert roles == {m: "leader" if m == doc["leader"] else "follower" for m in doc["members"]}

        # it refreshes itself without reloading: the marker set on this document survives the update
        before = await browser.js("window.__probe = 'same document'; document.getElementById('updated').textContent")
        await browser.wait_js(f"document.getElementById('updated').textContent !== {json.dumps(before)}",
                              REFRESH_SECONDS * 3 + 5, "the page to refresh itself")
        assert await browser.js("window.__probe") == "same document"

        # the lookup box: a wrong token is refused, the real one answers node × domain → address
        await browser.type_into("token", "not-the-token")
        await browser.type_into("node", "127.0.0.1")
        await browser.type_into("domain", "example.com")
        await browser.js("document.getElementById('go').click()")
        refused = await browser.wait_js("document.getElementById('answer').textContent.startsWith('HTTP')", 10,
                                        "the refusal")
        assert refused and "401" in await browser.js("document.getElementById('answer').textContent")
        await browser.js("document.getElementById('token').value = ''")
        await browser.type_into("token", leader.token())
        await browser.js("document.getElementById('go').click()")
        got = await browser.wait_js("(document.getElementById('address') || {}).textContent", 10, "the lookup answer")
        assert got == address
        assert "example.com" in await browser.js("document.getElementById('answer').textContent")
        await browser.js("document.getElementById('use').click()")
        await browser.wait_js("document.getElementById('nodeuse').textContent.includes('127.0.0.1')", 10,
                              "the per-node use list")
        assert await browser.js("document.cookie") == "", "the token is never put in a cookie"

        path = _artifacts() / "statuspage.png"
        await browser.screenshot(path)
        assert path.stat().st_size > 10_000
        print(f"status page screenshot: {path}")

        # and with JavaScript off in the browser the same numbers are there (server-rendered)
        await browser.send("Emulation.setScriptExecutionDisabled", value=True)
        await browser.send("Page.reload", ignoreCache=True)
        await browser.wait_js("document.readyState === 'complete' && window.__probe === undefined", 30,
                              "the page to load again without JavaScript")
        assert await browser.js("document.getElementById('leader').textContent") == doc["leader"]
        assert await browser.js("document.querySelectorAll('code.member').length") == 3
    finally:
        await browser.close()
