"""The agent binary: the C files of ``src/`` compiled with the host's gcc, once per hash of
every source, the header and the flags (see ``sandstorm.native``), and linked statically: it
runs inside sandboxes and VMs whose images have their own C library, or none.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Final

from sandstorm.native import NativeBuildError, binary_path, compile_once

AGENT_SOURCE_DIR: Final = Path(__file__).resolve().with_name("src")
#: The directory mounted into every sandbox: only the agent's binaries (``bin/``) and the zygote.
AGENT_GUEST_DIR: Final = AGENT_SOURCE_DIR.parent / "guest"
AGENT_BIN_DIR: Final = AGENT_GUEST_DIR / "bin"
AGENT_PREFIX: Final = "sandstorm-agent-"
# libc.a is in libc6-dev, which gcc's install brings.
AGENT_FLAGS: Final = ("-static",)

_lock = threading.Lock()
_built: Path | None = None


class AgentBuildError(NativeBuildError):
    """The agent cannot be compiled here; the message says what to install or fix."""


def agent_sources() -> tuple[Path, ...]:
    """The agent's C files, then its header, in a fixed order: what its binary is named by."""
    return (*sorted(AGENT_SOURCE_DIR.glob("*.c")), *sorted(AGENT_SOURCE_DIR.glob("*.h")))


def agent_binary_path() -> Path:
    """Where the current sources' binary is (built or not)."""
    return binary_path(agent_sources(), AGENT_BIN_DIR, AGENT_PREFIX, AGENT_FLAGS)


def ensure_agent_binary() -> Path:
    """The current agent binary, compiled first if it is missing. Blocking (one gcc run per
    source hash); raises ``AgentBuildError``."""
    global _built
    if _built is not None:
        return _built
    with _lock:
        _built = compile_once(
            agent_sources(), AGENT_BIN_DIR, AGENT_PREFIX, what="agent", error=AgentBuildError,
            extra_flags=AGENT_FLAGS,
        )  # fmt: skip
        return _built
