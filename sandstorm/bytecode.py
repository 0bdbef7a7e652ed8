"""Scripts that start with every sandbox run from bytecode compiled once, not from source.

Python compiles a script run by path (``python3 agent.py``) at every start and never caches
it: for the agent that is ~17 ms of CPU at every sandbox start on this machine (far more in a
TCG guest), and ~6 ms for the shim. Imported as a module instead, a script is read from its
``__pycache__`` entry. The gateway writes that entry at start-up in *checked-hash* form: the
interpreter that imports it hashes the source (microseconds) and uses the bytecode only when
it matches, so a stale, missing or foreign (another Python version) entry costs the compile
and nothing else. mtimes play no part, so the same entry serves a bind mount, a VM's
initramfs and the host alike.
"""

from __future__ import annotations

import importlib.util
import logging
import py_compile
from pathlib import Path

log = logging.getLogger(__name__)

# The pyc header's flags word: hash-based (bit 0) and checked against the source (bit 1).
_CHECKED_HASH_FLAGS = 0b11


def launcher(entry: str) -> str:
    """The ``python3 -c`` text that imports the script named by ``sys.argv[1]`` as a module
    and exits with what its ``entry`` returns; ``entry`` is the call, with the script's module
    as ``m`` and ``sys.argv`` as ``a`` (e.g. ``"m.main(a[2:])"``).

    The script's directory goes at the end of ``sys.path``: nothing beside the script can
    shadow a standard-library module the script imports.
    """
    return (
        "import sys;a=sys.argv;d,_,f=a[1].rpartition('/');sys.path.append(d);"
        f"m=__import__(f[:-3]);sys.exit({entry})"
    )


def cached_bytecode(source: Path) -> Path:
    """Where the import system looks for ``source``'s bytecode (this interpreter's tag)."""
    return Path(importlib.util.cache_from_source(str(source)))


def bytecode_is_current(source: Path) -> bool:
    try:
        data = source.read_bytes()
        with open(cached_bytecode(source), "rb") as f:
            header = f.read(16)
    except OSError:
        return False
    return (
        header[:4] == importlib.util.MAGIC_NUMBER
        and int.from_bytes(header[4:8], "little") == _CHECKED_HASH_FLAGS
        and header[8:16] == importlib.util.source_hash(data)
    )


def ensure_bytecode(source: Path) -> bool:
    """Write ``source``'s checked-hash bytecode unless it is already current. A directory the
    gateway cannot write (a read-only install) only costs the compile at every start: logged,
    never fatal."""
    if bytecode_is_current(source):
        return True
    try:
        py_compile.compile(
            str(source),
            cfile=str(cached_bytecode(source)),
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
        )
    except (OSError, py_compile.PyCompileError) as exc:
        log.warning("cannot cache the bytecode of %s (it compiles at every start): %s", source, exc)
        return False
    return True
