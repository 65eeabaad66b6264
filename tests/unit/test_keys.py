from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
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


def test_node_key_renewal_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    s = keys.load_or_create_state(tmp_path)
    old = s.node_private
    new = s.begin_node_key_renewal()
    assert new != old and s.begin_node_key_renewal() == new  # idempotent until it ends
    # crash here: the next start still has the old key and the pending one
    crashed = keys.load_or_create_state(tmp_path)
    assert (crashed.node_private, crashed.pending_node_private) == (old, new)
    crashed.finish_node_key_renewal(1234.5)
    after = keys.load_or_create_state(tmp_path)
    assert (after.node_private, after.pending_node_private, after.node_key_since) == (new, None, 1234.5)
    assert "pending_node_private" not in json.loads((tmp_path / "state.json").read_text())
    after.begin_node_key_renewal()
    after.abandon_node_key_renewal()
    assert keys.load_or_create_state(tmp_path).pending_node_private is None
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


def test_corrupt_pending_key_is_an_error(tmp_path: Path) -> None:
    keys.load_or_create_state(tmp_path)
    doc = json.loads((tmp_path / "state.json").read_text())
    doc["pending_node_private"] = "privkey:nothex"
    (tmp_path / "state.json").write_text(json.dumps(doc))
    with pytest.raises(StateFileError, match="corrupt"):
        keys.load_or_create_state(tmp_path)
