"""Abrupt proxy clients, and the counts they must leave where they found them.

As a program (``python -m tests.integration.hostile_clients CONFIG_JSON``) it plays
``count`` clients against trionet's SOCKS5, HTTP and --forward listeners, spread
evenly over every step at which a client can vanish (`STEPS`) and both ways of
vanishing (FIN: a program that exits; RST: one killed with data unread), ``concurrency``
at a time; plus ``stallers`` clients per handshake proxy that send half a handshake
and wait for the proxy to give up on them. With ``serve`` set it plays --serve's
clients instead, from a tailscaled peer's namespace through that peer's SOCKS5
proxy. It prints one JSON object: what each client saw, and how long it all took.

`netstack_counts` is what the test compares before and after.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

CLIENT_TIMEOUT = 60.0  # a client that needs longer counts as "timeout" (never expected)
STALL_LIMIT = 120.0  # how long a staller waits for the proxy to close it


def netstack_counts(node: Any) -> dict[str, int]:
    """A node's netstack: live TCP connections (any state, TIME_WAIT included),
    half-open ones, listeners, UDP endpoints: the gauges `status --json` shows."""
    stats = node.stack.statistics()
    return {"tcp_connections": stats["tcp_connections"], "tcp_half_open": stats["tcp_half_open"],
            "tcp_listeners": stats["tcp_listeners"], "udp_endpoints": stats["udp_sockets"]}


def tcp_states(node: Any) -> dict[str, int]:
    """The node's TCP connections by state: what is left, when something is."""
    return dict(Counter(c.state.name for c in node.stack.core.conns.values()))


