"""The OCI runtime spec every container runtime here starts from (gVisor reads it as is, Kata's
driver adds what a runtime on a real kernel needs): the agent as PID 1 on the container's stdio,
as the unprivileged sandbox user with no capabilities, the agent's directory mounted read-only."""

from __future__ import annotations

from sandstorm.agent import AGENT_DIRECTORY, AGENT_MOUNT_POINT, agent_command
from sandstorm.runtimes.base import AGENT_ENV, SandboxSpec

SANDBOX_UID = 1000


#: Pending signals a sandbox's user may have per process it may have (RLIMIT_SIGPENDING).
SIGNALS_PER_PROCESS = 64


def oci_config(spec: SandboxSpec, cgroups_path: str) -> dict[str, object]:
    """The OCI runtime spec for one sandbox (``config.json`` of its bundle)."""
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": AGENT_MOUNT_POINT,
            "type": "bind",
            "source": str(AGENT_DIRECTORY),
            "options": ["rbind", "ro", "nosuid", "nodev"],
        },
    ]
    for m in spec.mounts:
        mounts.append(
            {
                "destination": m.destination,
                "type": "bind",
                "source": str(m.source),
                "options": ["rbind", "ro" if m.read_only else "rw", "nosuid", "nodev"],
            }
        )
    no_caps: list[str] = []
    sigpending = spec.pids_limit * SIGNALS_PER_PROCESS
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID, "additionalGids": []},
            "args": list(agent_command()),
            "env": list(AGENT_ENV),
            "cwd": "/workspace",
            "noNewPrivileges": True,
            "capabilities": {
                k: no_caps for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
            },
            # The process limit is enforced inside gVisor (a fork bomb gets EAGAIN there); the
            # host cgroup's pids.max only guards the sentry's own threads. gVisor drops any
            # signal past RLIMIT_SIGPENDING (0 unless set), a child's SIGCHLD included.
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096},
                {"type": "RLIMIT_NPROC", "hard": spec.pids_limit, "soft": spec.pids_limit},
                {"type": "RLIMIT_SIGPENDING", "hard": sigpending, "soft": sigpending},
            ],
        },
        # Writable, but under gVisor every write lands in the memory overlay
        # (--overlay2=root:memory): the shared image directory on the host is never written.
        "root": {"path": str(spec.rootfs), "readonly": False},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            # Limits are set on the gateway-owned parent group (see cgroups.py), not here.
            "cgroupsPath": cgroups_path,
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
        },
    }
