"""RejectLog: counts every rejection, logs few of them, logs an internal error's traceback once."""

from __future__ import annotations

import logging

import pytest

from trionet.rejects import RejectLog, should_log


def test_logged_counts_are_powers_of_two_then_every_1024th() -> None:
    logged = [c for c in range(1, 5000) if should_log(c)]
    assert logged == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096]


def test_a_flood_of_one_kind_is_counted_whole_and_logged_14_times(caplog: pytest.LogCaptureFixture) -> None:
    rejects = RejectLog(logging.getLogger("test.rejects"), "test")
    with caplog.at_level(logging.DEBUG, "test.rejects"):
        for _ in range(5000):
            rejects.reject("garbage")
        rejects.reject("short", n=3)  # counts 1..3: 1 and 2 would log, the batch logs once
    assert rejects.counts == {"garbage": 5000, "short": 3}
    assert len([r for r in caplog.records if "garbage" in r.getMessage()]) == 14
    assert len([r for r in caplog.records if "short" in r.getMessage()]) == 1


def test_a_batch_that_jumps_over_no_logged_count_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    rejects = RejectLog(logging.getLogger("test.rejects"), "test")
    rejects.reject("x", n=4)
    with caplog.at_level(logging.DEBUG, "test.rejects"):
        rejects.reject("x", n=3)  # 5, 6, 7: none is a power of two
        assert not caplog.records
        rejects.reject("x", n=2)  # 8
    assert len(caplog.records) == 1 and rejects["x"] == 9


def test_internal_error_logs_its_traceback_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    rejects = RejectLog(logging.getLogger("test.rejects"), "test")
    with caplog.at_level(logging.DEBUG, "test.rejects"):
        for _ in range(3):
            try:
                {}["missing"]
            except KeyError as exc:
                rejects.internal_error("disco", exc)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert rejects["internal_error.disco"] == 3
