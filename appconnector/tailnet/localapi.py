"""A thin asyncio client of tailscaled's LocalAPI over its unix socket.

Checked against tailscale/tailscale ``client/local`` and ``ipn/localapi``: every request carries
``Host: local-tailscaled.sock`` (tailscaled answers 403 otherwise); ``whois`` answers 404
"no match for IP:port" for addresses it does not know; ``watch-ipn-bus`` streams one JSON ``Notify``
per line (chunked) until the connection closes. JSON field names are Go's field names.

One connection per request (``Connection: close``) except the watch, which holds its own: whois is
cached by ``tailnet.identity`` so requests are rare, and a unix socket connect costs microseconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from appconnector.tailnet.api import TailnetUnavailable

LOCALAPI_HOST = "local-tailscaled.sock"
DEFAULT_SOCKET = "/var/run/tailscale/tailscaled.sock"

# ipn.NotifyWatchOpt bits (tailscale/tailscale ipn/backend.go); values are part of the LocalAPI.
NOTIFY_WATCH_ENGINE_UPDATES = 1 << 0
NOTIFY_INITIAL_STATE = 1 << 1
NOTIFY_INITIAL_PREFS = 1 << 2
NOTIFY_INITIAL_NETMAP = 1 << 3
NOTIFY_NO_PRIVATE_KEYS = 1 << 4
NOTIFY_RATE_LIMIT = 1 << 8          # incompatible with the peer-change bits below (400 since 1.100)
NOTIFY_PEER_CHANGES = 1 << 12       # ≥1.100: PeersChanged / PeersRemoved instead of a full NetMap
NOTIFY_NO_NETMAP = 1 << 13
NOTIFY_INITIAL_STATUS = 1 << 14     # ≥1.100: first Notify carries InitialStatus (an ipnstate.Status)
NOTIFY_PEER_PATCHES = 1 << 15

# What the directory watches: old tailscaled (≤1.96) ignores unknown bits and sends the whole NetMap
# on every change; new tailscaled sends deltas because we ask for NotifyPeerChanges.
DIRECTORY_WATCH_MASK = NOTIFY_INITIAL_STATE | NOTIFY_PEER_CHANGES | NOTIFY_NO_PRIVATE_KEYS

_MAX_BODY = 64 << 20  # a large tailnet's status is a few MB; refuse anything absurd


class LocalAPIError(Exception):
    """tailscaled answered with an HTTP error that is not "unavailable" (4xx)."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body.strip()
        super().__init__(f"LocalAPI HTTP {status}: {self.body}")


def whois_addr(ip: str) -> str:
    """``ip`` as the ``addr=`` value tailscaled accepts on every version: ``IP:port``."""
    if ip.startswith("[") or (ip.count(":") == 1 and "." in ip):
        return ip  # already ip:port
    addr = ipaddress.ip_address(ip)
    return f"[{addr}]:0" if addr.version == 6 else f"{addr}:0"


