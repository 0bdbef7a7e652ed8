"""Frames from the gateway (``frames.c``): a PING answered on its channel, and bad frames
(unknown kinds, malformed or oversized payloads) refused on channel 0 with the framing kept in
sync and the agent serving on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from sandstorm.agent import (
    HEADER,
    MAX_GATEWAY_FRAME,
    Frame,
    FrameKind,
    decode_error,
)
from tests.unit.agent.running import (
    TIMEOUT,
    running_agent,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")


async def test_ping(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            await agent.channel.send_ping(b"abc", channel=7)
            await agent.channel.send_ping()
            assert await agent.next(7) == Frame(FrameKind.PONG, 7, b"abc")
            assert await agent.next(0) == Frame(FrameKind.PONG, 0, b"")


async def test_bad_frames_get_error_on_channel_0_and_the_agent_continues(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:

            async def expect_error(fragment: str) -> None:
                frame = await agent.next(0)
                assert frame.kind is FrameKind.ERROR, frame
                assert fragment in decode_error(frame.payload).message

            await agent.send_raw(HEADER.pack(99, 0, 3) + b"abc")
            await expect_error("unknown frame kind 99")
            await agent.send_raw(HEADER.pack(FrameKind.SIGNAL, 1, 5) + b"{nope")
            await expect_error("malformed SIGNAL payload")
            await agent.send_raw(HEADER.pack(FrameKind.SIGNAL, 1, 13) + b'{"signal":99}')
            await expect_error("SIGNAL needs")
            await agent.send_raw(HEADER.pack(FrameKind.PING, 0, 65) + bytes(65))
            await expect_error("PING payload is 65 bytes")
            await agent.send_raw(HEADER.pack(FrameKind.EXEC, 0, 2) + b"{}")
            await expect_error("EXEC on channel 0")
            # An oversized frame is skipped whole; the framing stays in sync.
            size = MAX_GATEWAY_FRAME + 1
            await agent.send_raw(HEADER.pack(FrameKind.STDIN, 5, size) + bytes(size))
            await expect_error(f"is {size} bytes")
            await agent.channel.send_ping(b"alive")
            assert await agent.next(0) == Frame(FrameKind.PONG, 0, b"alive")
            result = await agent.run(["echo", "still works"])
            assert result.stdout == b"still works\n"
