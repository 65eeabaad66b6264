"""magicsock's UDP socket: Linux GRO reads and GSO writes, and the local addresses.

`UdpSocket` owns one non-blocking UDP socket and nothing else: it does not know
WireGuard, disco or STUN. Reading, `drain()` yields what one wake-up finds as
``(datagrams, source)`` pairs, one per read: with UDP GRO (udp(7), Linux 5.0)
the kernel hands over a run of one sender's same-sized datagrams in one read,
split here into memoryviews without copying. Writing, `send()` goes out at once
or, between `cork()` and `uncork()`, is held so that runs of equal sizes to one
address leave in one UDP GSO ``sendmsg`` (tailscaled reads them back whole
with its own GRO).

Counters (in the Counter given, so the owner's statistics show them):
``recv.udp``, ``recv.udp_gro_reads``, ``recv.udp_truncated``, the rejection
``recv.udp_error``; ``send.udp``, ``send.udp_gso``, ``send.udp_gso_refused``,
``send.udp_full``, ``send.udp_no_socket`` and ``send.udp_<ERRNO>``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import trio

from trionet.rejects import RejectLog

log = logging.getLogger(__name__)

Addr = tuple[str, int]

READ_BATCH = 256  # datagrams per drain (a GRO read counts all it carries): other tasks get a turn
RCVBUF = SNDBUF = 4 << 20

# UDP GRO: one read returns up to 64 KiB of same-size datagrams from one sender, with
# the segment size in a control message (udp_cmsg_recv: a native int).
_SOL_UDP = 17
_UDP_GRO = 104
# UDP GSO: one sendmsg with UDP_SEGMENT carries a run of datagrams to one address.
_UDP_SEGMENT = 103
_GSO_SIZE = struct.Struct("=H")
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: the enum's __and__ costs microseconds per read
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS on older kernels
GSO_MAX_BYTES = 65000  # the whole run must fit one IP packet's 64 KiB
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EMSGSIZE})
_MAX_SOURCES = 4096  # cached source addresses (see drain); cleared when full

# Not worth telling peers: the tailnet's own ranges (CGNAT and Tailscale's ULA).
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_TS_ULA = ipaddress.ip_network("fd7a:115c:a1e0::/48")


def plain_addr(addr: Any) -> Addr:
    """A socket address as (ip, port), an IPv4-mapped IPv6 address as plain IPv4."""
    host = addr[0]
    if host.startswith("::ffff:"):
        host = host[7:]
    return (host, int(addr[1]))


def _enable_udp_gro(sock: socket.socket) -> bool:
    if sys.platform != "linux":
        return False
    try:
        sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
    except OSError:  # kernels before 5.0
        return False
    return True


def _gro_segment_size(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, value in ancillary:
        if level == _SOL_UDP and kind == _UDP_GRO and len(value) >= 4:
            return int.from_bytes(value[:4], sys.byteorder)
    return 0


def _gso_wanted() -> bool:
    return os.environ.get("TRIONET_DISABLE_UDP_GSO", "") in ("", "0")


class UdpSocket:
    """One UDP socket (dual-stack unless bound to an IPv4 address) with GRO and GSO."""

    def __init__(self, bind: str = "", port: int = 0, *, stats: Counter[str] | None = None,
                 rejects: RejectLog | None = None) -> None:
        self.bind_address = bind
        self.port = port
        self.stats: Counter[str] = Counter() if stats is None else stats
        self.rejects = rejects if rejects is not None else RejectLog(log, "udp", self.stats)
        self.sock: socket.socket | None = None
        self.gro = False  # the kernel may hand us several datagrams of one flow per read
        self.gso = False  # and take several of ours in one write (see cork)
        self.dual_stack = False  # IPv4 peers are addressed as ::ffff:a.b.c.d
        self._corked = False
        self._queue: list[tuple[Any, Sequence[bytes]]] = []  # (target, datagrams) while corked
        self._queued = 0
        self._sources: dict[Any, Addr] = {}  # the socket's address -> plain_addr of it

    # ------------------------------------------------------------------ setup
    def bind(self) -> None:
        bind = self.bind_address
        if bind and ipaddress.ip_address(bind).version == 4:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        else:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            bind = bind or "::"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        sock.setblocking(False)
        sock.bind((bind, self.port))
        self.sock = sock
        self.gro = _enable_udp_gro(sock)
        # UDP_SEGMENT came in Linux 4.18, before UDP_GRO (5.0): a kernel that took GRO does GSO
        self.gso = self.gro and _gso_wanted()
        self.dual_stack = sock.family == socket.AF_INET6

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    @property
    def local_port(self) -> int:
        assert self.sock is not None, "bind() first"
        return int(self.sock.getsockname()[1])

    def local_endpoints(self) -> list[Addr]:
        """Where peers on our networks may reach this socket: the address it is bound to,
        or every interface's (not loopback, link-local or the tailnet's own ranges)."""
        port = self.local_port
        if self.bind_address and not ipaddress.ip_address(self.bind_address).is_unspecified:
            return [(self.bind_address, port)]
        out: list[Addr] = []
        for _family, addr in interface_addresses():
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local or ip in _CGNAT or ip in _TS_ULA:
                continue
            out.append((addr, port))
        return out

    # ---------------------------------------------------------------- reading
    async def wait_readable(self) -> None:
        assert self.sock is not None, "bind() first"
        await trio.lowlevel.wait_readable(self.sock)

    def drain(self) -> Iterator[tuple[Sequence[bytes | memoryview], Addr]]:
        """What the socket holds now, one ``(datagrams, source)`` per read, until it is
        empty or READ_BATCH datagrams were taken. A GRO read's datagrams are memoryviews
        into one buffer; a plain read gives ``(data,)``. Read errors are counted, not raised."""
        assert self.sock is not None, "bind() first"
        sock = self.sock
        sources = self._sources
        gro = self.gro
        recvmsg = sock.recvmsg
        recvfrom = sock.recvfrom
        cmsg_space = socket.CMSG_SPACE(4)
        count = gro_reads = 0
        try:
            for _ in range(READ_BATCH):  # reads, errors included
                if count >= READ_BATCH:
                    break
                try:
                    if gro:
                        data, ancillary, flags, addr = recvmsg(65535, cmsg_space)
                    else:
                        data, addr = recvfrom(65535)
                        ancillary, flags = None, 0
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. ICMP unreachable surfaced as ECONNREFUSED
                    self.rejects.reject("recv.udp_error", exc)
                    continue
                source = sources.get(addr)
                if source is None:
                    if len(sources) >= _MAX_SOURCES:
                        sources.clear()
                    source = sources[addr] = plain_addr(addr)
                segment = _gro_segment_size(ancillary) if ancillary else 0
                if flags & _MSG_TRUNC:  # not expected (a GRO batch fits 64 KiB): keep whole ones
                    self.stats["recv.udp_truncated"] += 1
                    if not segment:
                        continue
                    data = data[:len(data) - len(data) % segment]
                if segment and segment < len(data):
                    # Several datagrams of one flow, coalesced by the kernel: split without
                    # copying (the parsers and the cipher accept memoryviews).
                    view = memoryview(data)
                    batch = [view[offset:offset + segment] for offset in range(0, len(data), segment)]
                    count += len(batch)
                    gro_reads += 1
                    yield batch, source
                    continue
                count += 1
                yield (data,), source
        finally:
            self.stats["recv.udp"] += count
            if gro_reads:
                self.stats["recv.udp_gro_reads"] += gro_reads  # reads that carried several datagrams

    # ---------------------------------------------------------------- writing
    def send(self, datagrams: Sequence[bytes], addr: Addr) -> None:
        """Out at once, or held while corked (written when the queue fills or on uncork).
        Never blocks: a full socket buffer drops and counts."""
        if self.sock is None:
            self.stats["send.udp_no_socket"] += len(datagrams)
            return
        target: Any = addr
        if self.dual_stack and ":" not in addr[0]:
            target = ("::ffff:" + addr[0], addr[1])
        self._queue.append((target, list(datagrams)))  # the caller may reuse its sequence
        self._queued += len(datagrams)
        if not self._corked or self._queued >= GSO_MAX_SEGMENTS:
            self._flush()

    def cork(self) -> None:
        """Hold datagrams until `uncork`, to send same-sized runs to one address as
        one GSO write. For a burst produced synchronously, such as one netstack flush."""
        self._corked = True

    def uncork(self) -> None:
        self._corked = False
        if self._queue:
            self._flush()

    def _flush(self) -> None:
        pending, self._queue = self._queue, []
        self._queued = 0
        queue: Sequence[tuple[Any, Sequence[bytes]]] = pending
        if len(queue) > 1:  # neighbouring groups for one address form one sequence
            merged: list[tuple[Any, list[bytes]]] = []
            for target, datagrams in queue:
                if merged and merged[-1][0] == target:
                    merged[-1][1].extend(datagrams)
                else:
                    merged.append((target, list(datagrams)))
            queue = merged
        for target, datagrams in queue:
            n = len(datagrams)
            i = 0
            while i < n:
                size = len(datagrams[i])
                m = 1  # the run's length
                if self.gso and 0 < size <= GSO_MAX_BYTES // 2:  # (an EIO may have switched it off)
                    # A GSO run: equal sizes, except that the last may be shorter.
                    lengths = list(map(len, datagrams[i:min(n, i + GSO_MAX_SEGMENTS, i + GSO_MAX_BYTES // size)]))
                    m = len(lengths)
                    if lengths.count(size) != m:  # mixed sizes: where do the equal ones end?
                        m = 1
                        while lengths[m] == size:
                            m += 1
                        if lengths[m] < size:
                            m += 1
                if m == 1:
                    self._sendto(datagrams[i], target)
                elif not self._sendmsg_gso(datagrams[i:i + m], target, size):
                    for data in datagrams[i:i + m]:
                        self._sendto(data, target)
                i += m

    def _sendto(self, data: bytes, target: Any) -> None:
        assert self.sock is not None
        try:
            self.sock.sendto(data, target)
            self.stats["send.udp"] += 1
        except BlockingIOError:
            self.stats["send.udp_full"] += 1
        except OSError as exc:
            self.stats[f"send.udp_{errno.errorcode.get(exc.errno or 0, 'error')}"] += 1

    def _sendmsg_gso(self, run: Sequence[bytes], target: Any, size: int) -> bool:
        """One GSO write; False when the kernel refuses the run as a whole, which then
        goes one datagram at a time."""
        assert self.sock is not None
        try:
            self.sock.sendmsg(run, [(_SOL_UDP, _UDP_SEGMENT, _GSO_SIZE.pack(size))], 0, target)
        except BlockingIOError:
            self.stats["send.udp_full"] += len(run)
            return True
        except OSError as exc:
            if exc.errno in _GSO_REFUSED:
                # EINVAL/EMSGSIZE: this run's segments do not fit the route's MTU. EIO: the
                # device has no checksum offload, so no GSO at all (tailscaled's
                # ShouldDisableUDPGSO).
                self.stats["send.udp_gso_refused"] += 1
                if exc.errno == errno.EIO:
                    log.info("UDP GSO unavailable (%s); sending datagrams one by one", exc)
                    self.gso = False
                return False
            self.stats[f"send.udp_{errno.errorcode.get(exc.errno or 0, 'error')}"] += len(run)
            return True
        self.stats["send.udp"] += len(run)
        self.stats["send.udp_gso"] += 1
        return True


# ------------------------------------------------------------ local addresses


def interface_addresses() -> list[tuple[int, str]]:
    """Every address on this host's interfaces, as (family, address): IPv6 from
    /proc/net/if_inet6, IPv4 by SIOCGIFADDR per interface (Linux only)."""
    out: list[tuple[int, str]] = []
    try:
        import fcntl  # noqa: F401 - Linux only
    except ImportError:  # pragma: no cover
        return out
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                out.append((socket.AF_INET6, str(ipaddress.IPv6Address(bytes.fromhex(raw)))))
    except OSError:
        pass
    for _idx, name in socket.if_nameindex():
        addr = _ipv4_of(name)
        if addr:
            out.append((socket.AF_INET, addr))
    return out


def _ipv4_of(ifname: str) -> str | None:
    import fcntl

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None
    finally:
        s.close()
