"""The upstream resolver for namespaced connectors: answers every A question with two real addresses
derived from the name (198.18.X.1 and 198.18.X.2), TTL 300; other types NODATA. UDP only (answers are
small). Its socket is opened inside the given namespace."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading

import dnslib

from tests.faults.netns import entered


def targets_of(name: str) -> list[str]:
    x = hashlib.sha256(name.lower().rstrip(".").encode()).digest()[0] % 250
    return [f"198.18.{x}.1", f"198.18.{x}.2"]


class Upstream:
    def __init__(self, address: str, port: int = 53, netns: str | None = None) -> None:
        with entered(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.queries = 0
        self._thread = threading.Thread(target=self._serve, name="acfault-upstream", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            self.queries += 1
            with contextlib.suppress(Exception):
                req = dnslib.DNSRecord.parse(data)
                reply = req.reply()
                if req.q.qtype == dnslib.QTYPE.A:
                    for t in targets_of(str(req.q.qname)):
                        reply.add_answer(dnslib.RR(req.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(t), ttl=300))
                self.sock.sendto(bytes(reply.pack()), addr)

    def close(self) -> None:
        self.sock.close()
