"""Our WireGuard device against wireguard-go and the Linux kernel behind it.

The test makes a network namespace with a veth to ours; wireguard-go runs in
it (a TUN device wg0, configured with `wg`), and the kernel behind it answers
ICMP. Our device talks to it over a UDP socket from this process.
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
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base

from trionet.keys import new_private
from trionet.wg import WgDevice

pytestmark = [pytest.mark.integration, pytest.mark.netns]

OUR_TUN_IP, THEIR_TUN_IP = "10.251.0.2", "10.251.0.1"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def icmp_echo(src: str, dst: str, ident: int, seq: int, reply: bool = False, payload: bytes = b"trionet" * 4) -> bytes:
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0,
                      ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + icmp


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {proc.stderr}")
    return proc


class WgGoPeer:
    def __init__(self, tmp: Path) -> None:
        for tool in ("wireguard-go", "wg", "ip"):
            if shutil.which(tool) is None:
                raise AssertionError(f"{tool} is not installed (make sysdeps installs it)")
        n = os.getpid() % 200 + 20
        self.ns = f"wgt{os.getpid()}"
        self.veth = f"wgv{os.getpid()}"
        self.our_ip, self.their_ip = f"10.250.{n}.1", f"10.250.{n}.2"
        self.tmp = tmp
        self.private = new_private()
        self.public = bytes(crypto_scalarmult_base(self.private))
        self.proc: subprocess.Popen[bytes] | None = None
        sh("ip", "netns", "add", self.ns)
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        sh("ip", "addr", "add", f"{self.our_ip}/30", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.their_ip}/30", "dev", "eth0")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up")

    def start(self, our_public: bytes, our_port: int, private: bytes | None = None) -> None:
        keyfile = self.tmp / "wg.key"
        keyfile.write_text(base64.b64encode(private or self.private).decode())
        os.chmod(keyfile, 0o600)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "env", "WG_PROCESS_FOREGROUND=1",
                                      "wireguard-go", "wg0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while sh("ip", "-n", self.ns, "link", "show", "wg0", check=False).returncode != 0:
            assert time.monotonic() < deadline, "wireguard-go did not create wg0"
            time.sleep(0.05)
        sh("ip", "netns", "exec", self.ns, "wg", "set", "wg0", "private-key", str(keyfile), "listen-port", "51820",
           "peer", base64.b64encode(our_public).decode(), "allowed-ips", f"{OUR_TUN_IP}/32",
           "endpoint", f"{self.our_ip}:{our_port}")
        sh("ip", "-n", self.ns, "addr", "add", f"{THEIR_TUN_IP}/24", "dev", "wg0")
        sh("ip", "-n", self.ns, "link", "set", "wg0", "up")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        sh("ip", "link", "del", self.veth, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


class Ours:
    """Our device plus a UDP socket: a tiny synchronous driver for the test."""

    def __init__(self, peer: WgGoPeer) -> None:
        self.dev = WgDevice(new_private())
        self.dev.set_peer(peer.public, [f"{THEIR_TUN_IP}/32"])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((peer.our_ip, 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = (peer.their_ip, 51820)
        self.received: list[bytes] = []
        self.answer_pings = False

    def send(self, transmits: list) -> None:  # type: ignore[type-arg]
        for t in transmits:
            self.sock.sendto(t.data, self.endpoint)

    def pump(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            r, _, _ = select.select([self.sock], [], [], min(left, 0.05))
            now = time.monotonic()
            self.send(self.dev.tick(now, time.time()))
            if not r:
                continue
            data, _ = self.sock.recvfrom(65535)
            got = self.dev.receive(data, now, time.time())
            self.send(got.transmits)
            for _, pkt in got.packets:
                self.received.append(pkt)
                if self.answer_pings and pkt[9] == 1 and pkt[20] == 8:
                    ident, seq = struct.unpack_from("!HH", pkt, 24)
                    reply = icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, ident, seq, reply=True, payload=pkt[28:])
                    self.send(self.dev.send_ip(reply, now, time.time()))


@pytest.fixture
def wg_go(tmp_path: Path) -> Iterator[WgGoPeer]:
    peer = WgGoPeer(tmp_path)
    try:
        yield peer
    finally:
        peer.close()


def test_against_wireguard_go(wg_go: WgGoPeer) -> None:
    ours = Ours(wg_go)
    wg_go.start(ours.dev.public, ours.port)

    # we initiate: an echo request the kernel behind wireguard-go answers
    ours.send(ours.dev.send_ip(icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, 7, 0), time.monotonic(), time.time()))
    ours.pump(3)
    assert any(p[9] == 1 and p[20] == 0 for p in ours.received), ours.dev.statistics()
    assert ours.dev.counters["handshakes_completed"] == 1

    # 10,000 packets, none lost: batches of echoes, every reply counted once
    ours.received.clear()
    total, batch = 10_000, 100
    for start in range(0, total, batch):
        now = time.monotonic()
        for seq in range(start, start + batch):
            ours.send(ours.dev.send_ip(icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, 9, seq % 65536), now, time.time()))
        ours.pump(0.02)
    deadline = time.monotonic() + 10
    while sum(1 for p in ours.received if p[20] == 0) < total and time.monotonic() < deadline:
        ours.pump(0.2)
    replies = {struct.unpack_from("!H", p, 26)[0] for p in ours.received if p[20] == 0}
    assert sum(1 for p in ours.received if p[20] == 0) == total and len(replies) == total

    # it initiates: restart wireguard-go (no session any more); the kernel pings us
    wg_go.stop()
    before = ours.dev.counters["handshakes_completed"]
    wg_go.start(ours.dev.public, ours.port)
    ours.answer_pings = True
    pinger = subprocess.Popen(["ip", "netns", "exec", wg_go.ns, "ping", "-c", "3", "-W", "2", OUR_TUN_IP],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while pinger.poll() is None:
        ours.pump(0.1)
    assert pinger.returncode == 0, pinger.stdout.read().decode() if pinger.stdout else ""
    assert ours.dev.counters["handshakes_completed"] > before
    assert ours.dev.counters["responses_sent"] >= 1

    # a wrong key: wireguard-go restarted with a private key we do not know
    wg_go.stop()
    wg_go.start(ours.dev.public, ours.port, private=new_private())
    subprocess.run(["ip", "netns", "exec", wg_go.ns, "ping", "-c", "1", "-W", "1", OUR_TUN_IP],
                   capture_output=True)
    ours.pump(1.0)
    assert ours.dev.drops["unknown_peer"] >= 1
