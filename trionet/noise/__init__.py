"""TS2021 Noise: the sans-IO handshake and transport (`core`), and `NoiseStream`."""

from trionet.noise.core import (
    MAX_PLAINTEXT,
    Initiator,
    NoiseTransport,
    parse_frame_header,
)

__all__ = ["MAX_PLAINTEXT", "Initiator", "NoiseTransport", "parse_frame_header"]
