"""Netmaps as Headscale sends them, for the MagicDNS tests.

`hs023` and `hs026` differ only where the versions do (protocol-notes-next
§18.3): 0.23-0.25 write `Node.Name` without a trailing dot, 0.26 and later
with one; both send `Proxied`, `Domains` = [base_domain], `Routes`, `Resolvers`
and `ExtraRecords` as their config says.
"""

from __future__ import annotations

from typing import Any

from trionet.dns.view import DnsView, build_view
from trionet.proto import Node

BASE = "ts.test"
ME = ("100.64.0.1", "fd7a:115c:a1e0::1")
WEB = ("100.64.0.2", "fd7a:115c:a1e0::2")
DB = ("100.64.0.3", "fd7a:115c:a1e0::3")
EXTRA = "100.64.0.99"


def node(node_id: int, name: str, addrs: tuple[str, ...], **kw: Any) -> Node:
    return Node(ID=node_id, Name=name, Addresses=[f"{a}/{32 if '.' in a else 128}" for a in addrs], **kw)


def dns_config(**over: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "Proxied": True,
        "Domains": [BASE],
        "Resolvers": [{"Addr": "10.9.9.9"}],
        "Routes": {"corp.example": [{"Addr": "10.1.1.1"}], "lab.corp.example": [{"Addr": "10.2.2.2"}],
                   "blackhole.example": None},
        "ExtraRecords": [{"Name": f"extra.{BASE}", "Type": "A", "Value": EXTRA},
                         {"Name": "grafana.example.org", "Type": "", "Value": "100.64.0.98"},
                         {"Name": f"v6only.{BASE}", "Type": "AAAA", "Value": "fd7a:115c:a1e0::99"},
                         {"Name": "txt.example", "Type": "TXT", "Value": "ignored"}],
    }
    config.update(over)
    return config


def view(version: str = "0.26", *, me_kw: dict[str, Any] | None = None, exit_node_doh: bool = False,
         **dns_over: Any) -> DnsView:
    dot = "." if version != "0.23" else ""
    me = node(1, f"me.{BASE}{dot}", ME, **(me_kw or {}))
    peers = [node(2, f"web.{BASE}{dot}", WEB), node(3, f"db.{BASE}{dot}", DB),
             node(4, "", ("100.64.0.4",))]
    return build_view(me, peers, dns_config(**dns_over), exit_node_doh=exit_node_doh)
