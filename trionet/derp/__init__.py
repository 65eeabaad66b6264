"""DERP: the relay that carries WireGuard and disco packets between nodes.

``frames`` is the wire format, ``client`` the sans-IO login/keepalive state
machine, ``driver`` the trio connection with reconnects.
"""
