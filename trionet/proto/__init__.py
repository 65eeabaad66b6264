"""Tailscale's JSON wire types, as attrs classes with Go's exact field names.

One cattrs converter reads them: unknown fields are ignored and every field
has a default, so a newer server never crashes us; `None` fields are left out
when we write. Names follow tailcfg.go (PascalCase with upper-case acronyms).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import cattrs

from trionet.errors import RemoteProtocolError

# Each list/dict field defaults to None ("absent"), because in map deltas
# absent means "unchanged" (protocol-notes §0, §5.3).


@attrs.define
class NetInfo:
    PreferredDERP: int = 0


@attrs.define
class Hostinfo:
    Hostname: str | None = None
    OS: str | None = None
    IPNVersion: str | None = None
    GoArch: str | None = None
    RoutableIPs: list[str] | None = None  # prefixes the node offers to route (announced, maybe unapproved)
    RequestTags: list[str] | None = None  # ACL tags the node asks for (--advertise-tags)
    # [{"Proto": "peerapi4", "Port": p}, ...]: kept as dicts, so one odd entry in a
    # peer's list cannot make the whole map unreadable (read by trionet.routes).
    Services: list[dict[str, Any]] | None = None
    NetInfo: NetInfo | None = None


@attrs.define
class DERPNode:
    Name: str = ""
    RegionID: int = 0
    HostName: str = ""
    CertName: str | None = None
    IPv4: str | None = None
    IPv6: str | None = None
    STUNPort: int = 0
    STUNOnly: bool = False
    DERPPort: int = 0
    InsecureForTests: bool = False
    STUNTestIP: str | None = None
    CanPort80: bool = False


@attrs.define
class DERPRegion:
    RegionID: int = 0
    RegionCode: str = ""
    RegionName: str = ""
    Avoid: bool = False
    NoMeasureNoHome: bool = False
    Nodes: list[DERPNode] | None = None


@attrs.define
class DERPMap:
    Regions: dict[int, DERPRegion | None] | None = None
    OmitDefaultRegions: bool = False
    HomeParams: DERPHomeParams | None = None


@attrs.define
class Node:
    ID: int = 0
    StableID: str = ""
    Name: str = ""
    User: int = 0
    Key: str = ""
    KeyExpiry: str | None = None
    Machine: str | None = None
    DiscoKey: str | None = None
    Addresses: list[str] | None = None
    AllowedIPs: list[str] | None = None
    Endpoints: list[str] | None = None
    HomeDERP: int = 0
    DERP: str = ""  # legacy "127.3.3.40:<region>"
    Hostinfo: Hostinfo | None = None
    Online: bool | None = None
    LastSeen: str | None = None
    Expired: bool = False
    MachineAuthorized: bool = False
    Cap: int = 0
    Tags: list[str] | None = None
    PrimaryRoutes: list[str] | None = None
    Capabilities: list[str] | None = None  # MagicDNS reads magicdns-aaaa, dns-subdomain-resolve
    CapMap: dict[str, Any] | None = None


@attrs.define
class PeerChange:
    NodeID: int = 0
    DERPRegion: int = 0
    Cap: int = 0
    Endpoints: list[str] | None = None
    Key: str | None = None
    DiscoKey: str | None = None
    Online: bool | None = None
    LastSeen: str | None = None
    KeyExpiry: str | None = None


TailNode = Node  # field names below shadow the class names inside MapResponse
TailDERPMap = DERPMap


@attrs.define
class MapResponse:
    KeepAlive: bool = False
    Node: TailNode | None = None
    DERPMap: TailDERPMap | None = None
    Peers: list[TailNode] | None = None
    PeersChanged: list[TailNode] | None = None
    PeersRemoved: list[int] | None = None
    PeersChangedPatch: list[PeerChange] | None = None
    PeerSeenChange: dict[int, bool] | None = None
    OnlineChange: dict[int, bool] | None = None
    DNSConfig: dict[str, Any] | None = None
    Domain: str = ""
    PacketFilter: list[dict[str, Any]] | None = None
    PacketFilters: dict[str, list[dict[str, Any]] | None] | None = None
    UserProfiles: list[dict[str, Any]] | None = None
    ControlTime: str | None = None
    PingRequest: dict[str, Any] | None = None
    Health: list[str] | None = None


@attrs.define
class RegisterResponse:
    User: dict[str, Any] | None = None
    Login: dict[str, Any] | None = None
    NodeKeyExpired: bool = False
    MachineAuthorized: bool = False
    AuthURL: str = ""
    Error: str = ""


@attrs.define
class OverTLSPublicKeyResponse:
    """`GET /key?v=N`: lower-case tags as in Go."""

    legacyPublicKey: str = ""
    publicKey: str = ""


@attrs.define
class Auth:
    AuthKey: str = ""


@attrs.define
class User:
    ID: int = 0
    LoginName: str = ""
    DisplayName: str = ""
    ProfilePicURL: str = ""


@attrs.define
class Login:
    ID: int = 0
    Provider: str = ""
    LoginName: str = ""
    DisplayName: str = ""
    ProfilePicURL: str = ""


@attrs.define
class UserProfile:
    ID: int = 0
    LoginName: str = ""
    DisplayName: str = ""
    ProfilePicURL: str = ""


TailAuth = Auth
TailHostinfo = Hostinfo


@attrs.define
class RegisterRequest:
    Version: int = 0
    NodeKey: str = ""
    OldNodeKey: str = ""
    Auth: TailAuth | None = None
    Hostinfo: TailHostinfo | None = None
    Ephemeral: bool = False
    Expiry: str | None = None


@attrs.define
class MapRequest:
    Version: int = 0
    Compress: str | None = None
    KeepAlive: bool = False
    NodeKey: str = ""
    DiscoKey: str | None = None
    Stream: bool = False
    Hostinfo: TailHostinfo | None = None
    OmitPeers: bool = False
    Endpoints: list[str] | None = None
    EndpointTypes: list[int] | None = None
    DebugFlags: list[str] | None = None


@attrs.define
class DERPHomeParams:
    RegionScore: dict[int, float] | None = None


@attrs.define
class PortRange:
    First: int = 0
    Last: int = 0


@attrs.define
class NetPortRange:
    IP: str = ""
    Bits: int | None = None
    Ports: PortRange = attrs.field(factory=PortRange)


@attrs.define
class FilterRule:
    SrcIPs: list[str] | None = None
    SrcBits: list[int] | None = None
    DstPorts: list[NetPortRange] | None = None
    IPProto: list[int] | None = None
    CapGrant: list[dict[str, Any]] | None = None


@attrs.define
class Resolver:
    Addr: str = ""
    BootstrapResolution: list[str] | None = None


@attrs.define
class DNSRecord:
    Name: str = ""
    Type: str = ""
    Value: str = ""


@attrs.define
class DNSConfig:
    Resolvers: list[Resolver] | None = None
    Routes: dict[str, list[Resolver] | None] | None = None
    FallbackResolvers: list[Resolver] | None = None
    Domains: list[str] | None = None
    Proxied: bool = False
    Nameservers: list[str] | None = None
    CertDomains: list[str] | None = None
    ExtraRecords: list[DNSRecord] | None = None
    ExitNodeFilteredSet: list[str] | None = None


@attrs.define
class PingRequest:
    URL: str = ""
    URLIsNoise: bool = False
    Log: bool = False
    Types: str = ""
    IP: str = ""
    Payload: str | None = None


converter = cattrs.Converter(forbid_extra_keys=False)


def structure(data: Any, cls: type[Any]) -> Any:
    try:
        return converter.structure(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise RemoteProtocolError(f"cannot read {cls.__name__} from the server: {exc}") from exc


def loads(raw: bytes | str, cls: type[Any]) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"{cls.__name__} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RemoteProtocolError(f"{cls.__name__} is not a JSON object")
    return structure(data, cls)


def dumps(obj: Any) -> bytes:
    """JSON with None fields left out (Go's omitempty for our requests)."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return json.dumps(strip(converter.unstructure(obj) if attrs.has(type(obj)) else obj)).encode()
