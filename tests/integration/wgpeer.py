"""wireguard-go in a network namespace, and a tiny synchronous driver for our WgDevice.

`WgGoPeer` makes a namespace (name with our pid) joined to the root namespace
by a veth on a private /30 (10.250.N.0/30), runs userspace wireguard-go
(`WG_PROCESS_FOREGROUND=1`, interface wgtest0) in it, configures it with `wg`
and `ip`, and tears everything down in `close()`. Tunnel addresses:
10.251.0.1/24 for the kernel behind wireguard-go, 10.251.0.2 for us. Traffic
only goes to addresses inside that namespace.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import select
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

from trionet.wg import Transmit, WgDevice
from trionet.wg.crypto import public_key

OUR_TUN_IP, THEIR_TUN_IP = "10.251.0.2", "10.251.0.1"
IFACE = "wgtest0"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def icmp_echo(src: str, dst: str, ident: int, seq: int, reply: bool = False, payload: bytes = b"trionet" * 4) -> bytes:
    """An IPv4 ICMP echo request (or reply) with correct checksums."""
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0,
                      ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + icmp


def is_echo_reply(pkt: bytes) -> bool:
    return len(pkt) >= 28 and pkt[9] == 1 and pkt[20] == 0


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {proc.stderr}")
    return proc


def new_private() -> bytes:
    return os.urandom(32)


class WgGoPeer:
    def __init__(self, tmp: Path) -> None:
        for tool in ("wireguard-go", "wg", "ip"):
            if shutil.which(tool) is None:
                raise AssertionError(f"{tool} is not installed: apt-get install -y wireguard-go wireguard-tools")
        if os.geteuid() != 0:
            raise AssertionError("the wireguard-go test needs root (network namespaces)")
        pid = os.getpid()
        n = pid % 200 + 20
        self.ns = f"wgt{pid}"
        self.veth = f"wgv{pid}"
        self.our_ip, self.their_ip = f"10.250.{n}.1", f"10.250.{n}.2"
        self.tmp = tmp
        self.private = new_private()
        self.public = public_key(self.private)
        self.proc: subprocess.Popen[bytes] | None = None
        sh("ip", "netns", "add", self.ns)
        try:
            sh("ip", "-n", self.ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            sh("ip", "addr", "add", f"{self.our_ip}/30", "dev", self.veth)
            sh("ip", "link", "set", self.veth, "up")
            sh("ip", "-n", self.ns, "addr", "add", f"{self.their_ip}/30", "dev", "eth0")
            sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise

    def start(self, our_public: bytes, our_port: int, private: bytes | None = None,
              persistent_keepalive: int | None = None) -> None:
        keyfile = self.tmp / "wg.key"
        keyfile.write_text(base64.b64encode(private or self.private).decode())
        os.chmod(keyfile, 0o600)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "env", "WG_PROCESS_FOREGROUND=1",
                                      "wireguard-go", IFACE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while sh("ip", "-n", self.ns, "link", "show", IFACE, check=False).returncode != 0:
            assert self.proc.poll() is None, "wireguard-go exited at start"
            assert time.monotonic() < deadline, f"wireguard-go did not create {IFACE}"
            time.sleep(0.05)
        extra = ["persistent-keepalive", str(persistent_keepalive)] if persistent_keepalive else []
        sh("ip", "netns", "exec", self.ns, "wg", "set", IFACE, "private-key", str(keyfile), "listen-port", "51820",
           "peer", base64.b64encode(our_public).decode(), "allowed-ips", f"{OUR_TUN_IP}/32",
           "endpoint", f"{self.our_ip}:{our_port}", *extra)
        sh("ip", "-n", self.ns, "addr", "add", f"{THEIR_TUN_IP}/24", "dev", IFACE)
        sh("ip", "-n", self.ns, "link", "set", IFACE, "up")

    def show(self) -> str:
        return sh("ip", "netns", "exec", self.ns, "wg", "show", IFACE, "dump", check=False).stdout

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def close(self) -> None:
        self.stop()
        sh("ip", "link", "del", self.veth, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


class Ours:
    """Our device plus a UDP socket: a tiny synchronous driver for tests."""

    def __init__(self, peer: WgGoPeer, persistent_keepalive: float | None = None) -> None:
        self.dev = WgDevice(new_private())
        self.dev.set_peer(peer.public, [f"{THEIR_TUN_IP}/32"], persistent_keepalive)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((peer.our_ip, 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = (peer.their_ip, 51820)
        self.received: list[bytes] = []
        self.answer_pings = False

    def close(self) -> None:
        self.sock.close()

    def send(self, transmits: list[Transmit]) -> None:
        for t in transmits:
            self.sock.sendto(t.data, self.endpoint)

    def send_ip(self, packet: bytes) -> None:
        self.send(self.dev.send_ip(packet, time.monotonic(), time.time()))

    def pump(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            self.send(self.dev.tick(now, time.time()))
            left = end - now
            if left <= 0:
                return
            r, _, _ = select.select([self.sock], [], [], min(left, 0.05))
            if not r:
                continue
            while True:
                try:
                    data, addr = self.sock.recvfrom(65535, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                now = time.monotonic()
                got = self.dev.receive(data, now, time.time(), src=addr)
                self.send(got.transmits)
                for _, pkt in got.packets:
                    self.received.append(pkt)
                    if self.answer_pings and pkt[9] == 1 and pkt[20] == 8:
                        ident, seq = struct.unpack_from("!HH", pkt, 24)
                        reply = icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, ident, seq, reply=True, payload=pkt[28:])
                        self.send(self.dev.send_ip(reply, now, time.time()))

    def echo_replies(self) -> int:
        return sum(1 for p in self.received if is_echo_reply(p))
