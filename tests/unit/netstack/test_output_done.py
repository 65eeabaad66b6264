"""``output_done`` closes every step that emitted packets, so an owner holding them
(magicsock's corked GSO writes) never keeps one past the step."""

from __future__ import annotations

import trio

from trionet.errors import TransportError
from trionet.netstack import NetStack


async def test_output_done_follows_every_emitting_step() -> None:
    events: list[str] = []
    stack = NetStack(["10.0.0.1"], output=lambda packet: events.append("packet"),
                     output_done=lambda: events.append("done"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stack.run)
        try:
            await stack.ping("10.0.0.2", timeout=0.05)
        except TransportError:
            pass
        with trio.move_on_after(0.05):
            await stack.open_tcp_stream("10.0.0.2", 80)  # a SYN; no answer comes
        nursery.cancel_scope.cancel()
    # the echo request, the SYN: each step emits one packet, and output_done closes it
    # before the task awaits anything
    assert events.count("packet") == 2, events
    for i, event in enumerate(events):
        if event == "packet":
            assert events[i + 1:i + 2] == ["done"], events
