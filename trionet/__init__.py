"""trionet: a userspace Tailscale node in pure Python, built on Trio."""

__version__ = "0.1.0"
