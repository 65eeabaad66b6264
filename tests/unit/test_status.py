from __future__ import annotations

import pytest

from trionet.errors import LocalProtocolError
from trionet.status import TRANSITIONS, Status, StatusChange, StatusMachine


def test_happy_path_and_listeners() -> None:
    seen: list[StatusChange] = []
    machine = StatusMachine()
    machine.listeners.append(seen.append)
    for status in (Status.CONNECTING, Status.REGISTERING, Status.RUNNING, Status.RECONNECTING,
                   Status.CONNECTING, Status.RUNNING, Status.SHUTTING_DOWN, Status.STOPPED):
        machine.move(status, "test", at=1.0)
    assert [c.new for c in seen][-1] is Status.STOPPED
    assert len(seen) == 8


def test_illegal_transition_is_our_bug() -> None:
    machine = StatusMachine()
    with pytest.raises(LocalProtocolError):
        machine.move(Status.RUNNING)
    machine.move(Status.SHUTTING_DOWN)
    machine.move(Status.STOPPED)
    with pytest.raises(LocalProtocolError):
        machine.move(Status.CONNECTING)


def test_every_live_state_can_shut_down() -> None:
    for status, targets in TRANSITIONS.items():
        if status not in (Status.SHUTTING_DOWN, Status.STOPPED):
            assert Status.SHUTTING_DOWN in targets, status
