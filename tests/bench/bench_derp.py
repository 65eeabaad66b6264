"""DERP (and disco/STUN codec) throughput: packets per second, one process.

    .venv/bin/python -m tests.bench.bench_derp                 # codec + in-process relay
    .venv/bin/python -m tests.bench.bench_derp --headscale 0.29.3 --json out.json

Rows:

* ``codec send``: DerpClient.send_packet + data_to_send (frame building, batching).
* ``codec recv``: DerpClient.receive_data on 64 KiB chunks of RecvPacket frames
  (parser + events), i.e. the reading task's work per packet minus the socket.
* ``disco seal+open``, ``stun parse``: the other sans-IO codecs here.
* ``tls read``: the DERP link's TLS reading alone, over a loopback socket pair:
  a server already wrote ``TLS_READ_RECORDS`` records of ``size`` bytes (one
  record per packet, as Go's DERP server flushes), and the link's receive
  takes them back; the server's encryption is done before the clock starts.
* ``relay in-process``: two DerpConnections through tests/unit/derp/fakerelay.py
  over loopback TCP: the trio driver, both directions of one hop.
* ``relay headscale``: the same two connections through a real Headscale's
  embedded DERP over TLS (needs root and the built binaries; ``--headscale``).

The relay rows keep at most WINDOW (64; env BENCH_DERP_WINDOW) packets in
flight: derpserver queues only 32 packets per receiving client and drops the
rest when the receiver lags, so blasting would measure drops, not throughput.
``lost`` counts packets that never arrived (1 s grace after the run).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from nacl.public import PrivateKey

from trionet.derp import client as dc
from trionet.derp import frames
from trionet.derp.driver import DerpConnection
from trionet.magicsock import disco, stun

WINDOW = int(os.environ.get("BENCH_DERP_WINDOW", "64"))
TLS_READ_RECORDS = 4096


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _timeit(fn: Callable[[], int], min_time: float) -> tuple[int, float]:
    total = 0
    start = time.perf_counter()
    while True:
        total += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return total, elapsed


def _connected_client() -> dc.DerpClient:
    from tests.unit.derp.fakeserver import FakeServer

    client = dc.DerpClient(bytes(PrivateKey.generate()))
    server = FakeServer()
    client.receive_data(server.hello(), 0)
    client.receive_data(server.feed(client.data_to_send()), 0)
    client.data_to_send()
    return client


def bench_codec_send(size: int, min_time: float) -> dict[str, Any]:
    client = _connected_client()
    dst = os.urandom(32)
    payload = os.urandom(size)

    def batch() -> int:
        for _ in range(64):
            client.send_packet(dst, payload)
        client.data_to_send()
        return 64

    n, t = _timeit(batch, min_time)
    return {"name": "codec send", "size": size, "packets": n, "seconds": t, "pps": _rate(n, t)}


def bench_codec_recv(size: int, min_time: float) -> dict[str, Any]:
    client = _connected_client()
    one = frames.build_recv_packet(os.urandom(32), os.urandom(size))
    per_chunk = max(1, (64 << 10) // len(one))
    chunk = one * per_chunk
    sink: list[int] = []

    def batch() -> int:
        for ev in client.receive_data(chunk, 0.0):
            if type(ev) is dc.Packet:
                sink.append(len(ev.data))
        sink.clear()
        return per_chunk

    n, t = _timeit(batch, min_time)
    return {"name": "codec recv", "size": size, "packets": n, "seconds": t, "pps": _rate(n, t)}


def bench_disco(min_time: float) -> dict[str, Any]:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    mine = disco.DiscoBox(bytes(a), bytes(b.public_key))
    theirs = disco.DiscoBox(bytes(b), bytes(a.public_key))
    msg = disco.Ping(os.urandom(12), os.urandom(32))

    def batch() -> int:
        for _ in range(100):
            theirs.open(mine.seal(None, msg))
        return 100

    n, t = _timeit(batch, min_time)
    return {"name": "disco seal+open", "size": 62 + 16 + 46, "packets": n, "seconds": t, "pps": _rate(n, t)}


def bench_stun(min_time: float) -> dict[str, Any]:
    resp = stun.binding_response(os.urandom(12), ("203.0.113.9", 41641))

    def batch() -> int:
        for _ in range(1000):
            stun.parse_response(resp)
        return 1000

    n, t = _timeit(batch, min_time)
    return {"name": "stun parse", "size": len(resp), "packets": n, "seconds": t, "pps": _rate(n, t)}


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from tests.realstack import make_tls

    with tempfile.TemporaryDirectory() as tmp:
        make_tls(Path(tmp), ["127.0.0.1"])
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(Path(tmp) / "server.crt", Path(tmp) / "server.key")
        client = ssl.create_default_context(cafile=str(Path(tmp) / "ca.crt"))
    return server, client


async def _tls_client_link(stream: trio.SocketStream, ctx: ssl.SSLContext) -> Any:
    """The link DerpConnection reads a TLS server through."""
    from trionet.derp.transport import StreamLink, TlsStream

    tls = TlsStream(stream, ctx, server_hostname="localhost")
    await tls.do_handshake()
    return StreamLink(tls)


async def _tls_client_into(links: list[Any], stream: trio.SocketStream, ctx: ssl.SSLContext) -> None:
    links.append(await _tls_client_link(stream, ctx))


async def _tls_server_handshake(stream: trio.SocketStream, tls: ssl.SSLObject, outgoing: ssl.MemoryBIO,
                                incoming: ssl.MemoryBIO) -> None:
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                await stream.send_all(outgoing.read())
            incoming.write(await stream.receive_some(1 << 16))
    if outgoing.pending:
        await stream.send_all(outgoing.read())


async def bench_tls_read(size: int, seconds: float) -> dict[str, Any]:
    server_ctx, client_ctx = _tls_contexts()
    payload = os.urandom(size)
    want = TLS_READ_RECORDS * size
    total = 0
    elapsed = cpu = 0.0
    while elapsed < seconds:
        a, b = trio.socket.socketpair()
        server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
        links: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tls_client_into, links, client_stream, client_ctx)
            await _tls_server_handshake(server_stream, server, outgoing, incoming)
        for _ in range(TLS_READ_RECORDS):
            server.write(payload)  # one record each
        blob = outgoing.read()
        link = links[0]
        got = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_stream.send_all, blob)
            while got < want:
                got += len(await link.receive_some())
        elapsed += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        total += TLS_READ_RECORDS
        await server_stream.aclose()
        await client_stream.aclose()
    # cpu_pps: per second of this process's CPU, steadier than pps on a busy machine
    return {"name": "tls read", "size": size, "packets": total, "seconds": elapsed, "pps": _rate(total, elapsed),
            "cpu_pps": _rate(total, cpu)}


async def _relay(
    name: str,
    connect: Callable[..., DerpConnection],
    keys: tuple[bytes, bytes],
    size: int,
    seconds: float,
    transport: str = "http",
) -> dict[str, Any]:
    """Two DerpConnections made by ``connect(private, transport, **kw)``, one hop, one way."""
    received = 0
    more = trio.Event()

    def on_packet(src: bytes, data: bytes) -> None:
        nonlocal received, more
        received += 1
        more.set()

    a = connect(keys[0], transport)
    b = connect(keys[1], transport, on_packet=on_packet)
    dst = b.node_public
    payload = os.urandom(size)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        with trio.fail_after(20):
            await a.wait_connected()
            await b.wait_connected()
        sent = 0
        start = time.perf_counter()
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            while sent - received < WINDOW:
                if not a.send_packet_nowait(dst, payload):
                    break
                sent += 1
            more = trio.Event()
            with trio.move_on_after(2):
                await more.wait()
        elapsed = time.perf_counter() - start
        counted = received
        with trio.move_on_after(1.0):  # stragglers still in flight are not losses
            while received < sent:
                more = trio.Event()
                await more.wait()
        nursery.cancel_scope.cancel()
    return {
        "name": name,
        "size": size,
        "packets": counted,
        "seconds": elapsed,
        "pps": _rate(counted, elapsed),
        "mbit_s": counted * size * 8 / elapsed / 1e6,
        "window": WINDOW,
        "lost": sent - received,
        "transport": transport,
    }


async def bench_relay_inprocess(size: int, seconds: float) -> dict[str, Any]:
    from tests.unit.derp.fakerelay import FakeRelay

    relay = FakeRelay()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(relay.serve)
        keys = (bytes(PrivateKey.generate()), bytes(PrivateKey.generate()))
        url = f"http://127.0.0.1:{port}/derp"

        def connect(private: bytes, transport: str, **kw: Any) -> DerpConnection:
            return DerpConnection(url, private, transport=transport, **kw)

        row = await _relay("relay in-process", connect, keys, size, seconds)
        nursery.cancel_scope.cancel()
    return row


def bench_relay_headscale(version: str, size: int, seconds: float) -> list[dict[str, Any]]:
    from tests.integration.derp_helpers import derp_stack_for

    rows = []
    with derp_stack_for(version, ("bk1", "bk2")) as derp:
        for transport in derp.transports:
            keys = (derp.keys[0], derp.keys[1])
            relay = functools.partial(_relay, f"relay headscale {version}", derp.connection, keys, size, seconds)
            rows.append(trio.run(relay, transport))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--size", type=int, default=1280, help="packet size (default 1280, Tailscale's MTU)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per row")
    parser.add_argument("--headscale", metavar="VERSION", help="also relay through a real Headscale (root)")
    args = parser.parse_args(argv)

    rows: list[dict[str, Any]] = [
        bench_codec_send(args.size, args.seconds),
        bench_codec_send(100, args.seconds),
        bench_codec_recv(args.size, args.seconds),
        bench_codec_recv(100, args.seconds),
        bench_disco(args.seconds / 2),
        bench_stun(args.seconds / 2),
        trio.run(bench_tls_read, args.size, args.seconds),
        trio.run(bench_tls_read, 100, args.seconds),
        trio.run(bench_relay_inprocess, args.size, args.seconds),
    ]
    if args.headscale:
        rows.extend(bench_relay_headscale(args.headscale, args.size, args.seconds))

    print(f"{'benchmark':<26} {'transport':<10} {'bytes':>6} {'packets':>10} {'pkt/s':>12} {'Mbit/s':>8} {'lost':>5}")
    for row in rows:
        mbit = row.get("mbit_s", row["pps"] * row["size"] * 8 / 1e6)
        print(
            f"{row['name']:<26} {row.get('transport', '-'):<10} {row['size']:>6} {row['packets']:>10} "
            f"{row['pps']:>12,.0f} {mbit:>8,.0f} {row.get('lost', ''):>5}"
        )
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
