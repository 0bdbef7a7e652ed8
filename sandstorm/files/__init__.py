"""Files in a running sandbox, above the agent's file requests: paths as callers name them,
and tar archives of a file or a directory, both ways (SPEC §8)."""

from .archive import extract_archive, open_archive
from .paths import MAX_PATH_BYTES, sandbox_path

__all__ = ["MAX_PATH_BYTES", "extract_archive", "open_archive", "sandbox_path"]
