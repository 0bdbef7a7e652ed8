"""The gateway's end of an agent connection (``AgentChannel``) over in-memory streams:
framing, limits, HELLO, the send helpers' payload validation, and cancellation."""

from __future__ import annotations

import base64
import json

import pytest
import trio
import trio.testing

from sandstorm.agent import (
    HEADER,
    MAX_AGENT_FRAME,
    MAX_GATEWAY_FRAME,
    AgentChannel,
    AgentProtocolError,
    Frame,
    FrameKind,
)
from tests.unit.agent.test_wire import frame

TIMEOUT = 5


def make_channel() -> tuple[
    AgentChannel, trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream
]:
    """An AgentChannel over in-memory streams: returns (channel, agent's stdin, agent's stdout)."""
    to_agent = trio.testing.MemorySendStream()
    from_agent = trio.testing.MemoryReceiveStream()
    return AgentChannel(to_agent, from_agent), to_agent, from_agent


async def test_receive_frames_split_at_every_byte() -> None:
    channel, _, from_agent = make_channel()
    data = frame(FrameKind.HELLO, 0, b'{"protocol":1,"pid":1}') + frame(FrameKind.STDOUT, 3, b"hi")
    data += frame(FrameKind.STDERR, 3)
    with trio.fail_after(TIMEOUT):
        for index in range(len(data)):
            from_agent.put_data(data[index : index + 1])
        from_agent.put_eof()
        frames = []
        while (received := await channel.receive_frame()) is not None:
            frames.append(received)
    assert frames == [
        Frame(FrameKind.HELLO, 0, b'{"protocol":1,"pid":1}'),
        Frame(FrameKind.STDOUT, 3, b"hi"),
        Frame(FrameKind.STDERR, 3, b""),
    ]
    assert channel.statistics().frames_received == 3
    assert channel.statistics().bytes_buffered == 0


async def test_receive_many_frames_in_one_chunk_and_max_size() -> None:
    channel, _, from_agent = make_channel()
    big = b"x" * MAX_AGENT_FRAME
    from_agent.put_data(frame(FrameKind.STDOUT, 1, b"a") + frame(FrameKind.STDOUT, 1, big))
    from_agent.put_eof()
    with trio.fail_after(TIMEOUT):
        first = await channel.receive_frame()
        second = await channel.receive_frame()
        assert await channel.receive_frame() is None
        assert await channel.receive_frame() is None  # EOF is sticky
    assert first == Frame(FrameKind.STDOUT, 1, b"a")
    assert second is not None
    assert second.payload == big


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (frame(99, 0), "unknown frame kind 99"),
        (frame(0, 0), "unknown frame kind 0"),
        (frame(FrameKind.EXEC, 1, b"{}"), "EXEC is not allowed from the agent"),
        (frame(FrameKind.STDIN, 1), "STDIN is not allowed from the agent"),
        (
            HEADER.pack(FrameKind.STDOUT, 1, MAX_AGENT_FRAME + 1),
            f"STDOUT frame of {MAX_AGENT_FRAME + 1} bytes exceeds the limit",
        ),
        (frame(FrameKind.HELLO, 4, b"{}"), "HELLO on channel 4"),
        (frame(FrameKind.EXIT, 0, b"{}"), "EXIT frame on channel 0"),
        (frame(FrameKind.STDOUT, 1, b"abc")[:-1], "ended inside a frame (11 bytes pending)"),
        (b"\x04\x00", "ended inside a frame (2 bytes pending)"),
    ],
)
async def test_receive_rejects(data: bytes, message: str) -> None:
    channel, _, from_agent = make_channel()
    from_agent.put_data(data)
    from_agent.put_eof()
    with trio.fail_after(TIMEOUT):
        with pytest.raises(
            AgentProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")
        ):
            await channel.receive_frame()
        # The framing is lost: the channel stays failed.
        with pytest.raises(AgentProtocolError, match="already failed"):
            await channel.receive_frame()


