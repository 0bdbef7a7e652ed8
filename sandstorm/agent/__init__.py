"""The in-sandbox agent and the gateway side of its protocol.

``agent.py`` is standard library only and runs inside the sandbox; the runtime bind-mounts this
directory read-only at ``/.sandstorm`` so it appears as ``/.sandstorm/agent.py``. Everything else
here is the gateway side (see ``protocol/agent.md``).
"""

from pathlib import Path

from .client import (
    AGENT_TO_GATEWAY,
    GATEWAY_TO_AGENT,
    HEADER,
    MAX_AGENT_FRAME,
    MAX_CHANNEL,
    MAX_GATEWAY_FRAME,
    MAX_PING_PAYLOAD,
    MAX_STDIN_BUFFER,
    PROTOCOL_VERSION,
    WRITE_FILE_CHUNK,
    AgentChannel,
    AgentChannelStatistics,
    AgentProtocolError,
    ErrorInfo,
    ExitInfo,
    FileWritten,
    Frame,
    FrameKind,
    Hello,
    Started,
    decode_error,
    decode_exit,
    decode_file_written,
    decode_hello,
    decode_started,
)

#: The agent script on the host; its directory is mounted at ``/.sandstorm`` in the sandbox.
AGENT_SOURCE_PATH: Path = Path(__file__).resolve().with_name("agent.py")
#: Where the directory holding :data:`AGENT_SOURCE_PATH` is mounted inside the sandbox.
AGENT_MOUNT_POINT = "/.sandstorm"
#: The agent's command line inside the sandbox.
AGENT_COMMAND: tuple[str, ...] = ("/usr/bin/python3", "-I", "-S", "/.sandstorm/agent.py")

__all__ = [
    "AGENT_COMMAND",
    "AGENT_MOUNT_POINT",
    "AGENT_SOURCE_PATH",
    "AGENT_TO_GATEWAY",
    "GATEWAY_TO_AGENT",
    "HEADER",
    "MAX_AGENT_FRAME",
    "MAX_CHANNEL",
    "MAX_GATEWAY_FRAME",
    "MAX_PING_PAYLOAD",
    "MAX_STDIN_BUFFER",
    "PROTOCOL_VERSION",
    "WRITE_FILE_CHUNK",
    "AgentChannel",
    "AgentChannelStatistics",
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
]