class LocalAPIClient:
    """Talks to tailscaled at ``socket_path``. Every method raises ``TailnetUnavailable`` when the
    socket cannot be reached, the request times out or tailscaled answers 5xx."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    # ---- public calls -------------------------------------------------------------------------

    async def whois(self, ip: str) -> dict[str, Any] | None:
        """``apitype.WhoIsResponse`` (``Node``, ``UserProfile``, ``CapMap``) or None for a stranger."""
        query = urllib.parse.urlencode({"addr": whois_addr(ip)})
        status, body = await self.request("GET", f"/localapi/v0/whois?{query}")
        if status == 404:
            return None
        return _json_object(self._check(status, body))

    async def status(self) -> dict[str, Any]:
        """``ipnstate.Status``: ``Self``, ``Peer`` (by node key), ``TailscaleIPs``, ``BackendState``."""
        status, body = await self.request("GET", "/localapi/v0/status")
        return _json_object(self._check(status, body))

    async def get_prefs(self) -> dict[str, Any]:
        status, body = await self.request("GET", "/localapi/v0/prefs")
        return _json_object(self._check(status, body))

    async def patch_prefs(self, masked: dict[str, Any]) -> dict[str, Any]:
        """PATCH ``ipn.MaskedPrefs``: only fields whose ``<Field>Set`` is true change. Returns the
        resulting prefs."""
        status, body = await self.request("PATCH", "/localapi/v0/prefs", json.dumps(masked).encode())
        return _json_object(self._check(status, body))

    async def watch_ipn_bus(self, mask: int) -> AsyncIterator[dict[str, Any]]:
        """Yield each ``ipn.Notify`` as a dict until tailscaled closes the stream. Fields tailscaled
        sends as ``null`` are dropped, so ``"NetMap" in n`` means a netmap is present."""
        reader, writer = await self._connect()
        try:
            self._send(writer, "GET", f"/localapi/v0/watch-ipn-bus?mask={mask}", b"", keep_alive=True)
            await writer.drain()
            status, headers = await self._read_head(reader, self.timeout)
            if status != 200:
                body = await self._read_body(reader, headers)
                self._check(status, body)
            buf = b""
            async for chunk in _body_chunks(reader, headers, timeout=None):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield _strip_nulls(_json_object(line))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            raise TailnetUnavailable(f"LocalAPI watch on {self.socket_path}: {e}") from e
        finally:
            writer.close()

    # ---- HTTP/1.1 over the unix socket ------------------------------------------------------------

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One request; returns (status, body). Raises TailnetUnavailable on transport failure."""
        try:
            return await asyncio.wait_for(self._request(method, path, body), self.timeout)
        except TimeoutError as e:
            raise TailnetUnavailable(f"LocalAPI {method} {path}: no answer in {self.timeout:g}s") from e
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            raise TailnetUnavailable(f"LocalAPI {method} {path} on {self.socket_path}: {e}") from e

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = await self._connect()
        try:
            self._send(writer, method, path, body, keep_alive=False)
            await writer.drain()
            status, headers = await self._read_head(reader, None)
            return status, await self._read_body(reader, headers)
        finally:
            writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(asyncio.open_unix_connection(self.socket_path, limit=1 << 20),
                                          self.timeout)
        except (OSError, TimeoutError) as e:
            raise TailnetUnavailable(f"cannot connect to tailscaled at {self.socket_path}: {e}") from e

    @staticmethod
    def _send(writer: asyncio.StreamWriter, method: str, path: str, body: bytes, keep_alive: bool) -> None:
        head = [f"{method} {path} HTTP/1.1", f"Host: {LOCALAPI_HOST}", "User-Agent: appconnector",
                f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        if body or method in ("POST", "PATCH", "PUT"):
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader, timeout: float | None) -> tuple[int, dict[str, str]]:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        out = bytearray()
        async for chunk in _body_chunks(reader, headers, timeout=None):
            out += chunk
            if len(out) > _MAX_BODY:
                raise ValueError("LocalAPI response too large")
        return bytes(out)

    @staticmethod
    def _check(status: int, body: bytes) -> bytes:
        if status >= 500:
            raise TailnetUnavailable(f"LocalAPI HTTP {status}: {body.decode(errors='replace').strip()}")
        if status >= 400:
            raise LocalAPIError(status, body.decode(errors="replace"))
        return body


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str],
                       timeout: float | None) -> AsyncIterator[bytes]:
    """The body of one response: chunked, by Content-Length, or up to EOF."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # trailer end (we send no trailers; tailscaled neither)
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n > _MAX_BODY:
            raise ValueError("LocalAPI response too large")
        if n:
            yield await reader.readexactly(n)
    else:
        while data := await reader.read(65536):
            yield data


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError as e:
        raise LocalAPIError(200, f"not JSON: {body[:200]!r}") from e
    if not isinstance(value, dict):
        raise LocalAPIError(200, f"expected a JSON object, got {type(value).__name__}")
    return value


def _strip_nulls(notify: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in notify.items() if v is not None}
