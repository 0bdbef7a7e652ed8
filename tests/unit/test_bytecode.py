"""Scripts started with every sandbox (agent, shim) run from bytecode compiled once."""

from __future__ import annotations

import marshal
import subprocess
import sys
from pathlib import Path

from sandstorm.agent import AGENT_COMMAND, AGENT_SOURCE_PATH, agent_files
from sandstorm.bytecode import bytecode_is_current, cached_bytecode, ensure_bytecode, launcher


def _script(tmp_path: Path, text: str) -> Path:
    script = tmp_path / "tool.py"
    script.write_text(text)
    return script


def _run(script: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-I", "-S", "-c", launcher("m.main(a[2:])"), str(script), "x", "y"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_the_launcher_runs_the_script_with_its_arguments_and_exit_status(tmp_path: Path) -> None:
    script = _script(tmp_path, "import sys\ndef main(args):\n    print(args)\n    return 3\n")
    done = _run(script)
    assert (done.returncode, done.stdout, done.stderr) == (3, "['x', 'y']\n", "")


def test_cached_bytecode_is_what_runs(tmp_path: Path) -> None:
    script = _script(tmp_path, "def main(args):\n    print('source')\n")
    assert ensure_bytecode(script)
    assert bytecode_is_current(script)
    compiled = cached_bytecode(script)
    # Put other code behind the same header: if the launcher compiled the source, it would
    # print "source"; it prints what the cache holds.
    header = compiled.read_bytes()[:16]
    other = compile("def main(args):\n    print('cached')\n", str(script), "exec")
    compiled.write_bytes(header + marshal.dumps(other))
    assert _run(script).stdout == "cached\n"


def test_stale_or_foreign_bytecode_falls_back_to_the_source(tmp_path: Path) -> None:
    script = _script(tmp_path, "def main(args):\n    print('old')\n")
    assert ensure_bytecode(script)
    script.write_text("def main(args):\n    print('new')\n")
    assert not bytecode_is_current(script)
    assert _run(script).stdout == "new\n"  # the hash no longer matches: compiled from source
    cached_bytecode(script).write_bytes(b"\x00" * 40)  # another Python's magic
    assert _run(script).stdout == "new\n"
    assert ensure_bytecode(script) and bytecode_is_current(script)


def test_an_unwritable_cache_is_not_fatal(tmp_path: Path) -> None:
    script = _script(tmp_path, "def main(args):\n    print('ok')\n")
    cached_bytecode(script).parent.write_text("a file where the directory should be")
    assert not ensure_bytecode(script)
    assert _run(script).stdout == "ok\n"


def test_the_agent_command_names_the_script_and_vms_get_its_bytecode() -> None:
    assert AGENT_COMMAND[-1] == "/.sandstorm/agent.py"
    assert ensure_bytecode(AGENT_SOURCE_PATH)
    files = dict(agent_files())
    assert files["agent.py"] == AGENT_SOURCE_PATH.read_bytes()
    compiled = cached_bytecode(AGENT_SOURCE_PATH)
    assert files[compiled.parent.name] is None  # the directory, before its file
    assert files[f"{compiled.parent.name}/{compiled.name}"] == compiled.read_bytes()
