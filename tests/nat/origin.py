"""The origin namespace's services: HTTP and UDP echo on each real address, saying which one answered.

Usage: origin.py ADDRESS... ; prints "ready" once every socket is bound.
"""

from __future__ import annotations

import http.server
import socket
import sys
import threading

HTTP_PORT = 8080
UDP_PORT = 7007


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"origin {self.server.server_address[0]} from {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def udp_echo(address: str) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, UDP_PORT))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"echo " + address.encode() + b" " + data, peer)


def main() -> None:
    for address in sys.argv[1:]:
        kind = Server6 if ":" in address else http.server.ThreadingHTTPServer
        server = kind((address, HTTP_PORT), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        threading.Thread(target=udp_echo, args=(address,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
