from __future__ import annotations

import base64
import json
import os
import stat
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trionet import keys
from trionet.errors import StateFileError


def test_state_created_0600_and_reloaded(tmp_path: Path) -> None:
    s = keys.load_or_create_state(tmp_path / "st")
    path = tmp_path / "st" / "state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = keys.load_or_create_state(tmp_path / "st")
    assert (again.machine_private, again.node_private) == (s.machine_private, s.node_private)
    assert again.disco_private != s.disco_private  # fresh each start, like tailscaled
    assert s.node_private[0] & 7 == 0 and s.node_private[31] & 0xC0 == 0x40  # clamped
    doc = json.loads(path.read_text())
    assert doc["node_private"].startswith("privkey:") and len(doc["node_private"]) == 8 + 64
    assert not list(path.parent.glob(".*.tmp"))


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"version": 1}', b'{"version": 2}',
                                     b'{"version":1,"machine_private":"privkey:zz","node_private":"x"}', b"\xff\xfe"])
def test_corrupt_state_is_an_error_and_untouched(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(StateFileError, match="corrupt"):
        keys.load_or_create_state(tmp_path)
    assert (tmp_path / "state.json").read_bytes() == content


def test_unreadable_state_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    with pytest.raises(StateFileError):
        keys.load_or_create_state(tmp_path)


def test_loose_mode_tightened(tmp_path: Path) -> None:
    keys.load_or_create_state(tmp_path)
    os.chmod(tmp_path / "state.json", 0o644)
    keys.load_or_create_state(tmp_path)
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


@given(st.binary(min_size=32, max_size=32))
def test_text_forms_round_trip(raw: bytes) -> None:
    for prefix in ("nodekey:", "mkey:", "discokey:", "privkey:"):
        assert keys.parse_key(keys.format_key(prefix, raw), prefix) == raw


def test_text_form_rejects_wrong_prefix_and_case() -> None:
    with pytest.raises(ValueError):
        keys.parse_key("mkey:" + "00" * 32, "nodekey:")
    with pytest.raises(ValueError):
        keys.parse_key("nodekey:" + "AB" * 32, "nodekey:")
    with pytest.raises(ValueError):
        keys.parse_key("nodekey:", "nodekey:")


async def test_node_key_renewal_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    s = keys.load_or_create_state(tmp_path)
    old = s.node_private
    new = await s.begin_node_key_renewal()
    assert new != old and await s.begin_node_key_renewal() == new  # idempotent until it ends
    # crash here: the next start still has the old key and the pending one
    crashed = keys.load_or_create_state(tmp_path)
    assert (crashed.node_private, crashed.pending_node_private) == (old, new)
    await crashed.finish_node_key_renewal(1234.5)
    after = keys.load_or_create_state(tmp_path)
    assert (after.node_private, after.pending_node_private, after.node_key_since) == (new, None, 1234.5)
    assert "pending_node_private" not in json.loads((tmp_path / "state.json").read_text())
    await after.begin_node_key_renewal()
    await after.abandon_node_key_renewal()
    assert keys.load_or_create_state(tmp_path).pending_node_private is None
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


def test_corrupt_pending_key_is_an_error(tmp_path: Path) -> None:
    keys.load_or_create_state(tmp_path)
    doc = json.loads((tmp_path / "state.json").read_text())
    doc["pending_node_private"] = "privkey:nothex"
    (tmp_path / "state.json").write_text(json.dumps(doc))
    with pytest.raises(StateFileError, match="corrupt"):
        keys.load_or_create_state(tmp_path)


# ------------------------------------------------------ writes from async code


def _slow_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[int], list[bytes]]:
    """write_atomic that waits for `release`, records the writing thread and what it wrote."""
    release = threading.Event()
    threads: list[int] = []
    written: list[bytes] = []
    real = keys.write_atomic

    def slow(path: Path, data: bytes, mode: int = 0o600) -> None:
        threads.append(threading.get_ident())
        assert release.wait(30)
        real(path, data, mode)
        written.append(data)

    monkeypatch.setattr(keys, "write_atomic", slow)
    return release, threads, written


