"""A :class:`~tests.faults.workload.Target` that asks a running connector over real DNS (UDP, then TCP on TC).

Standalone mode: the node is the client IP, so each node is a loopback source address (127.0.0.x) the
query is sent from. An A answer is a ``resolve`` in the history (the connector answered from local
state or through a checkout); SERVFAIL or silence is unknown (the checkout may have been applied).
"""

from __future__ import annotations

import ipaddress
import socket

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.faults.history import RESOLVE
from tests.faults.netns import entered
from tests.faults.workload import Exhausted, Unavailable


class DnsTarget:
    kind = RESOLVE

    def __init__(self, name: str, host: str, port: int, netns: str | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.netns = netns  # the namespace the client sockets are opened in (None: this one)

    def query(self, node: str, domain: str, timeout: float, qtype: str = "A") -> dns.message.Message:
        q = dns.message.make_query(domain, qtype)
        try:
            with entered(self.netns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                sock.bind((node, 0))
                sock.setblocking(False)  # dnspython waits with select; a blocking socket would ignore timeout
                r = dns.query.udp(q, self.host, port=self.port, timeout=timeout, sock=sock)
            if r.flags & dns.flags.TC:
                with entered(self.netns):
                    tsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                with tsock:
                    tsock.bind((node, 0))
                    tsock.settimeout(timeout)
                    tsock.connect((self.host, self.port))
                    tsock.setblocking(False)
                    r = dns.query.tcp(q, self.host, port=self.port, timeout=timeout, sock=tsock)
        except (dns.exception.Timeout, OSError) as e:
            raise Unavailable(f"no answer: {type(e).__name__}") from None
        return r

    def checkout(self, node: str, domain: str, timeout: float) -> int:
        r = self.query(node, domain, timeout)
        rc = r.rcode()
        if rc != dns.rcode.NOERROR:
            # SERVFAIL: upstream failure, no leader or pool exhausted; the write may have been applied.
            raise Unavailable(f"rcode {dns.rcode.to_text(rc)}")
        addrs = [str(rd) for rrset in r.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset]
        if len(addrs) != 1:
            raise Exhausted(f"{len(addrs)} A records in the answer") if not addrs else \
                AssertionError(f"{domain}: {len(addrs)} A records {addrs}")
        return int(ipaddress.IPv4Address(addrs[0]))

    def lookup(self, node: str, domain: str, timeout: float) -> int | None:
        raise NotImplementedError("DNS has no read-only lookup")

    def domain_for(self, node: str, address: int, timeout: float) -> str | None:
        raise NotImplementedError("DNS has no reverse lookup of pool addresses")

    def touch(self, node: str, address: int, domain: str, at: float, timeout: float) -> bool:
        raise NotImplementedError("touches come from the NAT seen set, not from DNS clients")


def loopback_nodes(count: int, base: int = 40) -> list[str]:
    """Loopback source addresses used as standalone-mode nodes (127.0.0.40, .41, ...)."""
    return [f"127.0.0.{base + i}" for i in range(count)]


def can_bind(addr: str) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((addr, 0))
        return True
    except OSError:
        return False
    finally:
        s.close()
