"""The control plane: TS2021 client (`client`) and the netmap core (`netmap`).

Public API (the daemon's `trionet.control.session.ControlSession` drives it with
reconnect/backoff)::

    from trionet.keys import load_or_create_state
    from trionet.control import open_session, Netmap

    state = load_or_create_state(Path(state_dir))       # keys.State
    async with open_session(config, state) as conn:     # GET /key, /ts2021, Noise, HTTP/2
        await conn.register()                           # -> proto.RegisterResponse; AuthError on bad keys
                                                        # (AuthURL set: log in there, then register(followup=URL))
        await conn.lite_update(endpoints, types, home)  # Stream:false, OmitPeers:true
        async for netmap, change in conn.map_updates(magic):
            ...                                         # Netmap, NetmapChange per non-keepalive message

`config` needs `login_server`, `ca_file`, `hostname`, `auth_key`; `magic`
needs `endpoints()`, `endpoint_types()`, `home_region`.  `Netmap().apply(
proto.MapResponse) -> NetmapChange` is pure and usable on its own.

Errors: unreachable or malformed server -> TransportError / ConfigError;
rejected, expired or used-up auth key -> AuthError; bad bytes from the
server -> RemoteProtocolError; the server ending the stream -> StreamEnded.
"""

from trionet.control.client import (
    CAPVER,
    ControlConnection,
    LoginFollowupFailed,
    NodeKeyExpired,
    StreamEnded,
    fetch_server_key,
    open_session,
)
from trionet.control.netmap import Netmap, NetmapChange

__all__ = ["CAPVER", "ControlConnection", "LoginFollowupFailed", "Netmap", "NetmapChange", "NodeKeyExpired",
           "StreamEnded", "fetch_server_key", "open_session"]