async def test_save_async_writes_off_the_loop_while_the_loop_runs(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = keys.load_or_create_state(tmp_path)
    release, threads, written = _slow_writes(monkeypatch)
    ticks = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.save_async)
        while not threads:  # the write has begun in its thread and is blocked there ...
            await trio.sleep(0.001)
        for _ in range(5):  # ... and the loop still runs other tasks
            await trio.sleep(0)
            ticks += 1
        release.set()
    assert ticks == 5 and len(written) == 1
    assert threads[0] != threading.get_ident()


async def test_concurrent_saves_do_not_interleave_and_the_newest_lands_last(tmp_path: Path) -> None:
    state = keys.load_or_create_state(tmp_path)
    async with trio.open_nursery() as nursery:
        for i in range(20):
            state.extra["counter"] = i
            nursery.start_soon(state.save_async)
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["counter"] == 19
    assert not list(tmp_path.glob(".*.tmp"))
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


async def test_saves_queue_in_order_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = keys.load_or_create_state(tmp_path)
    release, threads, written = _slow_writes(monkeypatch)

    async def save_with(value: int) -> None:
        state.extra["counter"] = value
        await state.save_async()

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(save_with, i)
            await trio.sleep(0)
        while not threads:
            await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert len(threads) == 1  # the others wait for the lock, not in a second thread
        release.set()
    # each write carries the state as it was when it got the lock: never older than the last one
    counters = [json.loads(w)["counter"] for w in written]
    assert counters == sorted(counters) and counters[-1] == 2


async def test_a_cancelled_renewal_still_leaves_its_key_on_disk(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    state = keys.load_or_create_state(tmp_path)
    release, threads, _ = _slow_writes(monkeypatch)
    got: list[bytes] = []
    after_checkpoint: list[bool] = []
    scope = trio.CancelScope()

    async def renew() -> None:
        with scope:
            got.append(await state.begin_node_key_renewal())
            await trio.lowlevel.checkpoint()  # the cancel lands here, after the write
            after_checkpoint.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.save_async)  # an earlier write, still in its thread
        while not threads:
            await trio.sleep(0.001)
        nursery.start_soon(renew)
        await trio.testing.wait_all_tasks_blocked()  # the renewal waits for the earlier write
        scope.cancel()  # e.g. the session ends while the key waits to be written
        release.set()
    assert len(threads) == 2, "the cancelled renewal's write was skipped"
    assert scope.cancelled_caught and not after_checkpoint
    on_disk = keys.load_state(tmp_path)
    assert on_disk is not None and got == [on_disk.pending_node_private] and got[0] is not None


async def test_a_failed_renewal_write_hands_out_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = keys.load_or_create_state(tmp_path)

    def full_disk(path: Path, data: bytes, mode: int = 0o600) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keys, "write_atomic", full_disk)
    with pytest.raises(OSError):
        await state.begin_node_key_renewal()
    assert state.pending_node_private is None


def test_write_atomic_leaves_no_temp_file_when_the_write_fails(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    keys.load_or_create_state(tmp_path)

    def no_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(keys.os, "fsync", no_fsync)
    with pytest.raises(OSError):
        keys.write_atomic(tmp_path / "state.json", b"{}")
    assert not list(tmp_path.glob(".*.tmp"))
    assert keys.load_state(tmp_path) is not None  # the old file is whole


def test_state_repr_shows_public_keys_only(tmp_path: Path) -> None:
    state = keys.load_or_create_state(tmp_path)
    state.pending_node_private = keys.new_private()
    text = repr(state)
    for private in (state.machine_private, state.node_private, state.disco_private, state.pending_node_private):
        for form in _encodings(private):
            assert form not in text
    assert keys.format_key("nodekey:", state.node_public) in text
    assert keys.format_key("mkey:", state.machine_public) in text


def _encodings(raw: bytes) -> list[str]:
    return [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
            repr(raw)[2:-1]]


def test_writers_in_several_threads_never_tear_the_file(tmp_path: Path) -> None:
    """They share one temp file name (per pid): without the lock they rename each other's."""
    path = tmp_path / "state.json"
    errors: list[BaseException] = []
    payloads = [json.dumps({"writer": w, "pad": "x" * (w * 5000)}).encode() for w in range(4)]

    def writer(data: bytes) -> None:
        try:
            for _ in range(30):
                keys.write_atomic(path, data)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert path.read_bytes() in payloads
