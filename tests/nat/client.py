"""What a tailnet client does, run inside a client namespace; prints one JSON line.

  client.py http ADDRESS          GET http://ADDRESS:8080/ → {"ok", "body"}
  client.py udp ADDRESS PAYLOAD [SPORT]  one datagram to the echo port → {"ok", "reply"}
  client.py icmp ADDRESS          one echo request (ICMPv6 for an IPv6 address) → {"ok"}
  client.py flows ADDRESS N       N UDP flows (N source ports), one datagram each → {"replies"}
  client.py hold ADDRESS SECONDS  one UDP flow kept alive (a packet every 0.2 s) for SECONDS
  client.py connect ADDRESS       TCP connect to the HTTP port, no retry → {"ok", "errno", "seconds"}
  client.py udperr ADDRESS        connected UDP socket: send, recv → {"ok", "errno", "seconds"}
  client.py pingerr ADDRESS       one echo request; the ICMP error it earns → {"type", "code", "seconds"}
  client.py flood ADDRESS N       N datagrams at once from one socket (fire and forget) → {"sent"}
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import time
import urllib.request

HTTP_PORT = 8080
UDP_PORT = 7007
TIMEOUT = 2.0
FAIL_TIMEOUT = 5.0  # the failure tests' patience: longer than the bound they assert, so a timeout shows


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def http(address: str) -> dict[str, object]:
    host = f"[{address}]" if ":" in address else address
    try:
        with urllib.request.urlopen(f"http://{host}:{HTTP_PORT}/", timeout=TIMEOUT) as r:
            return {"ok": True, "body": r.read().decode()}
    except OSError as e:
        return {"ok": False, "error": str(e)}


def udp(address: str, payload: str, sport: int = 0) -> dict[str, object]:
    with socket.socket(_family(address), socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if ":" in address else "0.0.0.0", sport))
        s.settimeout(TIMEOUT)
        s.sendto(payload.encode(), (address, UDP_PORT))
        try:
            return {"ok": True, "reply": s.recv(2048).decode()}
        except OSError as e:
            return {"ok": False, "error": str(e)}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp(address: str) -> dict[str, object]:
    """One echo request, ICMP or ICMPv6 by the address (the kernel fills in an ICMPv6 checksum and
    delivers ICMPv6 without the IP header)."""
    v6 = ":" in address
    ident = os.getpid() & 0xFFFF
    request, reply = (128, 129) if v6 else (8, 0)
    payload = b"acnat-ping"
    checksum = 0 if v6 else _checksum(struct.pack("!BBHHH", request, 0, 0, ident, 1) + payload)
    packet = struct.pack("!BBHHH", request, 0, checksum, ident, 1) + payload
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    with socket.socket(_family(address), socket.SOCK_RAW, proto) as s:
        s.settimeout(TIMEOUT)
        s.sendto(packet, (address, 0))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                data, peer = s.recvfrom(2048)
            except OSError as e:
                return {"ok": False, "error": str(e)}
            ihl = 0 if v6 else (data[0] & 0x0F) * 4
            kind, _code, _sum, rid, _seq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == reply and rid == ident:
                return {"ok": True, "from": peer[0]}
    return {"ok": False, "error": "no echo reply"}


def _failure(e: OSError | None, t0: float) -> dict[str, object]:
    seconds = time.monotonic() - t0
    if e is None:
        return {"ok": True, "seconds": seconds}
    name = "timeout" if isinstance(e, TimeoutError) else errno.errorcode.get(e.errno or 0, str(e))
    return {"ok": False, "errno": name, "seconds": seconds}


def connect(address: str) -> dict[str, object]:
    with socket.socket(_family(address), socket.SOCK_STREAM) as s:
        s.settimeout(FAIL_TIMEOUT)
        t0 = time.monotonic()
        try:
            s.connect((address, HTTP_PORT))
        except OSError as e:
            return _failure(e, t0)
        return _failure(None, t0)


def udperr(address: str) -> dict[str, object]:
    """A connected UDP socket reports the ICMP error its datagram earned on the next recv."""
    with socket.socket(_family(address), socket.SOCK_DGRAM) as s:
        s.settimeout(FAIL_TIMEOUT)
        s.connect((address, UDP_PORT))
        t0 = time.monotonic()
        s.send(b"anyone?")
        try:
            s.recv(2048)
        except OSError as e:
            return _failure(e, t0)
        return _failure(None, t0)


def pingerr(address: str) -> dict[str, object]:
    """Send one echo request; return the type and code of the ICMP error quoting it (what ping prints
    as "Packet filtered" for type 3 code 13)."""
    ident = (os.getpid() + 1) & 0xFFFF
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    payload = b"acnat-ping"
    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(FAIL_TIMEOUT)
        t0 = time.monotonic()
        s.sendto(packet, (address, 0))
        while time.monotonic() < t0 + FAIL_TIMEOUT:
            try:
                data = s.recv(2048)
            except OSError as e:
                return _failure(e, t0)
            ihl = (data[0] & 0x0F) * 4
            kind, code = data[ihl], data[ihl + 1]
            quoted = data[ihl + 8:]
            if kind == 3 and len(quoted) >= 28:
                qihl = (quoted[0] & 0x0F) * 4
                if socket.inet_ntoa(quoted[16:20]) == address and quoted[qihl + 4:qihl + 6] == struct.pack("!H", ident):
                    return {"ok": False, "type": kind, "code": code, "seconds": time.monotonic() - t0}
            if kind == 0 and data[ihl + 4:ihl + 6] == struct.pack("!H", ident):
                return {"ok": True, "seconds": time.monotonic() - t0}
    return {"ok": False, "errno": "timeout", "seconds": time.monotonic() - t0}


def flood(address: str, n: int) -> dict[str, object]:
    with socket.socket(_family(address), socket.SOCK_DGRAM) as s:
        sent = 0
        for _ in range(n):
            try:
                s.sendto(b"flood", (address, UDP_PORT))
                sent += 1
            except OSError:  # a queued ICMP error surfaces on a later send: not our concern here
                pass
    return {"sent": sent}


def flows(address: str, n: int, batch: int = 100) -> dict[str, object]:
    """``n`` new flows, ``batch`` at a time so the echo server's socket buffer never overflows."""
    replies = 0
    for first in range(0, n, batch):
        socks = []
        for _ in range(min(batch, n - first)):
            s = socket.socket(_family(address), socket.SOCK_DGRAM)
            s.setblocking(False)
            s.sendto(b"flow", (address, UDP_PORT))
            socks.append(s)
        pending = set(range(len(socks)))
        deadline = time.monotonic() + TIMEOUT
        while pending and time.monotonic() < deadline:
            for i in list(pending):
                try:
                    socks[i].recv(2048)
                    replies += 1
                    pending.discard(i)
                except BlockingIOError:
                    pass
            if pending:
                time.sleep(0.005)
        for s in socks:
            s.close()
    return {"replies": replies}


def hold(address: str, seconds: float) -> dict[str, object]:
    """``last_reply``: CLOCK_MONOTONIC (one clock for every namespace) of the last reply, or None."""
    replies = 0
    last: float | None = None
    with socket.socket(_family(address), socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendto(b"hold", (address, UDP_PORT))
            try:
                s.recv(2048)
                replies += 1
                last = time.monotonic()
            except OSError:
                pass
            time.sleep(0.2)
    return {"replies": replies, "last_reply": last}


def main() -> None:
    cmd, address, *rest = sys.argv[1:]
    if cmd == "http":
        out = http(address)
    elif cmd == "udp":
        out = udp(address, rest[0], int(rest[1]) if len(rest) > 1 else 0)
    elif cmd == "icmp":
        out = icmp(address)
    elif cmd == "flows":
        out = flows(address, int(rest[0]))
    elif cmd == "hold":
        out = hold(address, float(rest[0]))
    elif cmd == "connect":
        out = connect(address)
    elif cmd == "udperr":
        out = udperr(address)
    elif cmd == "pingerr":
        out = pingerr(address)
    elif cmd == "flood":
        out = flood(address, int(rest[0]))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
