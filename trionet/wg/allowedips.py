"""AllowedIPs: longest-prefix match of an address to a peer, IPv4 and IPv6.

One dict per prefix length (address integer masked to the prefix -> value);
a lookup walks the lengths in use, longest first. Results are cached per raw
address bytes; any change clears the cache.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Generic, TypeVar

V = TypeVar("V")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_CACHE_MAX = 65536


class AllowedIPs(Generic[V]):
    def __init__(self) -> None:
        # version -> prefixlen -> masked int -> value
        self._tables: dict[int, dict[int, dict[int, V]]] = {4: {}, 6: {}}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}
        self.cache: dict[bytes, V | None] = {}

    def insert(self, net: Network, value: V) -> None:
        by_len = self._tables[net.version]
        by_len.setdefault(net.prefixlen, {})[int(net.network_address)] = value
        self._lengths[net.version] = sorted(by_len, reverse=True)
        self.cache.clear()

    def remove_value(self, value: V) -> None:
        """Remove every prefix that maps to `value`."""
        for version, by_len in self._tables.items():
            for plen in list(by_len):
                table = by_len[plen]
                for key in [k for k, v in table.items() if v is value]:
                    del table[key]
                if not table:
                    del by_len[plen]
            self._lengths[version] = sorted(by_len, reverse=True)
        self.cache.clear()

    def replace(self, value: V, nets: Iterable[Network]) -> None:
        self.remove_value(value)
        for net in nets:
            self.insert(net, value)

    def networks_of(self, value: V) -> list[Network]:
        out: list[Network] = []
        for plen, table in self._tables[4].items():
            out += [ipaddress.IPv4Network((k, plen)) for k, v in table.items() if v is value]
        for plen, table in self._tables[6].items():
            out += [ipaddress.IPv6Network((k, plen)) for k, v in table.items() if v is value]
        return out

    def lookup_raw(self, raw: bytes) -> V | None:
        """The value for a 4- or 16-byte address, longest prefix first."""
        cache = self.cache
        try:
            return cache[raw]
        except KeyError:
            pass
        if len(raw) == 4:
            version, bits = 4, 32
        elif len(raw) == 16:
            version, bits = 6, 128
        else:
            return None
        addr = int.from_bytes(raw, "big")
        by_len = self._tables[version]
        found: V | None = None
        for plen in self._lengths[version]:
            masked = addr & (((1 << plen) - 1) << (bits - plen)) if plen else 0
            v = by_len[plen].get(masked)
            if v is not None:
                found = v
                break
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[raw] = found
        return found

    def lookup(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> V | None:
        return self.lookup_raw(addr.packed)