def open_fds(pid: int | str = "self") -> dict[int, str]:
    out: dict[int, str] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed while we looked (the listing's own descriptor)
            pass
    return out


# ------------------------------------------------------------------ the clients


def socks_address(host: str, port: int) -> bytes:
    try:
        return b"\x01" + socket.inet_aton(host) + struct.pack("!H", port)
    except OSError:
        name = host.encode()
        return bytes([3, len(name)]) + name + struct.pack("!H", port)


async def recv_exactly(s: trio.SocketStream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await s.receive_some(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


class Targets:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.peer = (cfg["peer_host"], cfg["peer_port"])
        self.black_hole = (cfg["black_hole"], 80)

    def connect_request(self, target: tuple[str, int]) -> bytes:
        return b"\x05\x01\x00" + socks_address(*target)


Step = Callable[[Targets, trio.SocketStream], Awaitable[None]]


async def _nothing(t: Targets, s: trio.SocketStream) -> None:
    pass


async def _s5_mid_greeting(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(b"\x05")


async def _s5_after_greeting(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(b"\x05\x01\x00")
    await recv_exactly(s, 2)


async def _s5_mid_request(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(b"\x05\x01\x00")
    await recv_exactly(s, 2)
    await s.send_all(t.connect_request(t.peer)[:5])


async def _s5_connecting_black_hole(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(b"\x05\x01\x00" + t.connect_request(t.black_hole))
    await recv_exactly(s, 2)
    await trio.sleep(0.05)  # the request read and the dial under way (it never completes)


async def _s5_connecting_peer(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(b"\x05\x01\x00" + t.connect_request(t.peer))  # gone before any answer


async def _s5_after_reply(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(b"\x05\x01\x00" + t.connect_request(t.peer))
    await recv_exactly(s, 12)


async def _s5_after_reply_mid_request(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(b"\x05\x01\x00" + t.connect_request(t.peer))
    await recv_exactly(s, 12)
    await s.send_all(b"GET /index.html HTTP/1.0\r\n")  # half a request through the tunnel


UDP_ASSOCIATE = b"\x05\x01\x00\x05\x03\x00\x01" + bytes(6)


async def _s5_udp_after_request(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(UDP_ASSOCIATE)


async def _s5_udp_after_reply(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(UDP_ASSOCIATE)
    reply = await recv_exactly(s, 12)
    if len(reply) < 12 or reply[3] != 0:
        return
    relay = (socket.inet_ntoa(reply[6:10]), struct.unpack("!H", reply[10:12])[0])
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        datagram = b"\x00\x00\x00" + socks_address(t.cfg["peer_host"], t.cfg["peer_udp_port"]) + b"hi"
        await udp.sendto(datagram, relay)
        with trio.move_on_after(0.2):  # the echo, if it comes in time; gone either way
            await udp.recv(2048)


def _http_connect(target: tuple[str, int]) -> bytes:
    return f"CONNECT {target[0]}:{target[1]} HTTP/1.1\r\nHost: {target[0]}:{target[1]}\r\n\r\n".encode()


async def _http_mid_head(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(_http_connect(t.peer)[:20])


async def _http_connecting_black_hole(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(_http_connect(t.black_hole))
    await trio.sleep(0.05)


async def _http_after_200(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(_http_connect(t.peer))
    await recv_exactly(s, 39)


async def _fwd_mid_request(t: Targets, s: trio.SocketStream) -> None:
    await s.send_all(b"GET /index.html HTTP/1.0\r\n")


#: step name -> (listener, what the client does before it vanishes)
STEPS: dict[str, tuple[str, Step]] = {
    "socks5.accepted": ("socks5", _nothing),
    "socks5.mid_greeting": ("socks5", _s5_mid_greeting),
    "socks5.after_greeting": ("socks5", _s5_after_greeting),
    "socks5.mid_request": ("socks5", _s5_mid_request),
    "socks5.connecting_black_hole": ("socks5", _s5_connecting_black_hole),
    "socks5.connecting_peer": ("socks5", _s5_connecting_peer),
    "socks5.after_reply": ("socks5", _s5_after_reply),
    "socks5.relaying": ("socks5", _s5_after_reply_mid_request),
    "socks5.udp_after_request": ("socks5", _s5_udp_after_request),
    "socks5.udp_after_reply": ("socks5", _s5_udp_after_reply),
    "http.accepted": ("http", _nothing),
    "http.mid_head": ("http", _http_mid_head),
    "http.connecting_black_hole": ("http", _http_connecting_black_hole),
    "http.after_200": ("http", _http_after_200),
    "forward.at_once": ("forward", _nothing),
    "forward.mid_request": ("forward", _fwd_mid_request),
}
HOWS = ("close", "reset")


async def drop(s: trio.SocketStream, how: str) -> None:
    if how == "reset":
        with_linger = struct.pack("ii", 1, 0)
        try:
            s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, with_linger)
        except OSError:
            pass
    await s.aclose()


async def _one(cfg: dict[str, Any], targets: Targets, step: str, how: str, seen: Counter[str]) -> None:
    listener, script = STEPS[step]
    try:
        with trio.fail_after(CLIENT_TIMEOUT):
            try:
                s = await trio.open_tcp_stream("127.0.0.1", cfg["ports"][listener])
            except OSError:
                seen["connect_failed"] += 1  # never reached the proxy
                return
            try:
                await script(targets, s)
            finally:
                await drop(s, how)
        seen["ok"] += 1
    except trio.TooSlowError:
        seen[f"timeout.{step}"] += 1
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        seen[f"{type(exc).__name__}.{step}"] += 1  # the proxy may answer an early RST with its own


async def _staller(cfg: dict[str, Any], listener: str, seen: Counter[str], waited: list[float]) -> None:
    """Half a handshake, then silence: the proxy must close us at its handshake timeout."""
    partial = b"\x05\x01\x00\x05\x01" if listener == "socks5" else b"CONNECT ts1:80 HTTP/1.1\r\nHost:"
    start = time.monotonic()
    try:
        with trio.fail_after(STALL_LIMIT):
            s = await trio.open_tcp_stream("127.0.0.1", cfg["ports"][listener])
            await s.send_all(partial)
            while await s.receive_some(4096):
                pass
            await s.aclose()
        seen[f"stall.{listener}.closed_by_proxy"] += 1
        waited.append(time.monotonic() - start)
    except trio.TooSlowError:
        seen[f"stall.{listener}.never_closed"] += 1
    except (OSError, trio.BrokenResourceError) as exc:
        seen[f"stall.{listener}.{type(exc).__name__}"] += 1
        waited.append(time.monotonic() - start)


async def storm(cfg: dict[str, Any]) -> dict[str, Any]:
    targets = Targets(cfg)
    steps = [s for s in STEPS if STEPS[s][0] in cfg["ports"]]
    combos = [(s, h) for s in steps for h in HOWS]
    seen: Counter[str] = Counter()
    waited: list[float] = []
    planned: Counter[str] = Counter()
    limiter = trio.Semaphore(cfg["concurrency"])
    start = time.monotonic()

    async def client(step: str, how: str) -> None:
        try:
            await _one(cfg, targets, step, how, seen)
        finally:
            limiter.release()

    async with trio.open_nursery() as stallers:
        for listener in ("socks5", "http"):
            for _ in range(cfg.get("stallers", 0) if listener in cfg["ports"] else 0):
                stallers.start_soon(_staller, cfg, listener, seen, waited)
        async with trio.open_nursery() as nursery:
            for i in range(cfg["count"]):
                step, how = combos[i % len(combos)]
                planned[f"{step}.{how}"] += 1
                await limiter.acquire()
                nursery.start_soon(client, step, how)
        storm_done = time.monotonic() - start
    return {"clients": cfg["count"], "storm_seconds": round(storm_done, 2),
            "with_stallers_seconds": round(time.monotonic() - start, 2),
            "seen": dict(seen), "planned": dict(planned),
            "stall_waits": [round(w, 1) for w in sorted(waited)]}


# ------------------------------------------------- --serve, from a tailscaled peer


async def _serve_client(cfg: dict[str, Any], step: str, how: str, seen: Counter[str]) -> None:
    """Through the peer's SOCKS5 proxy to one of our --serve ports."""
    target = (cfg["serve_ip"], cfg["serve_ports"][step])
    try:
        with trio.fail_after(CLIENT_TIMEOUT):
            s = await trio.open_tcp_stream("127.0.0.1", cfg["peer_socks_port"])
            try:
                await s.send_all(b"\x05\x01\x00\x05\x01\x00" + socks_address(*target))
                reply = await recv_exactly(s, 12)
                seen[f"{step}.reply_{reply[3] if len(reply) > 3 else 'none'}"] += 1
                if step == "echo" and len(reply) == 12 and reply[3] == 0:
                    await s.send_all(b"x")
                    await recv_exactly(s, 1)
            finally:
                await drop(s, how)
    except trio.TooSlowError:
        seen[f"timeout.{step}"] += 1
    except (OSError, trio.BrokenResourceError) as exc:
        seen[f"{type(exc).__name__}.{step}"] += 1


async def serve_storm(cfg: dict[str, Any]) -> dict[str, Any]:
    seen: Counter[str] = Counter()
    limiter = trio.Semaphore(cfg["concurrency"])
    combos = [(s, h) for s in cfg["serve_ports"] for h in HOWS]
    start = time.monotonic()

    async def client(step: str, how: str) -> None:
        try:
            await _serve_client(cfg, step, how, seen)
        finally:
            limiter.release()

    async with trio.open_nursery() as nursery:
        for i in range(cfg["count"]):
            await limiter.acquire()
            nursery.start_soon(client, *combos[i % len(combos)])
    return {"clients": cfg["count"], "storm_seconds": round(time.monotonic() - start, 2), "seen": dict(seen)}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    result = trio.run(serve_storm if "serve_ports" in cfg else storm, cfg)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
