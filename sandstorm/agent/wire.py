"""The agent protocol's wire format (see ``protocol/agent.md``): the frame header, the frame
kinds and which way each travels, the size limits, and the JSON payloads, decoded into checked
structs (from the agent) or encoded (to it).

The agent is untrusted: every payload it sends is decoded against its schema, and anything
malformed raises :class:`AgentProtocolError`; the caller fails that one sandbox and nothing else.
"""

from __future__ import annotations

import base64
import enum
import struct
from dataclasses import dataclass
from typing import Annotated, Final, TypeVar

import msgspec

__all__ = [
    "AGENT_TO_GATEWAY",
    "GATEWAY_TO_AGENT",
    "HEADER",
    "MAX_AGENT_FRAME",
    "MAX_CHANNEL",
    "MAX_GATEWAY_FRAME",
    "MAX_PING_PAYLOAD",
    "MAX_STDIN_BUFFER",
    "NEEDS_CHANNEL",
    "PROTOCOL_VERSION",
    "WRITE_FILE_CHUNK",
    "AgentProtocolError",
    "ErrorInfo",
    "ExitInfo",
    "FileWritten",
    "Frame",
    "FrameKind",
    "Hello",
    "Started",
    "decode_error",
    "decode_exit",
    "decode_file_written",
    "decode_hello",
    "decode_started",
    "encode_exec",
    "encode_signal",
    "encode_write_file",
]

PROTOCOL_VERSION: Final = 1
#: Every frame starts with this header: kind (u8), channel (u32), payload length (u32).
HEADER: Final = struct.Struct("!BII")
#: Largest payload accepted from the agent. It sends output in chunks of at most 64 KiB and
#: small JSON control messages, so anything bigger is nonsense.
MAX_AGENT_FRAME: Final = 256 * 1024
#: Largest payload the agent accepts from the gateway.
MAX_GATEWAY_FRAME: Final = 1024 * 1024
#: Largest PING payload the agent echoes.
MAX_PING_PAYLOAD: Final = 64
#: Stdin the agent buffers per exec before it answers ``stdin buffer full`` and drops the rest.
MAX_STDIN_BUFFER: Final = 16 * 1024 * 1024
MAX_CHANNEL: Final = 2**32 - 1
#: File data per WRITE_FILE frame that always fits MAX_GATEWAY_FRAME once base64-encoded.
WRITE_FILE_CHUNK: Final = 512 * 1024


class FrameKind(enum.IntEnum):
    HELLO = 1
    EXEC = 2
    STARTED = 3
    STDOUT = 4
    STDERR = 5
    STDIN = 6
    STDIN_CLOSE = 7
    SIGNAL = 8
    EXIT = 9
    PING = 10
    PONG = 11
    ERROR = 12
    WRITE_FILE = 13
    FILE_WRITTEN = 14
    QUIESCE = 15
    FS = 16
    FS_REPLY = 17
    FS_DATA = 18
    FS_END = 19
    FS_CREDIT = 20
    FS_EVENT = 21


AGENT_TO_GATEWAY: Final = frozenset(
    {
        FrameKind.HELLO,
        FrameKind.STARTED,
        FrameKind.STDOUT,
        FrameKind.STDERR,
        FrameKind.EXIT,
        FrameKind.PONG,
        FrameKind.ERROR,
        FrameKind.FILE_WRITTEN,
        FrameKind.FS_REPLY,
        FrameKind.FS_DATA,
        FrameKind.FS_END,
        FrameKind.FS_EVENT,
    }
)
GATEWAY_TO_AGENT: Final = frozenset(
    {
        FrameKind.EXEC,
        FrameKind.STDIN,
        FrameKind.STDIN_CLOSE,
        FrameKind.SIGNAL,
        FrameKind.PING,
        FrameKind.WRITE_FILE,
        FrameKind.QUIESCE,
        FrameKind.FS,
        FrameKind.FS_DATA,
        FrameKind.FS_END,
        FrameKind.FS_CREDIT,
    }
)
#: Kinds that belong to an exec or request and therefore never use channel 0.
NEEDS_CHANNEL: Final = frozenset(
    {
        FrameKind.STARTED,
        FrameKind.STDOUT,
        FrameKind.STDERR,
        FrameKind.EXIT,
        FrameKind.FILE_WRITTEN,
        FrameKind.EXEC,
        FrameKind.STDIN,
        FrameKind.STDIN_CLOSE,
        FrameKind.SIGNAL,
        FrameKind.WRITE_FILE,
        FrameKind.FS,
        FrameKind.FS_REPLY,
        FrameKind.FS_DATA,
        FrameKind.FS_END,
        FrameKind.FS_CREDIT,
        FrameKind.FS_EVENT,
    }
)


