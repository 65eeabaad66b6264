"""WireGuard, sans-IO: see `device`."""

from trionet.wg.device import Received, Transmit, WgDevice

__all__ = ["Received", "Transmit", "WgDevice"]
