"""What a tailnet client does, run inside a client namespace; prints one JSON line.

  client.py http ADDRESS          GET http://ADDRESS:8080/ → {"ok", "body"}
  client.py udp ADDRESS PAYLOAD [SPORT]  one datagram to the echo port → {"ok", "reply"}
  client.py icmp ADDRESS          one echo request → {"ok"}
  client.py flows ADDRESS N       N UDP flows (N source ports), one datagram each → {"replies"}
  client.py hold ADDRESS SECONDS  one UDP flow kept alive (a packet every 0.2 s) for SECONDS
"""

from __future__ import annotations

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


def http(address: str) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://{address}:{HTTP_PORT}/", timeout=TIMEOUT) as r:
            return {"ok": True, "body": r.read().decode()}
    except OSError as e:
        return {"ok": False, "error": str(e)}


def udp(address: str, payload: str, sport: int = 0) -> dict[str, object]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
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
    ident = os.getpid() & 0xFFFF
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    payload = b"acnat-ping"
    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(TIMEOUT)
        s.sendto(packet, (address, 0))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                data, peer = s.recvfrom(2048)
            except OSError as e:
                return {"ok": False, "error": str(e)}
            ihl = (data[0] & 0x0F) * 4
            kind, _code, _sum, rid, _seq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and rid == ident:
                return {"ok": True, "from": peer[0]}
    return {"ok": False, "error": "no echo reply"}


def flows(address: str, n: int, batch: int = 100) -> dict[str, object]:
    """``n`` new flows, ``batch`` at a time so the echo server's socket buffer never overflows."""
    replies = 0
    for first in range(0, n, batch):
        socks = []
        for _ in range(min(batch, n - first)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
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
    replies = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendto(b"hold", (address, UDP_PORT))
            try:
                s.recv(2048)
                replies += 1
            except OSError:
                pass
            time.sleep(0.2)
    return {"replies": replies}


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
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
