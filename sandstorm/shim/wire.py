"""The shim's wire format (``protocol/shim.md``): the numbers ``shim.c`` is built with.

The shim itself is C (``shim.c``, compiled once per source hash by ``build.py``); the gateway
side is ``process.py`` and ``channel.py``. A test reads ``shim.c``'s ``#define``s and compares
them with these.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!BII")
OFFSET = struct.Struct("!Q")
#: shim pid, runtime pid, first journal offset, stream start, journal end, exited, status.
ATTACHED = struct.Struct("!IIQQQBi")
# Frame kinds at or above RESERVED belong to the shim and never reach the agent.
RESERVED = 0xE0
ATTACH = 0xE0  # G→S, first frame of a connection: payload OFFSET, replay from there
ACK = 0xE1  # G→S: payload OFFSET, everything before it is durable on the gateway's side
STOP = 0xE2  # G→S: close the runtime's stdin after the frames before it (the agent exits)
KILL = 0xE3  # G→S: SIGKILL the runtime
ATTACHED_KIND = 0xF0  # S→G, the answer to ATTACH; raw journal bytes follow
MAX_FRAME = 1024 * 1024  # the agent's own limit for gateway frames (MAX_GATEWAY_FRAME)
STDIN_MAX = 16 * 1024 * 1024  # queued for the runtime's stdin before the socket is not read
READ_SIZE = 65536
PIPE_SIZE = 256 * 1024  # what the runtime's pipes are made to hold (F_SETPIPE_SZ)
SEND_SIZE = 1024 * 1024
EXIT_DRAIN_S = 5.0  # after the runtime exits, how long its stdout may stay open
LINGER_S = 10.0  # after the runtime exits, how long a connected gateway may stall delivery
ATTACH_WAIT_S = 10.0  # how long a connection may take to send ATTACH
