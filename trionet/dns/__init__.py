"""MagicDNS: tailscaled's quad-100 resolver, for the netstack, a host port and `Node.resolve`.

`view` (what the netmap says) and `resolver` (a query in, an answer or a
forwarding decision out) are sans-IO; `driver` serves them over UDP and TCP
(in the netstack at 100.100.100.100 and fd7a:115c:a1e0::53, and on a host
port for `up --dns`) and forwards what is not ours.
"""
