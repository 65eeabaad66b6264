"""Fixtures that bring up the real stack (tests/realstack.py).

Integration tests never skip: if the stack cannot be built or started, the
fixture raises StackError and the test errors with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.realstack import HEADSCALE_VERSIONS, NEWEST_HEADSCALE, Stack

_shared: dict[str, Stack] = {}


def _shared_stack(version: str) -> Stack:
    if version not in _shared:
        _shared[version] = Stack(version).start(tailscaleds=2)
    return _shared[version]


@pytest.fixture(scope="session", autouse=True)
def _teardown_shared_stacks() -> Iterator[None]:
    yield
    for stack in _shared.values():
        stack.stop()
    _shared.clear()


@pytest.fixture(scope="session", params=HEADSCALE_VERSIONS, ids=lambda v: f"hs{v}")
def stack(request: pytest.FixtureRequest) -> Stack:
    """A shared stack (Headscale + 2 tailscaled), once per Headscale version.

    Tests on it must leave it as they found it; tests that restart or reshape
    the stack use `make_stack` instead.
    """
    return _shared_stack(request.param)


@pytest.fixture(scope="session")
def newest_stack() -> Stack:
    """The shared stack on the newest Headscale release."""
    return _shared_stack(NEWEST_HEADSCALE)


@pytest.fixture
def make_stack() -> Iterator[Callable[..., Stack]]:
    """A factory for private stacks that a test may restart, reshape or break."""
    made: list[Stack] = []

    def factory(version: str = NEWEST_HEADSCALE, tailscaleds: int = 2, policy: str | None = None) -> Stack:
        stack = Stack(version, policy=policy)
        made.append(stack)
        return stack.start(tailscaleds=tailscaleds)

    yield factory
    for stack in made:
        stack.stop()
