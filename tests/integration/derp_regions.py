"""A second real DERP region for the real stack: tailscale's ``derper`` beside Headscale's embedded one.

``TwoRegionStack`` is a Stack whose Headscale serves a DERP map of two regions:

* 999 (``hs``): Headscale's embedded DERP and STUN, on Headscale's address;
* 900 (``d2``): ``derper`` v1.102.5 in a namespace of its own on the test LAN
  (``<P>-derp2``), DERP over TLS on port 443 and STUN on 3478 of its address.

TLS: derper is started with ``-certmode manual -hostname <its IP>`` and no
certificate files, so it makes itself a self-signed certificate for that IP
and logs the DERPNode to configure, with ``CertName: "sha256-raw:<hex>"``
(cmd/derper/cert.go). That pin goes into Headscale's DERP file as
``certname``, and clients pin it (tailscaled's derphttp tlsClient, trionet's
derp/transport.py). This is how a derper without a DNS name is run for real,
so the test exercises the same path rather than the stack's test CA.

Clients are verified with ``-verify-client-url <server_url>/verify`` where
Headscale serves it (>= 0.24); Headscale 0.23 has no such endpoint (it would
refuse every client), so there derper admits anyone.

The map reaches Headscale through ``derp.paths`` (a YAML ``tailcfg.DERPMap``
with lowercased keys, read with yaml.v3: HS hscontrol/derp/derp.go,
loadDERPMapFromPath); the embedded region is merged in by
``automatically_add_embedded_derp_region``. The shared config template keeps
``paths: []``; only this stack's rendered copy names the file.

Impairments are nftables rules on the LAN bridge, in one table of this
module's (``tn_regions``) that is rewritten whole on each change:
``block_stun`` drops STUN from one address to one region, ``block_region``
drops everything between an address and a region's server, ``derp_only``
drops UDP between nodes (STUN to both DERP servers stays), and
``slow_stun_from_us`` puts a delaying UDP relay (udprelay.py) on our STUN
to one region, as this kernel has no netem.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.realstack import (
    NEWEST_HEADSCALE,
    REPO,
    STUN_PORT,
    Host,
    Stack,
    StackError,
    Tailscaled,
    _stop_process,
    derper_bin,
    run,
)

EMBEDDED_REGION, EMBEDDED_CODE = 999, "hs"
DERPER_REGION, DERPER_CODE = 900, "d2"
DERPER_PORT = 443
_CERT_NAME = re.compile(r'"CertName":"(sha256-raw:[0-9a-f]{64})"')


class Derper:
    """tailscale's derper in its own namespace, with a self-signed certificate pinned by hash."""

    def __init__(self, stack: Stack, host: Host, verify_url: str | None) -> None:
        self.stack = stack
        self.host = host
        self.verify_url = verify_url
        self.dir = stack.workdir / "derp2"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cert_name = ""

    @property
    def ip(self) -> str:
        return self.host.ip

    @property
    def log_path(self) -> Path:
        return self.dir / "log"

    def start(self) -> Derper:
        if not derper_bin().exists():
            raise StackError(f"derper missing (run `make stack-bin`): {derper_bin()}")
        (self.dir / "certs").mkdir(parents=True, exist_ok=True)
        args = [str(derper_bin()), "-a", f"{self.ip}:{DERPER_PORT}", "-certmode", "manual",
                "-certdir", str(self.dir / "certs"), "-hostname", self.ip, "-c", str(self.dir / "derper.key"),
                "-stun-port", str(STUN_PORT), "-http-port", "-1"]
        if self.verify_url:
            args += ["-verify-client-url", self.verify_url]
        env = ["env", "-i", f"SSL_CERT_FILE={self.stack.ca_file}", f"HOME={self.dir}", "PATH=/usr/bin:/bin"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.host.exec_prefix(), *env, *args], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(f"derper exited: {self.log_path.read_text(errors='replace')[-3000:]}")
            found = _CERT_NAME.search(self.log_path.read_text(errors="replace"))
            if found and self._answers():
                self.cert_name = found.group(1)
                return self
            time.sleep(0.1)
        raise StackError(f"derper did not come up in 30 s: {self.log_path.read_text(errors='replace')[-3000:]}")

    def _answers(self) -> bool:
        probe = run(["curl", "-ksS", "--max-time", "1", "-o", "/dev/null", "-w", "%{http_code}",
                     f"https://{self.ip}:{DERPER_PORT}/derp/latency-check"], check=False)
        return probe.stdout.strip() == "200"

    def stop(self) -> None:
        _stop_process(self.proc, signal.SIGTERM)
        self.proc = None

    def region_yaml(self) -> str:
        """Region 900 as Headscale's DERP file wants it (tailcfg.DERPMap, yaml.v3 lowercased keys)."""
        return (
            "regions:\n"
            f"  {DERPER_REGION}:\n"
            f"    regionid: {DERPER_REGION}\n"
            f"    regioncode: {DERPER_CODE}\n"
            "    regionname: derper 2\n"
            "    nodes:\n"
            f"      - name: {DERPER_REGION}a\n"
            f"        regionid: {DERPER_REGION}\n"
            f"        hostname: {self.ip}\n"
            f"        ipv4: {self.ip}\n"
            f"        stunport: {STUN_PORT}\n"
            f"        derpport: {DERPER_PORT}\n"
            f'        certname: "{self.cert_name}"\n'
        )


