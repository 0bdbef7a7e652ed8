"""The client half of the ``sandstorm`` command: run code, exec, list, remove, snapshot, resume,
and copy files in and out of a sandbox (``cp``, ``files``).

Every subcommand talks to a gateway through :mod:`sandstorm.sdk`; the gateway URL comes from
``--url`` or ``$SANDSTORM_URL`` (default http://localhost:3000), the API key from
``$SANDSTORM_API_KEY`` (never a flag: command lines are visible to every user of the host).

``run`` and ``exec`` are interactive: the program's output streams to the terminal as it is
written, the terminal's stdin is forwarded to the program (EOF closes the program's stdin), and
the command exits with the program's exit code (128 + N for a signal, 124 for a timeout, as GNU
``timeout`` does). Ctrl-C sends SIGINT to the program; a second Ctrl-C sends SIGKILL.

Exit codes of the CLI itself: 2 for a usage error (bad arguments, or a 4xx answer from the
gateway such as an unknown sandbox), 1 for any other failure (gateway unreachable, 5xx).
"""

from sandstorm.cli.client._arguments import COMMANDS, add_commands
from sandstorm.cli.client._commands import main

__all__ = ["COMMANDS", "add_commands", "main"]
