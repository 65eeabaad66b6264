"""Keys and the state file.

* machine key: the static key of the TS2021 Noise session (`mkey:`);
* node key: the WireGuard static key, the DERP identity and the netmap's
  `NodeKey`, all one key (`nodekey:`); there is no separate WireGuard key;
* disco key: NaCl box for disco only (`discokey:`), fresh at every start as
  tailscaled does (wgengine/magicsock NewConn).

Node key renewal (control/session.py) writes the new key as
`pending_node_private` before it asks the server, and swaps it in after the
server accepts: a crash in between leaves both keys on disk, and the next
start finishes the swap (tailscaled's `tryingNewKey`, controlclient/direct.go).

Private keys are `privkey:` text, clamped at creation (types/key/util.go).
The state file is written atomically (temp file, fsync, rename, fsync dir)
with mode 0600. A corrupt or unreadable state file is a StateFileError and is
never replaced.

Writes from a running node (`save_async` and the renewal steps) run in a
worker thread, so an fsync never stalls the event loop; one at a time, in
the order they were asked for; shielded from cancellation, so a key the
caller was promised is on disk is on disk. `save` and `load_or_create_state`
are blocking: for start-up, before the loop has other work, and for tests.

A State's repr shows public keys only: private keys never reach a log line.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import attrs
import trio
from nacl.bindings import crypto_scalarmult_base

from trionet.errors import StateFileError

STATE_NAME = "state.json"
STATE_VERSION = 1


def clamp(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def new_private() -> bytes:
    return clamp(os.urandom(32))


def public_of(private: bytes) -> bytes:
    return bytes(crypto_scalarmult_base(private))


def format_key(prefix: str, raw: bytes) -> str:
    if len(raw) != 32:
        raise ValueError(f"a key is 32 bytes, not {len(raw)}")
    return prefix + raw.hex()


def parse_key(text: str, prefix: str) -> bytes:
    if not isinstance(text, str) or not text.startswith(prefix):
        raise ValueError(f"expected a {prefix} key, got {str(text)[:24]!r}")
    body = text[len(prefix):]
    if len(body) != 64 or body != body.lower():
        raise ValueError(f"{prefix} key must be 64 lowercase hex digits")
    return bytes.fromhex(body)


def parse_public(text: str, prefix: str) -> bytes:
    return parse_key(text, prefix)


ZERO_NODE_KEY = format_key("nodekey:", bytes(32))


@attrs.define(repr=False)
class State:
    """What a node keeps across restarts, plus this run's disco key."""

    path: Path
    machine_private: bytes
    node_private: bytes
    disco_private: bytes = attrs.field(factory=new_private)
    extra: dict[str, Any] = attrs.field(factory=dict)
    pending_node_private: bytes | None = None  # a renewal the server may not have seen yet
    node_key_since: float | None = None  # wall-clock time the server accepted node_private
    # Orders this State's writes from async code (FIFO): the last write on disk is the newest.
    _save_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False, eq=False)

    def __repr__(self) -> str:
        pending = self.pending_node_private
        return (f"State(path={str(self.path)!r}, machine={format_key('mkey:', self.machine_public)}, "
                f"node={format_key('nodekey:', self.node_public)}, "
                f"disco={format_key('discokey:', self.disco_public)}, "
                f"pending_node={format_key('nodekey:', public_of(pending)) if pending else None}, "
                f"node_key_since={self.node_key_since!r}, extra={sorted(self.extra)!r})")

    @property
    def machine_public(self) -> bytes:
        return public_of(self.machine_private)

    @property
    def node_public(self) -> bytes:
        return public_of(self.node_private)

    @property
    def disco_public(self) -> bytes:
        return public_of(self.disco_private)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION,
                "machine_private": format_key("privkey:", self.machine_private),
                "node_private": format_key("privkey:", self.node_private),
                **({"pending_node_private": format_key("privkey:", self.pending_node_private)}
                   if self.pending_node_private else {}),
                **({"node_key_since": self.node_key_since} if self.node_key_since is not None else {}),
                **self.extra}

    async def begin_node_key_renewal(self) -> bytes:
        """A new node key, on disk before this returns (the server may hear of it next)."""
        fresh = self.pending_node_private is None
        if self.pending_node_private is None:
            self.pending_node_private = new_private()
        key = self.pending_node_private
        try:
            # Also when the key already existed: it may still be in a write another task started.
            await self.save_async()
        except BaseException:
            if fresh and self.pending_node_private == key:
                self.pending_node_private = None  # never hand out a key that is not on disk
            raise
        return key

    async def finish_node_key_renewal(self, accepted_at: float) -> None:
        """The server accepted the pending key: it is our node key from now on."""
        assert self.pending_node_private is not None
        self.node_private, self.pending_node_private = self.pending_node_private, None
        self.node_key_since = accepted_at
        await self.save_async()

    async def abandon_node_key_renewal(self) -> None:
        if self.pending_node_private is not None:
            self.pending_node_private = None
            await self.save_async()

    def _encoded(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()

    def save(self) -> None:
        """Blocking write: for start-up and tests; a running node uses `save_async`."""
        write_atomic(self.path, self._encoded())

    async def save_async(self) -> None:
        """Write the state as it is now, in a worker thread, whatever cancels the caller.

        The shield covers the wait for earlier writes and the thread: a thread in
        fsync cannot be stopped anyway, and a cancelled save would leave the
        caller's in-memory state (a pending key the server is about to hear of)
        ahead of the disk. The cancel lands at the caller's next checkpoint.
        The snapshot is taken under the lock, in the loop's thread, so no write
        sees a half-made change and a later write never carries older state.
        """
        with trio.CancelScope(shield=True):
            async with self._save_lock:
                data = self._encoded()
                await trio.to_thread.run_sync(write_atomic, self.path, data)


# One writer at a time in this process: writers share the temp file name (one per pid).
_WRITE_LOCK = threading.Lock()


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Whole or not at all: a crash leaves the old file or the new one, never half."""
    with _WRITE_LOCK:
        _write_atomic_locked(path, data, mode)


def _write_atomic_locked(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # 0600 from creation (no window where others could read the keys); never through a symlink
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk must not leave a stray temp file behind
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_state(state_dir: Path) -> State | None:
    path = state_dir / STATE_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read state file {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state file version {doc.get('version') if isinstance(doc, dict) else '?'}")
        machine = parse_key(doc["machine_private"], "privkey:")
        node = parse_key(doc["node_private"], "privkey:")
        pending = doc.get("pending_node_private")
        pending_key = parse_key(pending, "privkey:") if pending is not None else None
        since = doc.get("node_key_since")
        if since is not None and not isinstance(since, (int, float)):
            raise ValueError("node_key_since must be a number")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise StateFileError(f"state file {path} is corrupt ({exc}); move it away to start as a new node") from exc
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)  # keys are secrets: tighten, never loosen
    known = ("version", "machine_private", "node_private", "pending_node_private", "node_key_since")
    extra = {k: v for k, v in doc.items() if k not in known}
    return State(path, machine, node, extra=extra, pending_node_private=pending_key,
                 node_key_since=float(since) if since is not None else None)


def _sweep_temp_files(state_dir: Path) -> None:
    """Temp files a killed writer left behind (the state file itself is whole)."""
    for tmp in state_dir.glob(f".{STATE_NAME}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def load_or_create_state(state_dir: Path) -> State:
    if state_dir.is_dir():
        _sweep_temp_files(state_dir)
    state = load_state(state_dir)
    if state is None:
        state = State(state_dir / STATE_NAME, new_private(), new_private())
        try:
            state.save()
        except OSError as exc:
            raise StateFileError(f"cannot write state file {state.path}: {exc.strerror}") from exc
    return state
