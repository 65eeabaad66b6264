"""A DNS server for the MagicDNS tests: what Headscale's `nameservers.global` points at.

It knows a few names of its own (A records) and says NXDOMAIN to the rest,
over UDP and TCP on one address, port 53 (Headscale takes a bare IP there,
so the port cannot be another). It records the names it was asked, so a test
can tell a forwarded answer from a local one. Threads, not Trio: tailscaled
and trionet both ask it while the test's own code blocks.
"""

from __future__ import annotations

import socket
import struct
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

TTL = 30


class UpstreamDns:
    def __init__(self, ip: str, names: dict[str, str], port: int = 53) -> None:
        self.ip, self.port = ip, port
        self.names = {k.lower().rstrip(".") + ".": v for k, v in names.items()}
        self.asked: list[str] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []

    def start(self) -> UpstreamDns:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((self.ip, self.port))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((self.ip, self.port))
        tcp.listen(16)
        self._socks = [udp, tcp]
        threading.Thread(target=self._udp, args=(udp,), daemon=True).start()
        threading.Thread(target=self._tcp, args=(tcp,), daemon=True).start()
        return self

    def stop(self) -> None:
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text().lower()
        with self._lock:
            self.asked.append(name)
        reply = dns.message.make_response(query)
        address = self.names.get(name)
        if address is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(question.name, TTL, "IN", "A", address))
        return reply.to_wire()

    def _udp(self, sock: socket.socket) -> None:
        while True:
            try:
                data, addr = sock.recvfrom(65535)
                sock.sendto(self.answer(data), addr)
            except OSError:
                return
            except Exception:  # a query it cannot read: no answer, keep serving
                continue

    def _tcp(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buf = b""
        try:
            while True:
                while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                n = int.from_bytes(buf[:2], "big")
                reply = self.answer(buf[2:2 + n])
                buf = buf[2 + n:]
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except (OSError, ValueError):
            return
        finally:
            conn.close()
