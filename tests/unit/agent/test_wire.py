"""The gateway side of the agent protocol's wire format (``wire.py``): the header, the frame
kinds and their directions, payload decoding, and the agent's sources built with the same
numbers."""

from __future__ import annotations

import re
import struct

import pytest

from sandstorm.actors.planning import BASE_ENV
from sandstorm.agent import (
    AGENT_TO_GATEWAY,
    GATEWAY_TO_AGENT,
    HEADER,
    MAX_AGENT_FRAME,
    MAX_GATEWAY_FRAME,
    MAX_PING_PAYLOAD,
    MAX_STDIN_BUFFER,
    PROTOCOL_VERSION,
    AgentProtocolError,
    FrameKind,
    Hello,
    decode_error,
    decode_exit,
    decode_file_written,
    decode_hello,
    decode_started,
)
from sandstorm.agent.build import agent_sources
from tests.harness import c_number_defines


def frame(kind: int, channel: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, channel, len(payload)) + payload


def test_header_layout() -> None:
    assert HEADER.size == 9
    assert frame(FrameKind.EXIT, 7, b"xy") == b"\x09\x00\x00\x00\x07\x00\x00\x00\x02xy"
    assert HEADER.format == "!BII"


def test_kind_numbers_and_directions() -> None:
    assert [(k.name, k.value) for k in FrameKind] == [
        ("HELLO", 1),
        ("EXEC", 2),
        ("STARTED", 3),
        ("STDOUT", 4),
        ("STDERR", 5),
        ("STDIN", 6),
        ("STDIN_CLOSE", 7),
        ("SIGNAL", 8),
        ("EXIT", 9),
        ("PING", 10),
        ("PONG", 11),
        ("ERROR", 12),
        ("WRITE_FILE", 13),
        ("FILE_WRITTEN", 14),
        ("QUIESCE", 15),
        ("FS", 16),
        ("FS_REPLY", 17),
        ("FS_DATA", 18),
        ("FS_END", 19),
        ("FS_CREDIT", 20),
        ("FS_EVENT", 21),
    ]
    assert set(FrameKind) == AGENT_TO_GATEWAY | GATEWAY_TO_AGENT
    # File data and the end of a transfer travel both ways; nothing else does.
    assert {FrameKind.FS_DATA, FrameKind.FS_END} == AGENT_TO_GATEWAY & GATEWAY_TO_AGENT


def test_decode_exit() -> None:
    info = decode_exit(
        b'{"exit_code":0,"signal":null,"cpu_time_ms":1.5,"max_rss_bytes":4096,"duration_ms":3}'
    )
    assert (info.exit_code, info.signal, info.cpu_time_ms, info.max_rss_bytes) == (
        0,
        None,
        1.5,
        4096,
    )
    assert info.duration_ms == 3.0
    killed = decode_exit(
        b'{"exit_code":null,"signal":9,"cpu_time_ms":0,"max_rss_bytes":0,"duration_ms":0}'
    )
    assert (killed.exit_code, killed.signal) == (None, 9)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"exit_code":256,"signal":null}',
        b'{"exit_code":-1,"signal":null}',
        b'{"exit_code":null,"signal":0}',
        b'{"exit_code":null,"signal":65}',
        b'{"exit_code":null,"signal":null}',
        b'{"exit_code":1,"signal":9}',
        b'{"exit_code":1,"signal":null,"cpu_time_ms":-1}',
        b'{"exit_code":1,"signal":null,"max_rss_bytes":-1}',
        b'{"exit_code":1,"signal":null,"duration_ms":-0.5}',
        b'{"exit_code":true,"signal":null}',
        b'{"exit_code":"1","signal":null}',
        b'{"signal":null}',
        b"[]",
        b"",
        b"\xff",
    ],
)
def test_decode_exit_rejects(payload: bytes) -> None:
    with pytest.raises(AgentProtocolError, match="malformed EXIT payload"):
        decode_exit(payload)


def test_decode_others() -> None:
    assert decode_started(b'{"pid":42}').pid == 42
    assert decode_error(b'{"message":"boom"}').message == "boom"
    written = decode_file_written(b'{"ok":false,"error":"EACCES"}')
    assert (written.ok, written.error) == (False, "EACCES")
    assert decode_file_written(b'{"ok":true,"error":null}').ok
    # Unknown fields are ignored: new fields are added with defaults (versioning rule).
    assert decode_started(b'{"pid":42,"future":1}').pid == 42
    assert decode_hello(b'{"protocol":1,"pid":1,"python":"3.9.2"}') == Hello(protocol=1, pid=1)
    assert decode_hello(b'{"protocol":1,"pid":1,"agent":"c"}').agent == "c"
    for decode, payload in [
        (decode_started, b'{"pid":0}'),
        (decode_started, b'{"pid":"1"}'),
        (decode_error, b'{"message":1}'),
        (decode_error, b"{}"),
        (decode_file_written, b'{"ok":"yes"}'),
    ]:
        with pytest.raises(AgentProtocolError, match="malformed"):
            decode(payload)


# -- the agent source itself -------------------------------------------------------------------


def test_the_agent_is_built_with_the_protocols_numbers() -> None:
    """The agent's sources and the client (which the gateway and protocol/agent.md use) state
    every number of the protocol once each: they must agree."""
    source = "\n".join(path.read_text() for path in agent_sources())
    defines = c_number_defines(source)
    for kind in FrameKind:
        assert defines[kind.name] == kind.value, kind
    assert defines["PROTOCOL_VERSION"] == PROTOCOL_VERSION
    assert defines["HEADER_SIZE"] == HEADER.size == struct.calcsize("!BII")
    assert defines["MAX_GATEWAY_FRAME"] == MAX_GATEWAY_FRAME
    assert defines["MAX_PING_PAYLOAD"] == MAX_PING_PAYLOAD
    assert defines["MAX_STDIN_PENDING"] == MAX_STDIN_BUFFER
    assert defines["READ_CHUNK"] <= MAX_AGENT_FRAME  # an output chunk is one frame
    # The zygote serves execs started with the router's environment (and no other start-up one).
    zygote_env = re.search(r"ZYGOTE_ENV\[\] = \{(.*?)\};", source, re.S)
    assert zygote_env is not None
    items = re.findall(r'"([^"]*)"(?: DEFAULT_PATH)?', zygote_env.group(1))
    assert items[0] == "PATH="
    assert {k: v for k, _, v in (i.partition("=") for i in items[1:])} | {
        "PATH": BASE_ENV["PATH"]
    } == {k: v for k, v in BASE_ENV.items() if k != "USER"}
    default_path = re.search(r'^#define DEFAULT_PATH "([^"]+)"', source, re.M)
    assert default_path is not None and default_path.group(1) == BASE_ENV["PATH"]
