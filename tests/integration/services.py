"""Small servers that run inside a tailscaled peer's namespace for tests.

tailscaled in userspace mode forwards TCP/UDP for its tailnet address to
127.0.0.1:PORT in its own namespace, so these bind loopback there.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.realstack import Stack, StackError, Tailscaled

TCP_ECHO = r'''
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(64)
def serve(c):
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
    c.close()
while True:
    c, _ = srv.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(b"echo:" + data, addr)
"""


class PeerServices:
    """An HTTP file server (with a random blob) and a UDP echo server on one peer."""

    def __init__(self, stack: Stack, node: Tailscaled, http_port: int = 8000, udp_port: int = 9999,
                 blob_mb: int = 20) -> None:
        self.node = node
        self.http_port = http_port
        self.udp_port = udp_port
        self.root = stack.workdir / f"www-{node.name}"
        self.root.mkdir(exist_ok=True)
        blob = os.urandom(blob_mb << 20)
        (self.root / "blob").write_bytes(blob)
        (self.root / "index.html").write_text(f"hello from {node.name}\n")
        self.blob_sha256 = hashlib.sha256(blob).hexdigest()
        self.blob_size = len(blob)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> PeerServices:
        ns = self.node.host.exec_prefix()
        self.procs.append(subprocess.Popen(
            [*ns, sys.executable, "-m", "http.server", str(self.http_port), "--bind", "127.0.0.1",
             "--directory", str(self.root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen([*ns, sys.executable, "-c", UDP_ECHO, str(self.udp_port)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = subprocess.run([*ns, "curl", "-sf", "-o", "/dev/null",
                                    f"http://127.0.0.1:{self.http_port}/index.html"])
            if probe.returncode == 0:
                return self
            time.sleep(0.1)
        raise StackError(f"http server on {self.node.name} did not start")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(5)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