class TwoRegionStack(Stack):
    """A Stack whose DERP map has Headscale's embedded region and a derper region."""

    def __init__(self, headscale_version: str = NEWEST_HEADSCALE, **kwargs: Any) -> None:
        super().__init__(headscale_version, **kwargs)
        self.derper: Derper | None = None
        self._rules: dict[str, list[str]] = {}
        self._relays: dict[str, tuple[subprocess.Popen[str], str]] = {}

    @property
    def verifies_clients(self) -> bool:
        major, minor, _ = (int(x) for x in self.version.split("."))
        return (major, minor) >= (0, 24)  # POST /verify: Headscale 0.24 and later

    def _write_headscale_config(self) -> None:
        super()._write_headscale_config()
        host = self.new_host("derp2")
        self.derper = Derper(self, host, f"{self.server_url}/verify" if self.verifies_clients else None).start()
        derp_file = self.workdir / "hs" / "derp.yaml"
        derp_file.write_text(self.derper.region_yaml())
        text = self.hs_config.read_text()
        if "\n  paths: []\n" not in text:
            raise StackError("the Headscale config template no longer has `derp.paths: []`")
        self.hs_config.write_text(text.replace("\n  paths: []\n", f"\n  paths: [{derp_file}]\n"))

    def stop(self) -> None:
        for name in list(self._relays):
            self.stop_relay(name)
        if self.derper is not None:
            self.derper.stop()
        super().stop()

    def region_ip(self, region: int) -> str:
        assert self.derper is not None
        return self.hs_host.ip if region == EMBEDDED_REGION else self.derper.ip

    # -- tailscaled peers homed where the test wants them
    def add_tailscaled_homed(self, region: int, name: str) -> Tailscaled:
        """A tailscaled that cannot STUN the other region, so netcheck makes `region` its home."""
        node = self.add_tailscaled(name, up=False)
        other = DERPER_REGION if region == EMBEDDED_REGION else EMBEDDED_REGION
        self.set_rules(f"home-{name}", [self._stun_drop(node.host.ip, other)])
        self.tailscale_up(node)
        return node

    def home_code_of_peer(self, observer: Tailscaled, node_key: str) -> str:
        """The DERP region code `observer` uses to reach `node_key` (ipnstate PeerStatus.Relay:
        the peer's home region as the netmap gives it)."""
        peer = (observer.status().get("Peer") or {}).get(node_key) or {}
        return str(peer.get("Relay") or "")

    def own_home_code(self, node: Tailscaled) -> str:
        return str((node.status().get("Self") or {}).get("Relay") or "")

    # -- impairments
    def _stun_drop(self, src_ip: str, region: int) -> str:
        return f"ip saddr {src_ip} ip daddr {self.region_ip(region)} udp dport {STUN_PORT} drop"

    def block_stun(self, src_ip: str, region: int) -> None:
        self.set_rules(f"stun-{src_ip}-{region}", [self._stun_drop(src_ip, region)])

    def block_region(self, src_ip: str, region: int) -> None:
        """Silence everything between `src_ip` and the region's server (STUN and DERP's TCP)."""
        ip = self.region_ip(region)
        self.set_rules(f"region-{src_ip}-{region}", [f"ip saddr {src_ip} ip daddr {ip} drop",
                                                      f"ip saddr {ip} ip daddr {src_ip} drop"])

    def derp_only(self) -> None:
        """UDP between nodes dropped; STUN to and from both DERP servers passes."""
        servers = ", ".join(sorted({self.hs_host.ip, self.region_ip(DERPER_REGION)}))
        self.set_rules("derp-only", [f"ip saddr {{ {servers} }} accept", f"ip daddr {{ {servers} }} accept",
                                     "ip protocol udp drop"])

    def set_rules(self, name: str, rules: list[str]) -> None:
        self._rules[name] = rules
        self._apply_rules()

    def clear_rules(self, *names: str) -> None:
        for name in names or list(self._rules):
            self._rules.pop(name, None)
        self._apply_rules()

    def _apply_rules(self) -> None:
        run(["ip", "netns", "exec", self.lan_ns, "nft", "delete", "table", "bridge", "tn_regions"], check=False)
        # One chain per rule set: an accept in one (derp-only's) must not let through
        # what another drops, and a drop anywhere drops.
        chains = "".join(
            f" chain c{i} {{\n  type filter hook forward priority {-30 + i}; policy accept;\n"
            + "".join(f"  {rule}\n" for rule in rules) + " }\n"
            for i, rules in enumerate(self._rules.values()))
        if chains:
            run(["ip", "netns", "exec", self.lan_ns, "nft", "-f", "-"],
                input=f"table bridge tn_regions {{\n{chains}}}\n")

    def slow_stun_from_us(self, region: int, delay: float) -> None:
        """Our STUN to `region` goes through a relay that holds each datagram `delay` s each way."""
        ip = self.local_ip
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.udprelay", "--client-side", f"{ip}:0",
             "--peer-side", f"{ip}:0", "--peer", f"{self.region_ip(region)}:{STUN_PORT}", "--delay", str(delay)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        try:
            ready = json.loads(first)
        except ValueError:
            proc.kill()
            raise StackError(f"STUN relay did not start: {first}") from None
        table = f"tn_slow_{self.prefix}_{region}"  # our namespace is shared by concurrent runs
        run(["nft", "-f", "-"], input=(
            f"table ip {table} {{\n chain out {{\n  type nat hook output priority -100; policy accept;\n"
            f"  ip saddr {ip} udp sport != {int(ready['b'][1])} ip daddr {self.region_ip(region)}"
            f" udp dport {STUN_PORT} dnat to {ip}:{int(ready['a'][1])}\n }}\n}}\n"))  # (not the relay's own)
        self._relays[f"slow-{region}"] = (proc, table)

    def stop_relay(self, name: str) -> None:
        proc, table = self._relays.pop(name)
        run(["nft", "delete", "table", "ip", table], check=False)
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
