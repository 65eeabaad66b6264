"""RecvBuffer: the same bytes out as a plain bytearray buffer would give, without copying
large payloads in, and never aliasing a buffer its owner may write to again."""

from __future__ import annotations

import random

from trionet.netstack.rbuf import VIEW_MIN, RecvBuffer


def test_random_appends_and_reads_match_a_bytearray() -> None:
    rng = random.Random(7)
    for _ in range(200):
        buf, ref = RecvBuffer(), bytearray()
        for _ in range(rng.randrange(1, 40)):
            if rng.random() < 0.6:
                n = rng.choice([0, 1, 7, VIEW_MIN - 1, VIEW_MIN, 1228, 5000])
                data = rng.randbytes(n)
                kind = rng.randrange(4)
                if kind == 0:
                    buf.append(data)
                elif kind == 1:
                    buf.append(memoryview(b"hdr" + data)[3:])
                elif kind == 2:
                    buf.append(bytearray(data))
                else:
                    buf.extend([memoryview(data)], len(data))
                ref += data
            else:
                n = rng.choice([1, 3, 100, VIEW_MIN, 2000, 1 << 20])
                got = buf.read(n)
                assert type(got) is bytes and got == bytes(ref[:n])
                del ref[:n]
            assert len(buf) == len(ref) and bool(buf) == bool(ref) and bytes(buf) == bytes(ref)


def test_large_payloads_of_bytes_are_kept_by_reference() -> None:
    packet = b"H" * 52 + b"p" * 1228
    buf = RecvBuffer()
    buf.extend([memoryview(packet)[52:]], 1228)
    assert buf.read(1 << 20) == b"p" * 1228
    whole = b"q" * 4000
    buf.append(whole)
    assert buf.read(4000) is whole  # one chunk, all of it: no copy at all


def test_writable_memory_is_copied_not_aliased() -> None:
    scratch = bytearray(b"a" * 2000)
    buf = RecvBuffer()
    buf.append(memoryview(scratch)[100:])  # a reused receive buffer
    buf.extend([memoryview(scratch)[:100]], 100)
    buf.append(memoryview(scratch).toreadonly()[:500])  # read-only, but its owner can still write
    scratch[:] = b"b" * 2000
    assert buf.read(5000) == b"a" * 2500


def test_small_payloads_share_chunks() -> None:
    buf = RecvBuffer()
    for i in range(1000):
        buf.append(bytes([i % 256]))
    assert len(buf._chunks) <= 1000 // (4 * VIEW_MIN) + 1
    assert buf.read(1000) == bytes(i % 256 for i in range(1000))
    assert buf.read(10) == b"" and not buf
