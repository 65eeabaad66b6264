"""The daemon's status: a state machine written as a table.

Everything that changes the status goes through `StatusMachine.move`; an
illegal transition is our bug (LocalProtocolError), never silently accepted.
The machine reads no clock of its own: `clock` gives the wall time of a change
(a Node passes its Trio-based `trionet.clock.wall`).

NeedsLogin (tailscaled's ipn.State name) carries the login server's URL in
`login_url`; a new URL while still NeedsLogin is announced to the listeners
as a change from NeedsLogin to NeedsLogin, so whoever shows it can show the
new one. Outside NeedsLogin `login_url` is "".
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import attrs

from trionet.errors import LocalProtocolError


class Status(enum.Enum):
    STARTING = "Starting"
    CONNECTING = "Connecting"
    REGISTERING = "Registering"
    NEEDS_LOGIN = "NeedsLogin"
    RUNNING = "Running"
    RECONNECTING = "Reconnecting"
    SHUTTING_DOWN = "ShuttingDown"
    STOPPED = "Stopped"
    ERROR = "Error"


S = Status
# from-state -> states it may move to. ShuttingDown and Error are reachable from
# every live state (a signal or a fatal error can come at any time).
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.STARTING: frozenset({S.CONNECTING, S.SHUTTING_DOWN, S.ERROR}),
    S.CONNECTING: frozenset({S.REGISTERING, S.RUNNING, S.RECONNECTING, S.SHUTTING_DOWN, S.ERROR}),
    S.REGISTERING: frozenset({S.NEEDS_LOGIN, S.RUNNING, S.RECONNECTING, S.SHUTTING_DOWN, S.ERROR}),
    # waiting for an admin; "Registering" again once approved, until the first netmap
    S.NEEDS_LOGIN: frozenset({S.REGISTERING, S.RUNNING, S.RECONNECTING, S.SHUTTING_DOWN, S.ERROR}),
    # a node key that expired while running, with no auth key, needs a login again
    S.RUNNING: frozenset({S.RECONNECTING, S.REGISTERING, S.NEEDS_LOGIN, S.SHUTTING_DOWN, S.ERROR}),
    S.RECONNECTING: frozenset({S.CONNECTING, S.SHUTTING_DOWN, S.ERROR}),
    S.SHUTTING_DOWN: frozenset({S.STOPPED}),
    S.ERROR: frozenset({S.SHUTTING_DOWN, S.STOPPED, S.RECONNECTING}),
    S.STOPPED: frozenset(),
}


@attrs.define
class StatusChange:
    old: Status
    new: Status
    reason: str
    at: float
    login_url: str = ""  # set when `new` is NeedsLogin


@attrs.define
class StatusMachine:
    status: Status = Status.STARTING
    reason: str = ""
    login_url: str = ""  # while NeedsLogin: where to log in
    since: float = attrs.field(factory=time.time)
    history: list[StatusChange] = attrs.field(factory=list)
    listeners: list[Callable[[StatusChange], None]] = attrs.field(factory=list)
    clock: Callable[[], float] = attrs.field(default=time.time, repr=False)

    def move(self, new: Status, reason: str = "", at: float | None = None, *, login_url: str = "") -> None:
        if bool(login_url) != (new is Status.NEEDS_LOGIN):
            raise LocalProtocolError("a login URL goes with NeedsLogin, and only with it")
        if new == self.status and login_url == self.login_url:
            self.reason = reason or self.reason
            return
        if new != self.status and new not in TRANSITIONS[self.status]:
            raise LocalProtocolError(f"illegal status transition {self.status.value} -> {new.value}")
        change = StatusChange(self.status, new, reason, self.clock() if at is None else at, login_url)
        self.status, self.reason, self.since, self.login_url = new, reason, change.at, login_url
        self.history.append(change)
        del self.history[:-50]
        for listener in list(self.listeners):
            listener(change)
