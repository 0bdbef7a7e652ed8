"""A minimal QMP (QEMU Machine Protocol) client over a Unix socket, enough for a checkpoint.

The socket lives in the VM's directory under the data directory, which can be deeper than the
108 bytes ``sun_path`` holds; QEMU creates it by a path relative to its working directory and we
connect through ``/proc/self/fd/<fd of that directory>/qmp.sock``, which is always short.
"""

from __future__ import annotations

import array
import json
import os
import socket
from pathlib import Path
from typing import Any

import trio

MAX_REPLY = 1 << 20  # QMP replies here are a few hundred bytes; refuse anything absurd.


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buf = b""

    @classmethod
    async def connect(cls, directory: Path, name: str = "qmp.sock") -> Qmp:
        dir_fd = os.open(directory, os.O_PATH | os.O_CLOEXEC)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(f"/proc/self/fd/{dir_fd}/{name}")
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(dir_fd)
        qmp = cls(sock)
        try:
            greeting = await qmp._message()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting!r:.200}")
            await qmp.execute("qmp_capabilities")
        except BaseException:
            sock.close()
            raise
        return qmp

    def close(self) -> None:
        self._sock.close()

    async def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_REPLY:
                raise QmpError("QMP reply too long")
            chunk = await self._sock.recv(65536)
            if not chunk:
                raise QmpError("QEMU closed the QMP socket")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError(f"unexpected QMP message {message!r:.200}")
        return message

    async def execute(self, command: str, fd: int | None = None, **arguments: Any) -> Any:
        """Run one command and return its ``return`` value; events in between are skipped."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        if fd is None:
            await self._sock.send(data)
        else:
            rights = array.array("i", [fd]).tobytes()
            await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        while True:
            message = await self._message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"]
                raise QmpError(f"{command}: {error.get('desc', error)}")
