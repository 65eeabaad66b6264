"""The control plane: TS2021 client (`client`) and the netmap core (`netmap`)."""

from trionet.control.client import CAPVER, ControlConnection, StreamEnded, open_session
from trionet.control.netmap import Netmap, NetmapChange

__all__ = ["CAPVER", "ControlConnection", "Netmap", "NetmapChange", "StreamEnded", "open_session"]
