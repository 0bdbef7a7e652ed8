"""The in-sandbox agent and the gateway side of its protocol.

``agent.py`` is standard library only and runs inside the sandbox; the runtime bind-mounts this
directory read-only at ``/.sandstorm`` so it appears as ``/.sandstorm/agent.py``, with the
bytecode the gateway compiled once (see ``sandstorm.bytecode``). Everything else here is the
gateway side (see ``protocol/agent.md``).
"""

from pathlib import Path

from sandstorm.bytecode import cached_bytecode, ensure_bytecode, launcher

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
#: The agent's command line inside the sandbox: agent.py imported as a module, so that it
#: starts from its cached bytecode; its path stays the last word (what finds it in ``/proc``).
AGENT_COMMAND: tuple[str, ...] = (
    "/usr/bin/python3", "-I", "-S", "-c", launcher("m.main()"), "/.sandstorm/agent.py",
)  # fmt: skip


def prepare_agent_bytecode() -> None:
    """Compile agent.py once for every sandbox this gateway starts (it runs in the image's
    python3: Debian 12's 3.11, as on the host; another version compiles the source itself)."""
    ensure_bytecode(AGENT_SOURCE_PATH)


def agent_files() -> list[tuple[str, bytes | None]]:
    """The agent's directory for a VM's initramfs: (relative name, contents, None for a
    directory), parents first."""
    files: list[tuple[str, bytes | None]] = []
    for source in sorted(AGENT_SOURCE_PATH.parent.glob("*.py")):
        files.append((source.name, source.read_bytes()))
    compiled = cached_bytecode(AGENT_SOURCE_PATH)
    if compiled.exists():
        files.append((compiled.parent.name, None))
        files.append((f"{compiled.parent.name}/{compiled.name}", compiled.read_bytes()))
    return files


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
    "agent_files",
    "decode_error",
    "decode_exit",
    "decode_file_written",
    "decode_hello",
    "decode_started",
    "prepare_agent_bytecode",
]
