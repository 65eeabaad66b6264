"""One exception hierarchy for trionet.

Whose fault it was decides the class: the user (config, flags, auth key), the
network peer (garbage on the wire), or the transport (a socket went away).
The CLI turns any TrionetError into one line and a non-zero exit.
"""

from __future__ import annotations


class TrionetError(Exception):
    """Base of every error trionet raises on purpose."""

    exit_code = 1


class ConfigError(TrionetError):
    """Bad input from the user: flags, config, state file."""

    exit_code = 2


class AuthError(TrionetError):
    """The control server refused our credentials (auth key, node key)."""

    exit_code = 3


class StateFileError(ConfigError):
    """The state file is unreadable or corrupt; it is never silently replaced."""


class TransportError(TrionetError):
    """A connection failed or closed: retry with backoff."""

    exit_code = 4


class StartTimeout(TransportError):
    """The node was not Running within its start timeout (`up --timeout`)."""


class ControlError(TrionetError):
    """The control server answered with something we cannot use."""

    exit_code = 5


class LocalProtocolError(TrionetError):
    """We misused a protocol core: a bug in trionet."""


class RemoteProtocolError(TrionetError):
    """The peer sent bytes that break the protocol: count, log, drop."""


def find_trionet_error(exc: BaseException) -> TrionetError | None:
    """The TrionetError inside a (possibly nested) exception group, if any.

    Nurseries wrap errors in groups; the user should still see one clear line.
    """
    from trionet.exc_groups import leaves  # (that module needs nothing of ours: no cycle)

    return next((e for e in leaves(exc) if isinstance(e, TrionetError)), None)
