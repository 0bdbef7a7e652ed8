"""The in-sandbox agent and the gateway side of its protocol.

``src/`` is the agent: PID 1 of every sandbox, C compiled once per source hash and linked
statically (``build.py``) into ``guest/bin/``; ``guest/zygote.py`` is the python zygote it
starts. The runtime mounts ``guest/`` alone, read-only, at ``/.sandstorm``, so the agent is
``/.sandstorm/bin/sandstorm-agent-<hash>`` and the zygote ``/.sandstorm/zygote.py``, and nothing
else of the gateway is visible in a sandbox. The rest is the gateway side of the protocol
(``protocol/agent.md``): ``wire`` (frames, limits, payloads) and ``channel`` (one connection).
"""

from pathlib import Path

from .build import AGENT_GUEST_DIR, AGENT_PREFIX, AgentBuildError, ensure_agent_binary
from .channel import AgentChannel, AgentChannelStatistics
from .wire import (
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

#: The directory mounted at ``/.sandstorm`` in the sandbox (the agent's binaries and the zygote).
AGENT_DIRECTORY: Path = AGENT_GUEST_DIR
#: Where :data:`AGENT_DIRECTORY` is mounted inside the sandbox.
AGENT_MOUNT_POINT = "/.sandstorm"
#: What every agent's command line starts with, whichever source built it (finds it in ``/proc``).
AGENT_COMMAND_PREFIX = f"{AGENT_MOUNT_POINT}/bin/{AGENT_PREFIX}"


def agent_command() -> tuple[str, ...]:
    """The agent's command line inside the sandbox (its binary is built first if missing)."""
    return (f"{AGENT_MOUNT_POINT}/bin/{ensure_agent_binary().name}",)


def prepare_agent() -> None:
    """Compile the agent once for every sandbox this gateway starts; raises
    ``AgentBuildError``."""
    ensure_agent_binary()


def agent_files() -> list[tuple[str, bytes | None, int]]:
    """The agent's directory for a VM's initramfs: (relative name, contents or None for a
    directory, mode), parents first."""
    binary = ensure_agent_binary()
    zygote = AGENT_DIRECTORY / "zygote.py"
    return [
        ("bin", None, 0o755),
        (f"bin/{binary.name}", binary.read_bytes(), 0o755),
        ("zygote.py", zygote.read_bytes(), 0o644),
    ]


__all__ = [
    "AGENT_COMMAND_PREFIX",
    "AGENT_DIRECTORY",
    "AGENT_MOUNT_POINT",
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
    "AgentBuildError",
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
    "agent_command",
    "agent_files",
    "decode_error",
    "decode_exit",
    "decode_file_written",
    "decode_hello",
    "decode_started",
    "prepare_agent",
]
