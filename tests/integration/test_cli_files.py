"""``sandstorm cp`` and ``sandstorm files``, run as real subprocesses against a real gateway."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from sandstorm.sdk import AsyncClient
from tests.file_trees import BLOB, make_tree, sandbox, tree_of
from tests.harness import RunningGateway
from tests.integration.test_cli import UNKNOWN_SANDBOX, cli


async def test_cp_copies_a_directory_both_ways(gw: RunningGateway, tmp_path: Path) -> None:
    # Not tmp_path / "data": the gateway's own data directory is there.
    local = tmp_path / "local" / "data"
    make_tree(local)
    sid = await sandbox(gw)
    with trio.fail_after(120):
        # To a path that does not exist: the directory becomes that path.
        up = await cli(gw, "cp", str(local), f"{sid}:/workspace/data")
        assert (up.returncode, up.stdout, up.stderr) == (0, b"", b""), up.stderr.decode()
        # To an existing directory: it lands inside, under its own name.
        into = await cli(gw, "cp", str(local), f"{sid}:/workspace/data")
        assert into.returncode == 0, into.stderr
        async with AsyncClient(gw.url) as client:
            files = client.files(sid)
            names = {e.name for e in await files.list("/workspace/data")}
            assert names == {"data", "readme.txt", "run.sh", "link", "sub"}
            assert await files.read("/workspace/data/sub/blob.bin") == BLOB
            assert await files.read("/workspace/data/data/sub/blob.bin") == BLOB

        down = await cli(gw, "cp", f"{sid}:/workspace/data/data", str(tmp_path / "back"))
        assert down.returncode == 0, down.stderr
        assert tree_of(tmp_path / "back") == tree_of(local)
        # To an existing local directory: inside it, under the remote name.
        (tmp_path / "existing").mkdir()
        inside = await cli(gw, "cp", f"{sid}:/workspace/data/sub", str(tmp_path / "existing"))
        assert inside.returncode == 0, inside.stderr
        assert (tmp_path / "existing" / "sub" / "blob.bin").read_bytes() == BLOB
        # SRC/. copies only the contents.
        contents = await cli(gw, "cp", f"{sid}:/workspace/data/sub/.", str(tmp_path / "existing"))
        assert contents.returncode == 0, contents.stderr
        assert (tmp_path / "existing" / "blob.bin").read_bytes() == BLOB


async def test_cp_copies_single_files_and_pipes(gw: RunningGateway, tmp_path: Path) -> None:
    sid = await sandbox(gw)
    local = tmp_path / "tool.sh"
    local.write_text("#!/bin/sh\necho hi\n")
    local.chmod(0o750)
    with trio.fail_after(120):
        up = await cli(gw, "cp", str(local), f"{sid}:/workspace/bin/tool.sh")
        assert up.returncode == 0, up.stderr
        stat = json.loads((await cli(gw, "files", "stat", f"{sid}:/workspace/bin/tool.sh")).stdout)
        assert (stat["type"], stat["mode"], stat["size"]) == ("file", "0750", local.stat().st_size)

        into_dir = await cli(gw, "cp", str(local), f"{sid}:/workspace/bin")
        assert into_dir.returncode == 0, into_dir.stderr  # lands as /workspace/bin/tool.sh again
        piped_in = await cli(gw, "cp", "-", f"{sid}:/workspace/bin/blob.bin", stdin=BLOB)
        assert piped_in.returncode == 0, piped_in.stderr
        piped_out = await cli(gw, "cp", f"{sid}:/workspace/bin/blob.bin", "-")
        assert (piped_out.returncode, piped_out.stdout) == (0, BLOB), piped_out.stderr

        # A destination ending in / is a directory, made when missing.
        into_new = await cli(gw, "cp", str(local), f"{sid}:/workspace/new/")
        assert into_new.returncode == 0, into_new.stderr
        down = await cli(gw, "cp", f"{sid}:/workspace/new/tool.sh", f"{tmp_path / 'out'}/")
        assert down.returncode == 0, down.stderr
        copied = tmp_path / "out" / "tool.sh"
        assert copied.read_bytes() == local.read_bytes()
        assert copied.stat().st_mode & 0o777 == 0o750
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["tool.sh"]


async def test_files_commands(gw: RunningGateway) -> None:
    sid = await sandbox(gw)
    with trio.fail_after(120):
        made = await cli(gw, "files", "mkdir", "-p", f"{sid}:/workspace/x/y", f"{sid}:/workspace/z")
        assert made.returncode == 0, made.stderr
        await cli(gw, "cp", "-", f"{sid}:/workspace/x/y/f.txt", stdin=b"12345")

        listed = await cli(gw, "files", "ls", f"{sid}:/workspace/x", "--depth", "2")
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.decode().splitlines()
        assert header.split() == ["MODE", "SIZE", "MODIFIED", "NAME"]
        by_name = {row.split()[-1]: row.split() for row in rows}
        assert set(by_name) == {"y/", "y/f.txt"}
        assert by_name["y/"][0].startswith("d")
        assert by_name["y/f.txt"][0].startswith("-") and by_name["y/f.txt"][1] == "5"

        as_json = json.loads((await cli(gw, "files", "ls", f"{sid}:/workspace", "--json")).stdout)
        assert as_json["path"] == "/workspace" and as_json["truncated"] is False
        assert {"x", "z"} <= {e["name"] for e in as_json["entries"]}

        moved = await cli(gw, "files", "mv", f"{sid}:/workspace/x/y/f.txt", "/workspace/z/g.txt")
        assert moved.returncode == 0, moved.stderr
        not_empty = await cli(gw, "files", "rm", f"{sid}:/workspace/z")
        assert not_empty.returncode == 2 and not_empty.stderr.startswith(b"sandstorm: ")
        removed = await cli(gw, "files", "rm", "-r", f"{sid}:/workspace/x", f"{sid}:/workspace/z")
        assert removed.returncode == 0, removed.stderr
        left = json.loads((await cli(gw, "files", "ls", f"{sid}:/workspace", "--json")).stdout)
        assert not {"x", "z"} & {e["name"] for e in left["entries"]}


async def test_cp_and_files_refuse_cleanly(gw: RunningGateway, tmp_path: Path) -> None:
    sid = await sandbox(gw)
    with trio.fail_after(60):
        both_local = await cli(gw, "cp", str(tmp_path), str(tmp_path / "x"))
        assert both_local.returncode == 2
        assert b"one side of cp must be a sandbox path" in both_local.stderr
        relative = await cli(gw, "cp", str(tmp_path), f"{sid}:workspace")
        assert relative.returncode == 2 and b"must be absolute" in relative.stderr
        missing = await cli(gw, "cp", f"{sid}:/workspace/none", str(tmp_path / "x"))
        assert missing.returncode == 2 and missing.stderr.startswith(b"sandstorm: ")
        assert not (tmp_path / "x").exists()
        no_local = await cli(gw, "cp", str(tmp_path / "none"), f"{sid}:/workspace/x")
        assert no_local.returncode == 2 and b"no such file or directory" in no_local.stderr
        unknown = await cli(gw, "files", "ls", f"{UNKNOWN_SANDBOX}:/workspace")
        assert unknown.returncode == 2
        assert unknown.stderr == f"sandstorm: sandbox {UNKNOWN_SANDBOX!r} not found\n".encode()
