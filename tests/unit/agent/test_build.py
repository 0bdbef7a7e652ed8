"""The agent binary: its C sources compiled once per source hash, statically (it runs in images
with their own C library or none), and a gateway that cannot build it says why instead of
starting."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from sandstorm.agent import (
    AGENT_COMMAND_PREFIX,
    AGENT_DIRECTORY,
    agent_command,
    agent_files,
    build,
)
from sandstorm.cli import main as cli
from sandstorm.native import binary_path
from sandstorm.shim.build import ensure_shim_binary

PT_INTERP = 3


def _program_header_types(binary: bytes) -> list[int]:
    """The p_type of every program header of a 64-bit little-endian ELF file."""
    assert binary[:4] == b"\x7fELF" and binary[4] == 2 and binary[5] == 1
    phoff, = struct.unpack_from("<Q", binary, 0x20)  # fmt: skip
    phentsize, phnum = struct.unpack_from("<HH", binary, 0x36)
    return [struct.unpack_from("<I", binary, phoff + i * phentsize)[0] for i in range(phnum)]


def test_the_agent_is_static_and_named_by_its_source() -> None:
    binary = build.ensure_agent_binary()
    assert binary == build.agent_binary_path()
    types = _program_header_types(binary.read_bytes())
    assert types and PT_INTERP not in types  # no dynamic loader: nothing of the image's libc
    # Named by sources and flags: the same sources built another way are another binary.
    unlinked = binary_path(build.agent_sources(), build.AGENT_BIN_DIR, build.AGENT_PREFIX)
    assert unlinked.parent == binary.parent and unlinked.name != binary.name
    command = agent_command()
    assert command == (f"/.sandstorm/bin/{binary.name}",)
    assert command[0].startswith(AGENT_COMMAND_PREFIX)


def test_a_vm_gets_the_binary_executable_and_the_zygote() -> None:
    files = {name: (data, mode) for name, data, mode in agent_files()}
    binary = build.ensure_agent_binary()
    assert files["bin"] == (None, 0o755)
    assert files[f"bin/{binary.name}"] == (binary.read_bytes(), 0o755)
    assert files["zygote.py"][0] == (AGENT_DIRECTORY / "zygote.py").read_bytes()
    # The same as the directory mounted into a gVisor sandbox (built files aside): nothing else.
    assert sorted(files) == sorted(
        path.relative_to(AGENT_DIRECTORY).as_posix()
        for path in AGENT_DIRECTORY.rglob("*")
        if path.parent != build.AGENT_BIN_DIR or path == binary
    )


def test_every_source_and_the_header_name_the_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = build.agent_sources()
    names = [path.name for path in sources]
    assert "main.c" in names and names[-1] == "agent.h"
    assert all(name.endswith(".c") for name in names[:-1])
    copy = tmp_path / "src"
    shutil.copytree(build.AGENT_SOURCE_DIR, copy)
    monkeypatch.setattr(build, "AGENT_SOURCE_DIR", copy)
    named = binary_path(sources, build.AGENT_BIN_DIR, build.AGENT_PREFIX, build.AGENT_FLAGS)
    assert build.agent_binary_path() == named
    seen = {build.agent_binary_path()}
    for name in ("agent.h", "json.c", "main.c"):
        with (copy / name).open("a") as source:
            source.write("/* changed */\n")
        seen.add(build.agent_binary_path())
    (copy / "extra.c").write_text("/* a new file */\n")
    seen.add(build.agent_binary_path())
    assert len(seen) == 5  # each change, a header's included, is a new binary


def test_an_agent_that_cannot_be_built_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    broken = source_dir / "main.c"
    broken.write_text("int main(void) { return undeclared; }\n")
    monkeypatch.setattr(build, "AGENT_SOURCE_DIR", source_dir)
    monkeypatch.setattr(build, "AGENT_BIN_DIR", tmp_path / "bin")
    monkeypatch.setattr(build, "_built", None)
    with pytest.raises(build.AgentBuildError, match="undeclared"):
        build.ensure_agent_binary()
    assert list((tmp_path / "bin").iterdir()) == []  # no half-written binary
    broken.write_text("int main(void) { return 0; }\n")
    built = build.ensure_agent_binary()
    assert built.parent == tmp_path / "bin" and built.name.startswith(build.AGENT_PREFIX)
    assert os.access(built, os.X_OK)


def test_a_gateway_that_cannot_build_its_agent_says_why(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    isolated_logging: None,
) -> None:
    ensure_shim_binary()  # built while gcc is there: this is about the agent
    monkeypatch.setattr(build, "AGENT_BIN_DIR", tmp_path / "bin")
    monkeypatch.setattr(build, "_built", None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc on it
    argv = ["serve", "--port", "0", "--data-dir", str(tmp_path / "data")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "sandstorm: cannot start: cannot run gcc to build the agent" in err
    assert "apt-get install gcc libc6-dev" in err
    assert "Traceback" not in err
