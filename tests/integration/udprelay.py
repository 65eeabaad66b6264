"""A small userspace UDP relay that adds a fixed delay, for the real-stack tests.

This kernel has no ``netem``, so added latency on the direct WireGuard path
between trionet and a tailscaled peer comes from this relay instead. It runs as
its own process (``python -m tests.integration.udprelay``), so its timing does
not share trionet's event loop, and ``Stack.add_delay_relay`` wires it into
the path with nftables (see that docstring for the topology):

* socket **A** (``--client-side``) receives trionet's datagrams, which an
  nftables DNAT rule in trionet's namespace redirects there; it sends the
  peer's datagrams back to trionet from that same socket, and conntrack turns
  their source back into the peer's address, so trionet sees an ordinary
  direct path to ``peer_ip:41641``;
* socket **B** (``--peer-side``) forwards trionet's datagrams to the peer and
  receives the peer's answers. The peer sees trionet at B's address, the way it
  would see a node behind a NAT, and learns it from disco like any endpoint.

Every datagram is held ``--delay`` seconds in each direction (FIFO, so the
order is kept) and nothing is dropped on purpose. Large socket buffers keep the
relay from adding loss of its own; the kernel's drop counters for both sockets
are reported on stdout when the relay stops (SIGTERM), as one JSON line with
the packet counts, so a test can tell relay loss from the loss it asked for.
"""

from __future__ import annotations

import argparse
import collections
import json
import selectors
import signal
import socket
import sys
import time

BUFFER = 8 << 20


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _socket(bind: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER)
        # SO_RCVBUFFORCE ignores net.core.rmem_max (we run as root in tests)
        force = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32}[opt]
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, BUFFER)
        except OSError:
            pass
    sock.bind(bind)
    sock.setblocking(False)
    return sock


def _kernel_drops(sock: socket.socket) -> int:
    """The `drops` column of /proc/net/udp for this socket (receive-buffer overflows); -1 if not found."""
    port = sock.getsockname()[1]
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if int(cols[1].split(":")[1], 16) == port:
                return int(cols[12])
    return -1


def serve(client_side: tuple[str, int], peer_side: tuple[str, int], peer: tuple[str, int], delay: float) -> None:
    a = _socket(client_side)
    b = _socket(peer_side)
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, "a")
    sel.register(b, selectors.EVENT_READ, "b")
    # (due, data, destination) per direction; a fixed delay keeps each queue sorted
    to_peer: collections.deque[tuple[float, bytes]] = collections.deque()
    to_client: collections.deque[tuple[float, bytes]] = collections.deque()
    client: tuple[str, int] | None = None
    counts = collections.Counter[str]()
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps({"ready": True, "a": a.getsockname(), "b": b.getsockname()}), flush=True)
    while running:
        now = time.monotonic()
        while to_peer and to_peer[0][0] <= now:
            _, data = to_peer.popleft()
            try:
                b.sendto(data, peer)
                counts["to_peer"] += 1
                counts["to_peer_bytes"] += len(data)
            except BlockingIOError:
                counts["to_peer_send_full"] += 1
        while to_client and to_client[0][0] <= now and client is not None:
            _, data = to_client.popleft()
            try:
                a.sendto(data, client)
                counts["to_client"] += 1
                counts["to_client_bytes"] += len(data)
            except BlockingIOError:
                counts["to_client_send_full"] += 1
        due = [q[0][0] for q in (to_peer, to_client) if q]
        timeout = max(0.0, min(due) - now) if due else 0.5
        for key, _ in sel.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            for _ in range(256):  # drain what is there, then look at the clock again
                try:
                    data, src = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                t = time.monotonic() + delay
                if key.data == "a":
                    client = src
                    to_peer.append((t, data))
                elif src == peer and client is not None:
                    to_client.append((t, data))
                else:  # before trionet spoke there is nobody to send it to
                    counts["from_peer_unroutable"] += 1
    counts["a_kernel_drops"] = _kernel_drops(a)
    counts["b_kernel_drops"] = _kernel_drops(b)
    print(json.dumps({"stopped": True, **counts}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--client-side", required=True, help="IP:PORT of socket A (trionet's traffic is DNATed here)")
    p.add_argument("--peer-side", required=True, help="IP:PORT of socket B (the peer sees trionet here)")
    p.add_argument("--peer", required=True, help="the peer's IP:PORT")
    p.add_argument("--delay", type=float, default=0.05, help="seconds added in each direction")
    args = p.parse_args(argv)
    serve(_addr(args.client_side), _addr(args.peer_side), _addr(args.peer), args.delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
