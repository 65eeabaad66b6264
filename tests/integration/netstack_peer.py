"""The kernel side of the netstack tests: run inside the namespace.

    python netstack_peer.py server-send PORT NBYTES [6]
    python netstack_peer.py server-recv PORT [6]
    python netstack_peer.py client-send HOST PORT NBYTES
    python netstack_peer.py client-recv HOST PORT
    python netstack_peer.py udp-echo PORT [6]

Prints READY once listening, then one result line ``<nbytes> <sha256> <cpu s>``.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import time

BLOCK = random.Random(252).randbytes(1 << 20)


def pattern(n: int) -> bytes:
    return (BLOCK * (n // len(BLOCK) + 1))[:n]


def send_stream(sock: socket.socket, n: int) -> str:
    h = hashlib.sha256()
    view = memoryview(BLOCK)
    left = n
    while left:
        chunk = view[:min(left, len(BLOCK))]
        sock.sendall(chunk)
        h.update(chunk)
        left -= len(chunk)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    return h.hexdigest()


def recv_stream(sock: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        h.update(data)
        total += len(data)
    return total, h.hexdigest()


def listener(port: int, v6: bool) -> socket.socket:
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if v6 else "0.0.0.0", port))
    s.listen(8)
    print("READY", flush=True)
    return s


def main(argv: list[str]) -> None:
    mode = argv[0]
    t0 = time.process_time()
    if mode == "server-send":
        s = listener(int(argv[1]), len(argv) > 3)
        c, _ = s.accept()
        n = int(argv[2])
        digest = send_stream(c, n)
        print(n, digest, round(time.process_time() - t0, 3), flush=True)
    elif mode == "server-recv":
        s = listener(int(argv[1]), len(argv) > 2)
        c, _ = s.accept()
        n, digest = recv_stream(c)
        print(n, digest, round(time.process_time() - t0, 3), flush=True)
    elif mode == "client-send":
        c = socket.create_connection((argv[1], int(argv[2])), timeout=600)
        n = int(argv[3])
        digest = send_stream(c, n)
        print(n, digest, round(time.process_time() - t0, 3), flush=True)
    elif mode == "client-recv":
        c = socket.create_connection((argv[1], int(argv[2])), timeout=600)
        c.shutdown(socket.SHUT_WR)
        n, digest = recv_stream(c)
        print(n, digest, round(time.process_time() - t0, 3), flush=True)
    elif mode == "udp-echo":
        fam = socket.AF_INET6 if len(argv) > 2 else socket.AF_INET
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(argv[1])))
        print("READY", flush=True)
        while True:
            data, addr = u.recvfrom(65536)
            if data == b"quit":
                break
            u.sendto(b"echo:" + data, addr)
        print(0, "-", 0, flush=True)
    elif mode == "udp-send":
        fam = socket.AF_INET6 if ":" in argv[1] else socket.AF_INET
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.sendto(argv[3].encode(), (argv[1], int(argv[2])))
        print(0, "-", 0, flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
