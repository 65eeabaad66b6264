"""A Linux TUN device driven with trio (used by tests and benchmarks).

``Tun.open(name)`` opens /dev/net/tun with IFF_TUN|IFF_NO_PI in non-blocking
mode; ``pump(stack)`` reads packets in batches and hands each batch to
``stack.deliver_many`` in the same task; ``write`` is the stack's ``output``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable

import trio

from .driver import NetStack

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


class Tun:
    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.write_drops = 0
        self.packets_in = 0

    @classmethod
    def open(cls, name: str) -> Tun:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, res[:16].rstrip(b"\0").decode())

    def write(self, packet: bytes) -> None:
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            self.write_drops += 1
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EINVAL):
                raise
            self.write_drops += 1

    def read_batch(self, limit: int = 256) -> list[bytes]:
        out: list[bytes] = []
        read = os.read
        fd = self.fd
        try:
            for _ in range(limit):
                out.append(read(fd, 65536))
        except BlockingIOError:
            pass
        return out

    async def pump(self, deliver_many: Callable[[list[bytes]], None] | NetStack,
                   limit: int = 256) -> None:
        """Read forever, delivering each batch synchronously."""
        fn = deliver_many.deliver_many if isinstance(deliver_many, NetStack) else deliver_many
        while True:
            batch = self.read_batch(limit)
            if batch:
                self.packets_in += len(batch)
                fn(batch)
                if len(batch) == limit:
                    await trio.lowlevel.checkpoint()
                    continue
            await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
