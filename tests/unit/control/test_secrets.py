"""Secrets stay out of reprs and of the login server's error text."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from types import SimpleNamespace

from trionet import keys
from trionet.config import Listen, NodeConfig
from trionet.control.client import ControlConnection, _scrub
from trionet.control.session import ControlSession
from trionet.status import StatusMachine

AUTH_KEY = "hskey-auth-Zq3secretSECRETsecret"
PASSWORD = "s0cks-pa55word"


def _private_forms(state: keys.State) -> list[str]:
    out = []
    for raw in (state.machine_private, state.node_private, state.disco_private):
        out += [raw.hex(), base64.b64encode(raw).decode(), keys.format_key("privkey:", raw)]
    return out


def test_node_config_repr_hides_auth_key_and_socks5_password(tmp_path: Path) -> None:
    config = NodeConfig("https://hs.example", tmp_path, auth_key=AUTH_KEY, socks5=Listen("127.0.0.1", 1080),
                        socks5_auth=("alice", PASSWORD))
    for text in (repr(config), str(config), f"{config}", repr([config])):
        assert AUTH_KEY not in text and PASSWORD not in text
        assert "auth_key='<redacted>'" in text and "socks5_auth=('alice', '<redacted>')" in text
    # nothing to hide: the repr says so, rather than hiding that there is nothing
    assert "auth_key=None" in repr(NodeConfig("https://hs.example", tmp_path))
    assert config.auth_key == AUTH_KEY and config.socks5_auth == ("alice", PASSWORD)  # values intact


def test_control_objects_repr_names_no_secret(tmp_path: Path) -> None:
    state = keys.load_or_create_state(tmp_path)
    config = NodeConfig("https://hs.example", tmp_path, auth_key=AUTH_KEY, socks5_auth=("alice", PASSWORD))
    conn = ControlConnection(config, state, h2conn=None)  # type: ignore[arg-type]
    session = ControlSession(config, state, SimpleNamespace(), lambda *_: None, StatusMachine(), random.Random(1))
    for text in (repr(conn), repr(session), repr(state)):
        assert AUTH_KEY not in text and PASSWORD not in text
        for form in _private_forms(state):
            assert form not in text
    assert keys.format_key("nodekey:", state.node_public) in repr(conn)


def test_server_error_text_never_repeats_the_auth_key() -> None:
    assert _scrub(f'invalid auth key "{AUTH_KEY}"', AUTH_KEY) == 'invalid auth key "<redacted>"'
    assert _scrub("plain refusal", None) == "plain refusal"
