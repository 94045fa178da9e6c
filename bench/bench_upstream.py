"""New-name upstream lookups per second through ``UpstreamResolver`` against a fast loopback responder.

    .venv/bin/python bench/bench_upstream.py [--names 20000] [--concurrency 1,64]

The responder is a separate process that answers every A query with 192.0.2.1 (raw bytes, no parsing
beyond the question), so the figure is the resolver's own cost per lookup (socket, ID, parse, cache
store). Every name is new: no cache hits. In-process harness figures, not a shipped-product row. On a
shared machine the CPU time per lookup (this process only) moves less than the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import time

from appconnector.dns import wire
from appconnector.dns.upstream import UpstreamResolver


def _responder(port_out: multiprocessing.connection.Connection) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    port_out.send(s.getsockname()[1])
    answer_rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01"
    while True:
        data, addr = s.recvfrom(2048)
        if len(data) < 12:
            continue
        end = 12
        while data[end]:  # the question name: uncompressed labels
            end += data[end] + 1
        end += 5
        reply = (data[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00" + data[10:12] + data[12:end] + answer_rr
                 + data[end:])
        s.sendto(reply, addr)


async def _run(port: int, names: int, concurrency: int) -> tuple[float, float]:
    r = UpstreamResolver([("127.0.0.1", port)])
    queue = iter(range(names))
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for i in queue:
            res = await r.resolve(f"n{i}-{concurrency}.bench.example", wire.TYPE_A)
            ok += res.kind == "ok"

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    r.close()
    assert ok == names, f"only {ok} of {names} lookups succeeded"
    return names / elapsed, cpu / names * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--names", type=int, default=20000)
    p.add_argument("--concurrency", default="1,64")
    args = p.parse_args()
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=_responder, args=(child,), daemon=True)
    proc.start()
    port = parent.recv()
    try:
        print("| concurrency | new-name lookups/s | resolver CPU per lookup |\n|---|---|---|")
        for c in (int(x) for x in args.concurrency.split(",")):
            rate, cpu_us = asyncio.run(_run(port, args.names, c))
            print(f"| {c} | {rate:,.0f} | {cpu_us:.1f} µs |")
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
