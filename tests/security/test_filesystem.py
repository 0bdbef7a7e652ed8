"""SPEC §2/§5 filesystem promises against the escapes published for code-execution services:
host paths never visible unless mounted, read-only mounts really read-only, nothing carried from
one sandbox to the next, and symlinks planted by the code (Judge0 CVE-2024-28185/28189 style)
never steering a write, a snapshot or a teardown onto the host."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from sandstorm.agent import AGENT_COMMAND_PREFIX
from tests.harness import RunningGateway, never_500
from tests.hoststate import host_state, settled_state


def _fingerprint(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (not following symlinks): type, mode, size, mtime, content."""
    found: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = ""
            if os.path.islink(path):
                digest = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return found


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


async def _exec(gw: RunningGateway, sid: str, **body: Any) -> dict[str, Any]:
    response = await gw.client.post(f"/v1/sandboxes/{sid}/exec", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()["result"]
    return result


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A host directory that nothing a sandbox does may touch."""
    d = tmp_path / f"canary-{secrets.token_hex(4)}"
    d.mkdir()
    (d / "keep.txt").write_text("host canary\n")
    (d / "sub").mkdir()
    (d / "sub" / "deep.txt").write_text("deep\n")
    return d


# ------------------------------------------------------------------ visibility

PROBE_HOST = """
import os
for p in {paths!r}:
    print(p, os.path.lexists(p))
mounts = open('/proc/self/mountinfo').read()
print('mountinfo-mentions-host', any(h in mounts for h in {mentions!r}))
print('uname', os.uname().nodename)
"""


async def test_no_host_path_is_visible_unless_mounted(gw: RunningGateway, canary: Path) -> None:
    marker = canary / "keep.txt"
    data = gw.data_dir
    host_paths = [str(marker), str(canary), str(data), str(data / "runsc"),
                  str(data / "sandboxes"), os.getcwd(), "/var/lib/sandstorm/images"]  # fmt: skip
    probe = PROBE_HOST.format(paths=host_paths, mentions=[str(gw.data_dir), str(canary)])
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(code=probe, language="python")
    result = body["result"]
    assert result["verdict"] == "ok", result
    lines = result["stdout"].splitlines()
    exists = [line for line in lines if line.endswith(" True")]
    assert exists == [], exists  # the host's marker, data dir, cwd, image store: none of them
    assert "mountinfo-mentions-host False" in lines
    assert "uname sandbox" in lines
    # The sandbox's /etc is the image's, not the host's.
    inside = await _exec(gw, body["id"], command=["sha256sum", "/etc/passwd", "/etc/os-release"])
    image_etc = gw.data_dir / "images" / "default" / "rootfs" / "etc"
    expected = {
        "/etc/passwd": _file_digest(str(image_etc / "passwd")),
        "/etc/os-release": _file_digest(str(image_etc / "os-release")),
    }
    got = {line.split()[1]: line.split()[0] for line in inside["stdout"].splitlines()}
    assert got == expected, (got, expected)
    shadow = await _exec(gw, body["id"], command=["cat", "/etc/shadow"])
    assert shadow["verdict"] == "error"  # uid 1000 cannot read even the image's own shadow
    if os.path.exists("/etc/shadow"):
        host_shadow = Path("/etc/shadow").read_text()
        assert shadow["stdout"] == "" or shadow["stdout"] != host_shadow


async def test_only_the_agent_and_its_zygote_are_mounted_into_a_sandbox(
    gw: RunningGateway,
) -> None:
    """/.sandstorm holds the agent's binary (each version built here) and the python zygote:
    none of the agent's C sources, none of the gateway's own modules."""
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(command=["find", "/.sandstorm", "-mindepth", "1"])
    assert body["result"]["verdict"] == "ok", body["result"]
    entries = body["result"]["stdout"].split()
    binaries = [entry for entry in entries if entry.startswith(AGENT_COMMAND_PREFIX)]
    assert binaries and sorted(entries) == sorted(
        ["/.sandstorm/bin", "/.sandstorm/zygote.py", *binaries]
    ), entries


ATTACK_RO = """
cd /workspace/ro
echo hacked > data.txt; echo "write=$?"
echo more >> data.txt; echo "append=$?"
true > data.txt; echo "truncate=$?"
rm -f data.txt; echo "rm=$?"
mv data.txt moved.txt; echo "mv=$?"
chmod 777 data.txt; echo "chmod=$?"
touch -d 2001-01-01 data.txt; echo "touch=$?"
ln -s /etc/passwd link; echo "ln=$?"
mkdir newdir; echo "mkdir=$?"
rmdir sub; echo "rmdir=$?"
echo x > sub/inner.txt; echo "inner=$?"
python3 -c "open('/workspace/ro/data.txt', 'r+b').write(b'X')" 2>/dev/null; echo "python=$?"
python3 -c "import os; os.truncate('/workspace/ro/data.txt', 0)" 2>/dev/null; echo "ostrunc=$?"
cat data.txt
"""


async def test_read_only_mount_resists_every_kind_of_write(
    start_gateway: Callable[..., Any], tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "data.txt").write_text("original\n")
    (allowed / "sub").mkdir()
    for p in (allowed, allowed / "sub"):
        os.chmod(p, 0o777)  # writable by anyone on the host: only the `ro` mount stops a write
    os.chmod(allowed / "data.txt", 0o666)
    before = _fingerprint(allowed)
    with trio.fail_after(60):
        async with start_gateway(mount_allow_list=[str(allowed)]) as gw:
            never_500(gw)
            body = await gw.run_ok(
                command=["sh", "-c", ATTACK_RO],
                mounts=[{"source": str(allowed), "destination": "/workspace/ro"}],
            )
            await gw.client.delete(f"/v1/sandboxes/{body['id']}")
    result = body["result"]
    lines = result["stdout"].splitlines()
    statuses = dict(line.split("=", 1) for line in lines if "=" in line)
    assert len(statuses) == 13, lines
    assert all(code != "0" for code in statuses.values()), statuses
    assert lines[-1] == "original", lines
    assert _fingerprint(allowed) == before


async def test_nothing_written_in_one_sandbox_reaches_the_next(gw: RunningGateway) -> None:
    token = secrets.token_hex(8)
    plant = (
        f"echo {token} > /workspace/.bashrc; echo {token} > /workspace/.profile; "
        f"echo {token} > /tmp/t; echo {token} > /dev/shm/t; echo {token} > /var/tmp/t; "
        f"mkdir -p /workspace/.config && echo {token} > /workspace/.config/x; "
        f"(sleep 300 &) ; echo planted"
    )
    look = (
        'grep -rl "$TOKEN" /workspace /tmp /dev/shm /var/tmp 2>/dev/null; '
        "for p in /proc/[0-9]*; do cat $p/cmdline 2>/dev/null | tr '\\0' ' '; echo; done"
    )
    with trio.fail_after(gw.seconds(30)):
        first = await gw.run_ok(command=["sh", "-c", plant])
        assert first["result"]["stdout"] == "planted\n", first
        second = await gw.run_ok(command=["bash", "-lc", look], environment={"TOKEN": token})
    out = second["result"]["stdout"]
    assert token not in out, out
    assert "sleep 300" not in out, out  # the first sandbox's process is not in this one


# ------------------------------------------------------------------ planted symlinks


async def test_files_written_through_planted_symlinks_stay_inside(
    start_gateway: Callable[..., Any], tmp_path: Path, canary: Path
) -> None:
    """Sandbox A plants symlinks in a writable shared mount; sandbox B then asks the gateway to
    write ``files`` through them. The agent writes inside B with O_NOFOLLOW, and even a symlinked
    parent resolves in B's own root, never on the host."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    passwd_before = _file_digest("/etc/passwd")
    canary_before = _fingerprint(canary)
    mount = [{"source": str(shared), "destination": "/workspace/m", "read_only": False}]
    plant = (
        "cd /workspace/m && ln -s /etc/passwd evil && ln -s / dir && "
        f"ln -s {canary}/keep.txt canary-file && ln -s {canary} canary-dir && echo planted"
    )
    with trio.fail_after(60):
        async with start_gateway(mount_allow_list=[str(shared)]) as gw:
            never_500(gw)
            a = await gw.run_ok(command=["sh", "-c", plant], mounts=mount, keep_alive=0)
            assert a["result"]["stdout"] == "planted\n", a
            assert os.readlink(shared / "evil") == "/etc/passwd"

            evil = await gw.run(
                command=["true"],
                mounts=mount,
                files={"/workspace/m/evil": "pwned::0:0::/:/bin/sh\n"},
            )
            assert evil.status_code == 400, evil.text  # O_NOFOLLOW: ELOOP, a clean refusal
            assert evil.json()["error"]["details"]["field"] == "files./workspace/m/evil"
            via_canary = await gw.run(
                command=["true"], mounts=mount, files={"/workspace/m/canary-file": "pwned\n"}
            )
            assert via_canary.status_code == 400, via_canary.text

            # A symlinked parent: resolved inside the sandbox (uid 1000 cannot write its "/").
            root = await gw.run(command=["true"], mounts=mount, files={"/workspace/m/dir/x": "x"})
            assert root.status_code == 400, root.text
            # The canary path does not exist inside: the write lands in the sandbox's overlay.
            in_dir = await gw.run(
                command=["sh", "-c", f"cat {canary}/x; ls {canary}"],
                mounts=mount,
                files={"/workspace/m/canary-dir/x": "written inside\n"},
            )
            if in_dir.status_code == 201:
                assert in_dir.json()["result"]["stdout"] == "written inside\nx\n", in_dir.text
            else:
                assert in_dir.status_code == 400, in_dir.text
            for response in (evil, via_canary, root, in_dir):
                sid = response.json().get("id")
                if sid:
                    await gw.client.delete(f"/v1/sandboxes/{sid}")
    assert _file_digest("/etc/passwd") == passwd_before
    assert not Path("/x").exists()
    assert _fingerprint(canary) == canary_before
    assert os.readlink(shared / "evil") == "/etc/passwd"  # the planted link itself is intact


SYMLINK_FARM = """
set -e
cd /workspace
for t in / /etc /etc/passwd /root /proc/1/root /var/lib/sandstorm {data} {data}/snapshots \
         {data}/sandboxes {canary} {canary}/keep.txt ../../../../../../etc; do
  n=$(echo "$t" | tr '/.' '__')
  ln -s "$t" "link$n"
done
ln -s {canary} /tmp/canary-link
mkdir -p deep/a/b && ln -s {canary} deep/a/b/c && ln -s / deep/root
ln -s {data}/snapshots snapshots
echo farm
"""


async def test_snapshot_resume_and_teardown_with_a_symlink_farm(
    start_gateway: Callable[..., Any], tmp_path: Path, canary: Path, cgroup_parent: str
) -> None:
    canary_before = _fingerprint(canary)
    outside = tmp_path / "outside-data"
    outside.mkdir()
    (outside / "x").write_text("x\n")
    outside_before = _fingerprint(outside)
    with trio.fail_after(120):
        async with start_gateway() as gw:
            never_500(gw)
            farm = SYMLINK_FARM.format(data=gw.data_dir, canary=canary)
            body = await gw.run_ok(command=["sh", "-c", farm])
            assert body["result"]["stdout"] == "farm\n", body
            sid = body["id"]
            response = await gw.client.post(
                f"/v1/sandboxes/{sid}/snapshot", json={"leave_running": True}
            )
            assert response.status_code == 201, response.text
            snap_id = response.json()["snapshot_id"]
            snap_dir = gw.data_dir / "snapshots" / snap_id
            # The snapshot holds only the gateway's own regular files, nothing linked out.
            for dirpath, dirs, files in os.walk(gw.data_dir / "snapshots"):
                for name in dirs + files:
                    path = Path(dirpath) / name
                    assert not path.is_symlink(), path
                    assert path.resolve().is_relative_to(gw.data_dir.resolve()), path
            assert any(p.is_file() for p in snap_dir.iterdir())

            resumed = await gw.client.post("/v1/sandboxes/resume", json={"snapshot_id": snap_id})
            assert resumed.status_code == 201, resumed.text
            rid = resumed.json()["id"]
            # The links came back as links, resolving inside the resumed sandbox.
            check = await _exec(
                gw,
                rid,
                command=["sh", "-c", f"readlink /workspace/deep/a/b/c; ls {canary} 2>&1; "
                         "ls /workspace/snapshots/ 2>&1 | head -3"],
            )  # fmt: skip
            lines = check["stdout"].splitlines()
            assert lines[0] == str(canary), lines
            assert "keep.txt" not in check["stdout"], check
            assert snap_id not in check["stdout"], check

            # Teardown of both (and of the snapshot) with the farm in place.
            for s in (sid, rid):
                deleted = await gw.client.delete(f"/v1/sandboxes/{s}")
                assert deleted.status_code == 200, deleted.text
            dropped = await gw.client.delete(f"/v1/snapshots/{snap_id}")
            assert dropped.status_code in (200, 204), dropped.text
            after = await settled_state(gw.data_dir, cgroup_parent, lambda s: s.is_empty())
            assert after.is_empty(), after
            assert not snap_dir.exists()
    assert _fingerprint(canary) == canary_before
    assert _fingerprint(outside) == outside_before
    assert Path("/etc/passwd").exists() and Path("/var/lib/sandstorm").is_dir()


async def test_resume_rechecks_a_mount_source_swapped_for_a_symlink(
    start_gateway: Callable[..., Any], tmp_path: Path, canary: Path
) -> None:
    """The allowed mount source of a snapshot is replaced on the host by a symlink out of the
    allow-list (as a writable mount of its parent allows): resume must refuse it."""
    allowed = tmp_path / "allowed"
    source = allowed / "data"
    source.mkdir(parents=True)
    (source / "f.txt").write_text("fine\n")
    with trio.fail_after(90):
        async with start_gateway(mount_allow_list=[str(allowed)]) as gw:
            never_500(gw)
            body = await gw.run_ok(
                command=["cat", "/workspace/d/f.txt"],
                mounts=[{"source": str(source), "destination": "/workspace/d"}],
            )
            assert body["result"]["stdout"] == "fine\n", body
            response = await gw.client.post(
                f"/v1/sandboxes/{body['id']}/snapshot", json={"leave_running": False}
            )
            assert response.status_code == 201, response.text
            snap_id = response.json()["snapshot_id"]
            (source / "f.txt").unlink()
            source.rmdir()
            source.symlink_to(canary)
            before = await host_state(gw.data_dir, gw.config.cgroup_parent)
            resumed = await gw.client.post("/v1/sandboxes/resume", json={"snapshot_id": snap_id})
            assert resumed.status_code == 403, resumed.text
            assert resumed.json()["error"]["code"] == "mount_not_allowed"
            assert await host_state(gw.data_dir, gw.config.cgroup_parent) == before


# ------------------------------------------------------------------ mount refusals


async def test_mount_sources_and_destinations_refused_before_anything_exists(
    start_gateway: Callable[..., Any], tmp_path: Path, cgroup_parent: str
) -> None:
    """What tests/web/test_errors.py and test_mounts.py do not already send: /sys, /dev and the
    data dir through symlinks inside the allow-list, an allow-list of "/" (the forbidden roots
    hold whatever it says), and NUL/newline/`..` in sources and destinations."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok").mkdir()
    with trio.fail_after(60):
        async with start_gateway(mount_allow_list=[str(allowed), "/"]) as gw:
            never_500(gw)
            data = str(gw.data_dir)
            links = {"to-sys": "/sys", "to-dev": "/dev", "to-proc": "/proc/1", "to-root": "/",
                     "to-data": data, "to-runsc": f"{data}/runsc"}  # fmt: skip
            for name, target in links.items():
                (allowed / name).symlink_to(target)
            before = await host_state(gw.data_dir, cgroup_parent)
            assert before.is_empty()
            forbidden = [
                "/", "/proc", "/proc/self", "/sys", "/sys/fs/cgroup", "/dev", "/dev/shm",
                "/etc", "/run", "/boot", str(gw.data_dir), str(gw.data_dir / "runsc"),
                str(gw.data_dir / "snapshots"), str(gw.data_dir.parent),
                str(allowed / "to-sys"), str(allowed / "to-dev"), str(allowed / "to-proc"),
                str(allowed / "to-data"), str(allowed / "to-runsc"), str(allowed / "to-root"),
                f"{allowed}/ok/../to-sys",
            ]  # fmt: skip
            for source in forbidden:
                response = await gw.run(
                    command=["true"], mounts=[{"source": source, "destination": "/workspace/d"}]
                )
                assert response.status_code == 403, (source, response.text)
                error = response.json()["error"]
                assert error["code"] == "mount_not_allowed", (source, error)
                assert error["details"]["field"] == "mounts[0].source", (source, error)
            bad_paths = [
                ("source", f"{allowed}/ok\x00/etc"),
                ("source", f"{allowed}/ok\n/etc"),
                ("source", "ok"),
                ("destination", "/workspace/d\x00"),
                ("destination", "/workspace/d\n/etc"),
                ("destination", "/workspace/d\r"),
                ("destination", "/workspace/d/.."),
                ("destination", "/workspace/./d"),
                ("destination", "/../etc"),
                ("destination", "/dev"),
                ("destination", "/sys/fs"),
                ("destination", "/proc"),
            ]
            for field, value in bad_paths:
                mount = {"source": str(allowed / "ok"), "destination": "/workspace/d"}
                mount[field] = value
                response = await gw.run(command=["true"], mounts=[mount])
                assert response.status_code == 400, (field, value, response.text)
                error = response.json()["error"]
                assert error["details"]["field"] == f"mounts[0].{field}", (value, error)
            after = await host_state(gw.data_dir, cgroup_parent)
            assert after == before, after
            # The allow-list itself still works.
            ok = await gw.run_ok(
                command=["true"], mounts=[{"source": str(allowed / "ok"), "destination": "/d"}]
            )
            assert ok["result"]["verdict"] == "ok"
