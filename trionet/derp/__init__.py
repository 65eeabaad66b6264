"""DERP: the relay that carries WireGuard and disco packets between nodes.

``frames`` is the wire format, ``client`` the sans-IO login/keepalive state
machine, ``transport`` the byte streams (TCP, TLS, the HTTP upgrade,
WebSocket) and ``driver`` the trio connection with reconnects.
"""
