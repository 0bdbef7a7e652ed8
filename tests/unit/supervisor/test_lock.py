"""One gateway per data directory: the hold is refused while another process has it, names the
holder, and is released by the kernel however the holder ends (SIGKILL included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sandstorm.supervisor.lock import LOCK_NAME, DataDirInUse, hold_data_dir

HOLDER = """
import sys, time
from pathlib import Path
from sandstorm.supervisor.lock import hold_data_dir
with hold_data_dir(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_hold_is_refused_and_a_released_one_is_free(tmp_path: Path) -> None:
    with hold_data_dir(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        busy = rf"in use by another gateway \(pid {os.getpid()}\)"
        with pytest.raises(DataDirInUse, match=busy), hold_data_dir(tmp_path):
            pass  # pragma: no cover
    with hold_data_dir(tmp_path):
        pass


def test_a_killed_holder_releases_the_data_dir(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    argv = [sys.executable, "-c", HOLDER, str(tmp_path)]
    with subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            busy = rf"\(pid {holder.pid}\)"
            with pytest.raises(DataDirInUse, match=busy), hold_data_dir(tmp_path):
                pass  # pragma: no cover
            holder.send_signal(signal.SIGKILL)
            assert holder.wait(timeout=10) == -signal.SIGKILL
            with hold_data_dir(tmp_path):
                assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        finally:
            holder.kill()
            holder.wait(timeout=10)
