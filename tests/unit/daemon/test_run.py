"""The daemon's edges: a failed start told once; a start timeout in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from trionet.config import NodeConfig
from trionet.daemon.run import _StatusPrinter
from trionet.node import Node
from trionet.status import Status, StatusMachine


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_a_failed_start_leaves_its_error_to_the_cli(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trionet")
    machine = StatusMachine(listeners=[_StatusPrinter(as_json=False)])
    machine.move(Status.CONNECTING, "contacting https://hs")
    machine.move(Status.ERROR, "cannot reach login server https://hs")
    machine.move(Status.SHUTTING_DOWN, "stopping")
    machine.move(Status.STOPPED)
    assert _lines(caplog, logging.INFO) == ["Connecting: contacting https://hs"]
    assert "Error: cannot reach login server https://hs" in _lines(caplog, logging.DEBUG)


def test_after_running_every_change_is_news(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trionet")
    machine = StatusMachine(listeners=[_StatusPrinter(as_json=False)])
    for status in (Status.CONNECTING, Status.RUNNING, Status.ERROR, Status.SHUTTING_DOWN, Status.STOPPED):
        machine.move(status, "why" if status is Status.ERROR else "")
    assert _lines(caplog, logging.INFO) == ["Connecting", "Running", "Error: why", "ShuttingDown", "Stopped"]


def test_json_mode_prints_every_change(capsys: pytest.CaptureFixture[str]) -> None:
    machine = StatusMachine(listeners=[_StatusPrinter(as_json=True)])
    machine.move(Status.CONNECTING)
    machine.move(Status.ERROR, "no")
    assert [line.split('"')[3] for line in capsys.readouterr().out.splitlines()] == ["Connecting", "Error"]


def test_start_timeout_names_where_the_start_got_stuck(tmp_path: Path) -> None:
    node = Node(config=NodeConfig("https://hs", tmp_path, start_timeout=7.5))
    machine = node.status_machine
    machine.move(Status.CONNECTING, "contacting https://hs")
    machine.move(Status.REGISTERING, "registering")
    machine.move(Status.SHUTTING_DOWN, "stopping")  # what Node.run's finally does on the way out
    machine.move(Status.STOPPED)
    text = node._start_timeout_message()
    assert "\n" not in text
    assert text.startswith("not connected after 7.5 s (still Registering: registering)")
    assert "https://hs" in text