class AgentProtocolError(Exception):
    """The agent sent something that breaks the protocol; the message says exactly what."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    channel: int
    payload: bytes


NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class Hello(msgspec.Struct, frozen=True, kw_only=True):
    protocol: int
    pid: Annotated[int, msgspec.Meta(ge=1)]
    #: The agent's implementation ("c"); informational, so absent is accepted.
    agent: str = ""


class Started(msgspec.Struct, frozen=True, kw_only=True):
    pid: Annotated[int, msgspec.Meta(ge=1)]


class ExitInfo(msgspec.Struct, frozen=True, kw_only=True):
    """How an exec ended: exactly one of ``exit_code`` and ``signal`` is set."""

    exit_code: Annotated[int, msgspec.Meta(ge=0, le=255)] | None
    signal: Annotated[int, msgspec.Meta(ge=1, le=64)] | None
    cpu_time_ms: NonNegFloat = 0.0
    max_rss_bytes: NonNegInt = 0
    duration_ms: NonNegFloat = 0.0
    #: The process died of SIGKILL while the kernel counted an OOM kill (the agent's
    #: ``oom_killed``); an additive field, so absent means false.
    oom_killed: bool = False


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    message: str


class FileWritten(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    error: str | None = None


# Requests (gateway → agent); encoded only.
class _ExecRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    argv: list[str]
    env: dict[str, str]
    cwd: str
    last: bool = False
    background: bool = False


class _SignalRequest(msgspec.Struct, frozen=True, kw_only=True):
    signal: int


class _WriteFileRequest(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    data_b64: str
    mode: int
    append: bool = False


_encoder: Final = msgspec.json.Encoder()
_hello_decoder: Final = msgspec.json.Decoder(Hello)
_started_decoder: Final = msgspec.json.Decoder(Started)
_exit_decoder: Final = msgspec.json.Decoder(ExitInfo)
_error_decoder: Final = msgspec.json.Decoder(ErrorInfo)
_file_written_decoder: Final = msgspec.json.Decoder(FileWritten)


_T = TypeVar("_T")


def _decode(decoder: msgspec.json.Decoder[_T], what: str, payload: bytes) -> _T:
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise AgentProtocolError(f"malformed {what} payload: {exc}") from None


def decode_hello(payload: bytes) -> Hello:
    """Decode a HELLO payload; the protocol version must be :data:`PROTOCOL_VERSION`."""
    hello = _decode(_hello_decoder, "HELLO", payload)
    if hello.protocol != PROTOCOL_VERSION:
        raise AgentProtocolError(
            f"agent speaks protocol {hello.protocol}, gateway speaks {PROTOCOL_VERSION}"
        )
    return hello


def decode_started(payload: bytes) -> Started:
    return _decode(_started_decoder, "STARTED", payload)


def decode_exit(payload: bytes) -> ExitInfo:
    info = _decode(_exit_decoder, "EXIT", payload)
    if (info.exit_code is None) == (info.signal is None):
        raise AgentProtocolError(
            "malformed EXIT payload: exactly one of exit_code and signal must be set, "
            f"got exit_code={info.exit_code!r} signal={info.signal!r}"
        )
    return info


def decode_error(payload: bytes) -> ErrorInfo:
    return _decode(_error_decoder, "ERROR", payload)


def decode_file_written(payload: bytes) -> FileWritten:
    return _decode(_file_written_decoder, "FILE_WRITTEN", payload)


def encode_exec(
    argv: list[str], env: dict[str, str], cwd: str, *, last: bool = False, background: bool = False
) -> bytes:
    """An EXEC payload (``last`` and ``background`` are left out when false)."""
    request = _ExecRequest(
        argv=list(argv), env=dict(env), cwd=cwd, last=last, background=background
    )
    return _encoder.encode(request)


def encode_signal(signum: int) -> bytes:
    return _encoder.encode(_SignalRequest(signal=signum))


def encode_write_file(path: str, data: bytes, mode: int, *, append: bool = False) -> bytes:
    data_b64 = base64.b64encode(data).decode("ascii")
    request = _WriteFileRequest(path=path, data_b64=data_b64, mode=mode, append=append)
    return _encoder.encode(request)
