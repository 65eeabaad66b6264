"""Every parser that reads network or user bytes, under a mutation fuzzer.

`make fuzz` runs TRIONET_FUZZ_EXAMPLES inputs per parser (1,000,000 by
default). Inputs are random bytes and mutations (bit flips, truncation,
splices, length-field edits, duplication) of valid seeds, so the fuzzer gets
past the first length check. A parser may only raise the errors it declares
(RemoteProtocolError for network garbage); anything else is a crash: the input
is saved under tests/fuzz/crashes/ and replayed by every `make test` as a
regression case (test_saved_crashes_stay_fixed).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trionet.errors import RemoteProtocolError

CRASH_DIR = Path(__file__).parent / "crashes"
EXAMPLES = int(os.environ.get("TRIONET_FUZZ_EXAMPLES", "1000000"))

Target = tuple[Callable[[bytes], Any], tuple[type[BaseException], ...], list[bytes]]
TARGETS: dict[str, Callable[[], Target]] = {}


def target(name: str) -> Callable[[Callable[[], Target]], Callable[[], Target]]:
    def register(fn: Callable[[], Target]) -> Callable[[], Target]:
        TARGETS[name] = fn
        return fn

    return register


# ------------------------------------------------------------------- targets


@target("derp_frames")
def _derp() -> Target:
    from trionet.derp import frames

    def run(data: bytes) -> None:
        parser = frames.FrameParser()
        parser.feed(data)
        while (frame := parser.next_frame()) is not None:
            payload = bytes(frame[1]) if len(frame) > 1 else b""
            for parse in (frames.parse_server_key, frames.parse_client_info, frames.parse_packet,
                          frames.parse_forward_packet, frames.parse_note_preferred):
                try:
                    parse(payload)
                except RemoteProtocolError:
                    pass

    key = bytes(range(32))
    seeds = [frames.build_server_key(key), frames.build_recv_packet(key, b"x" * 40),
             frames.build_ping(b"12345678"), frames.build_restarting(100, 200), frames.build_health("bad"),
             frames.build_peer_gone(key)]
    return run, (RemoteProtocolError,), seeds


@target("derp_client")
def _derp_client() -> Target:
    from nacl.public import PrivateKey

    from trionet.derp import client, frames

    priv = bytes(PrivateKey.generate())
    server = PrivateKey.generate()

    def run(data: bytes) -> None:
        c = client.DerpClient(priv)
        try:
            c.receive_data(frames.build_server_key(bytes(server.public_key)) + data, 0.0)
        except RemoteProtocolError:
            pass

    return run, (RemoteProtocolError,), [frames.build_keep_alive(), frames.build_ping(b"abcdefgh")]


@target("disco")
def _disco() -> Target:
    from nacl.public import PrivateKey

    from trionet.magicsock import disco

    a, b = PrivateKey.generate(), PrivateKey.generate()
    box_b = disco.DiscoBox(bytes(b), bytes(a.public_key))
    box_a = disco.DiscoBox(bytes(a), bytes(b.public_key))

    def run(data: bytes) -> None:
        if disco.looks_like_disco(data):
            disco.sender_key(data)
            box_b.open(data)
        disco.parse_message(data)

    seeds = [box_a.seal(bytes(a.public_key), disco.Ping(tx_id=b"t" * 12, node_key=b"k" * 32)),
             disco.Pong(tx_id=b"t" * 12, src=("10.0.0.1", 1)).encode(),
             disco.CallMeMaybe(endpoints=[("10.0.0.1", 2), ("::1", 3)]).encode()]
    return run, (RemoteProtocolError,), seeds


@target("stun")
def _stun() -> Target:
    from trionet.magicsock import stun

    def run(data: bytes) -> None:
        if stun.is_stun(data):
            try:
                stun.parse_response(data)
            except RemoteProtocolError:
                stun.parse_binding_request(data)

    txid = b"\x01" * 12
    return run, (RemoteProtocolError,), [stun.binding_request(txid),
                                         stun.binding_response(txid, ("10.1.2.3", 4242))]


@target("socks5")
def _socks5() -> Target:
    from trionet.proxy import socks5

    def run(data: bytes) -> None:
        for parse in (socks5.parse_greeting, socks5.parse_userpass, socks5.parse_request):
            try:
                parse(data)
            except RemoteProtocolError:
                pass
        socks5.parse_udp_datagram(data)

    return run, (RemoteProtocolError,), [b"\x05\x02\x00\x02", b"\x05\x01\x00\x03\x03ts1\x00\x50",
                                         socks5.build_udp_datagram("100.64.0.1", 53, b"q")]


@target("ipc_request")
def _ipc() -> Target:
    import trio

    from trionet.daemon import ipc

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"echo": req["cmd"]}

    def run(data: bytes) -> None:
        answer = trio.run(ipc._answer, data, handler)
        json.dumps(answer)  # every answer must be serialisable

    return run, (), [b'{"cmd":"status"}', b'{"cmd":"ping","peer":"x","count":3}']


@target("packet_filter")
def _filter() -> Target:
    from trionet.filter import PacketFilter

    f = PacketFilter([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}])

    def run(data: bytes) -> None:
        f.check_inbound(data)
        f.note_outbound(data)

    v4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, b"\x64\x40\0\2", b"\x64\x40\0\5")
    return run, (), [v4 + b"\x00\x50\x00\x50" + bytes(16)]


def _optional(name: str, module: str, build: Callable[[Any], Target]) -> None:
    """Targets for modules that other issues own; registered when the module exists."""

    @target(name)
    def make() -> Target:
        return build(importlib.import_module(module))


# ------------------------------------------------------------------ mutator


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    choice = rng.random()
    if choice < 0.15 or not seeds:
        return rng.randbytes(rng.randrange(0, 200))
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(7)
        if op == 0 and data:  # bit flip
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del data[rng.randrange(len(data) + 1):]
        elif op == 2:  # random byte
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 3:  # splice another seed
            other = rng.choice(seeds)
            cut = rng.randrange(len(data) + 1)
            data[cut:] = other[rng.randrange(len(other) + 1):]
        elif op == 4 and len(data) >= 4:  # interesting integers in length fields
            i = rng.randrange(len(data) - 3)
            data[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x01\x00\x00",
                                        b"\x7f\xff\xff\xff"])
        elif op == 5:  # duplicate a run
            if data:
                a = rng.randrange(len(data))
                data[a:a] = data[a:a + rng.randrange(1, 64)]
        else:  # append junk
            data += rng.randbytes(rng.randrange(1, 32))
    return bytes(data)


def _save_crash(name: str, data: bytes, exc: BaseException) -> Path:
    CRASH_DIR.mkdir(exist_ok=True)
    path = CRASH_DIR / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(f"{type(exc).__name__}: {exc}\n")
    return path


def fuzz(name: str, examples: int, seed: int = 0) -> int:
    run, allowed, seeds = TARGETS[name]()
    rng = random.Random(seed)
    for seed_input in seeds:  # seeds must parse without surprises
        try:
            run(seed_input)
        except allowed:
            pass
    crashes = 0
    for _ in range(examples):
        data = mutate(rng, seeds)
        try:
            run(data)
        except allowed:
            continue
        except Exception as exc:
            crashes += 1
            path = _save_crash(name, data, exc)
            if crashes >= 5:
                raise AssertionError(f"{name}: {crashes} crashes, last saved to {path}") from exc
    return crashes


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_quick(name: str) -> None:
    """A short run in every `make test` (the seeds and 3,000 mutations)."""
    assert fuzz(name, 3000, seed=1) == 0


@pytest.mark.fuzz
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_long(name: str) -> None:
    start = time.monotonic()
    crashes = fuzz(name, EXAMPLES, seed=int(os.environ.get("TRIONET_FUZZ_SEED", "0")))
    print(f"\nfuzz {name}: {EXAMPLES} inputs, {crashes} crashes, {time.monotonic() - start:.0f} s")
    assert crashes == 0


def test_saved_crashes_stay_fixed() -> None:
    """Every input a fuzzer ever crashed on is replayed; none may crash again."""
    for path in sorted(CRASH_DIR.glob("*.bin")) if CRASH_DIR.exists() else []:
        name = path.name.rsplit("-", 1)[0]
        run, allowed, _ = TARGETS[name]()
        try:
            run(path.read_bytes())
        except allowed:
            pass