async def test_oversize_header_rejected_without_waiting_for_payload() -> None:
    channel, _, from_agent = make_channel()
    from_agent.put_data(HEADER.pack(FrameKind.STDOUT, 1, 2**32 - 1))  # no payload, no EOF
    with trio.fail_after(TIMEOUT), pytest.raises(AgentProtocolError, match="exceeds"):
        await channel.receive_frame()


async def test_receive_cancellation_keeps_partial_frame() -> None:
    channel, _, from_agent = make_channel()
    data = frame(FrameKind.STDOUT, 2, b"hello")
    from_agent.put_data(data[:6])
    with trio.move_on_after(0.05) as scope:
        await channel.receive_frame()
    assert scope.cancelled_caught
    assert channel.statistics().bytes_buffered == 6
    from_agent.put_data(data[6:])
    with trio.fail_after(TIMEOUT):
        assert await channel.receive_frame() == Frame(FrameKind.STDOUT, 2, b"hello")


async def test_concurrent_receive_is_an_error() -> None:
    channel, _, _ = make_channel()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.receive_frame)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await channel.receive_frame()
            nursery.cancel_scope.cancel()


async def test_wait_hello() -> None:
    channel, _, from_agent = make_channel()
    from_agent.put_data(frame(FrameKind.HELLO, 0, b'{"protocol":1,"pid":1,"agent":"c"}'))
    with trio.fail_after(TIMEOUT):
        hello = await channel.wait_hello()
    assert (hello.protocol, hello.pid, hello.agent) == (1, 1, "c")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "closed its stream before sending HELLO"),
        (frame(FrameKind.PONG, 0), "expected HELLO as the first frame, got PONG"),
        (frame(FrameKind.HELLO, 0, b'{"protocol":2,"pid":1}'), "agent speaks protocol 2"),
        (frame(FrameKind.HELLO, 0, b'{"protocol":1}'), "malformed HELLO payload"),
        (frame(FrameKind.HELLO, 0, b"not json"), "malformed HELLO payload"),
    ],
)
async def test_wait_hello_rejects(data: bytes, message: str) -> None:
    channel, _, from_agent = make_channel()
    from_agent.put_data(data)
    from_agent.put_eof()
    with trio.fail_after(TIMEOUT), pytest.raises(AgentProtocolError, match=message):
        await channel.wait_hello()


def parse_sent(data: bytes | bytearray) -> list[Frame]:
    frames = []
    while data:
        kind, channel, length = HEADER.unpack_from(data)
        frames.append(Frame(FrameKind(kind), channel, bytes(data[9 : 9 + length])))
        data = data[9 + length :]
    return frames


async def test_send_helpers_encode_requests() -> None:
    channel, to_agent, _ = make_channel()
    with trio.fail_after(TIMEOUT):
        await channel.send_exec(1, ["echo", "hi"], {"PATH": "/bin"}, "/workspace")
        await channel.send_stdin(1, b"abc")
        await channel.send_stdin(1, b"")
        await channel.send_stdin_close(1)
        await channel.send_signal(1, 15)
        await channel.send_write_file(2, "/workspace/a.txt", b"\x00\xff", 0o644)
        await channel.send_ping(b"p", channel=5)
    frames = parse_sent(to_agent.get_data_nowait())
    assert [(f.kind, f.channel) for f in frames] == [
        (FrameKind.EXEC, 1),
        (FrameKind.STDIN, 1),
        (FrameKind.STDIN_CLOSE, 1),
        (FrameKind.SIGNAL, 1),
        (FrameKind.WRITE_FILE, 2),
        (FrameKind.PING, 5),
    ]
    assert json.loads(frames[0].payload) == {
        "argv": ["echo", "hi"],
        "env": {"PATH": "/bin"},
        "cwd": "/workspace",
    }
    assert frames[1].payload == b"abc"
    assert frames[2].payload == b""
    assert json.loads(frames[3].payload) == {"signal": 15}
    request = json.loads(frames[4].payload)
    assert request == {"path": "/workspace/a.txt", "data_b64": "AP8=", "mode": 420, "append": False}
    assert base64.b64decode(request["data_b64"]) == b"\x00\xff"
    assert frames[5].payload == b"p"
    assert channel.statistics().frames_sent == 6


