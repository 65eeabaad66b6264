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
        self._owned: dict[int, set[tuple[int, int, int]]] = {}  # id(value) -> {(version, plen, key)}

    def insert(self, net: Network, value: V) -> None:
        """Map `net` to `value`; a prefix has one owner (a later insert takes it over)."""
        by_len = self._tables[net.version]
        table = by_len.get(net.prefixlen)
        if table is None:
            table = by_len[net.prefixlen] = {}
            self._lengths[net.version] = sorted(by_len, reverse=True)
        key = int(net.network_address)
        slot = (net.version, net.prefixlen, key)
        old = table.get(key)
        if old is not None and old is not value:
            self._owned.get(id(old), set()).discard(slot)
        table[key] = value
        self._owned.setdefault(id(value), set()).add(slot)
        self.cache.clear()

    def remove_value(self, value: V) -> None:
        """Remove every prefix that maps to `value`."""
        for version, plen, key in self._owned.pop(id(value), set()):
            by_len = self._tables[version]
            table = by_len.get(plen)
            if table is not None and table.get(key) is value:
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
        for version, plen, key in sorted(self._owned.get(id(value), ())):
            out.append(ipaddress.IPv4Network((key, plen)) if version == 4 else ipaddress.IPv6Network((key, plen)))
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