async def test_send_stdin_splits_large_input() -> None:
    channel, to_agent, _ = make_channel()
    data = bytes(range(256)) * (MAX_GATEWAY_FRAME * 2 // 256 + 3)
    with trio.fail_after(TIMEOUT):
        await channel.send_stdin(3, data)
    frames = parse_sent(to_agent.get_data_nowait())
    assert [len(f.payload) for f in frames] == [
        MAX_GATEWAY_FRAME,
        MAX_GATEWAY_FRAME,
        len(data) - 2 * MAX_GATEWAY_FRAME,
    ]
    assert b"".join(f.payload for f in frames) == data


async def test_send_validation() -> None:
    channel, to_agent, _ = make_channel()
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ValueError, match="not sent by the gateway"):
            await channel.send_frame(FrameKind.STDOUT, 1, b"")
        with pytest.raises(ValueError, match="channel 0 out of range"):
            await channel.send_frame(FrameKind.EXEC, 0, b"{}")
        with pytest.raises(ValueError, match="out of range"):
            await channel.send_frame(FrameKind.PING, 2**32, b"")
        with pytest.raises(ValueError, match="exceeds"):
            await channel.send_frame(FrameKind.STDIN, 1, b"x" * (MAX_GATEWAY_FRAME + 1))
        with pytest.raises(ValueError, match="argv"):
            await channel.send_exec(1, [], {}, "/")
        with pytest.raises(ValueError, match="signal"):
            await channel.send_signal(1, 0)
        with pytest.raises(ValueError, match="absolute"):
            await channel.send_write_file(1, "rel", b"", 0o644)
        with pytest.raises(ValueError, match="exceeds"):
            await channel.send_write_file(1, "/big", b"x" * MAX_GATEWAY_FRAME, 0o644)
        with pytest.raises(ValueError, match="PING"):
            await channel.send_ping(b"x" * 65)
    with pytest.raises(trio.WouldBlock):  # nothing was sent
        to_agent.get_data_nowait()


async def test_concurrent_senders_never_interleave() -> None:
    # A stream that yields inside send_all, so that unserialised senders would collide.
    to_agent = trio.testing.MemorySendStream()
    written = bytearray()

    async def slow_send_all_hook() -> None:
        written.extend(to_agent.get_data_nowait())
        await trio.lowlevel.checkpoint()  # a second send_all now would be BusyResourceError

    to_agent.send_all_hook = slow_send_all_hook
    channel = AgentChannel(to_agent, trio.testing.MemoryReceiveStream())
    payloads = {n: bytes([n]) * (1000 * n) for n in range(1, 20)}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for n, payload in payloads.items():
                nursery.start_soon(channel.send_stdin, n, payload)
    frames = parse_sent(bytes(written))
    assert {f.channel: f.payload for f in frames} == payloads


async def test_cancelled_send_breaks_the_send_side() -> None:
    send_stream, receive_stream = trio.testing.lockstep_stream_pair()
    channel = AgentChannel(send_stream, trio.testing.MemoryReceiveStream())
    with trio.move_on_after(0.05):
        await channel.send_stdin(1, b"never read")
    with trio.fail_after(TIMEOUT), pytest.raises(trio.BrokenResourceError):
        await channel.send_ping()
    await receive_stream.aclose()
    await channel.aclose()


async def test_aclose_closes_both_streams() -> None:
    channel, to_agent, from_agent = make_channel()
    closed: list[str] = []
    to_agent.close_hook = lambda: closed.append("send")
    from_agent.close_hook = lambda: closed.append("receive")
    with trio.fail_after(TIMEOUT):
        async with channel:
            pass
    assert closed == ["send", "receive"]
