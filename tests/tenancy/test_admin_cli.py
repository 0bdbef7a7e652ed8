"""``sandstorm keys`` and the loopback rule of ``sandstorm serve``, as real subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.tenancy.test_audit import REPO, admin


async def test_keys_create_list_revoke(tmp_path: Path) -> None:
    with trio.fail_after(60):
        created = await admin(
            tmp_path, "keys", "create", "--tenant", "acme", "--max-sandboxes", "3",
            "--max-memory", "1073741824", "--max-concurrent-execs", "5",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        key = created.stdout.decode().strip()
        assert re.fullmatch(r"sst_[A-Za-z0-9_-]{43}", key)  # stdout is the key alone, once
        key_id = re.search(rb"created (key_[0-9a-f]+)", created.stderr)
        assert key_id is not None and key.encode() not in created.stderr
        listed = await admin(tmp_path, "keys", "list")
        assert listed.returncode == 0
        assert key_id.group(1) in listed.stdout and b"acme" in listed.stdout
        assert b"sandboxes=3 memory=1073741824 execs=5" in listed.stdout
        assert key.encode() not in listed.stdout + listed.stderr  # never shown again
        revoked = await admin(tmp_path, "keys", "revoke", key_id.group(1).decode())
        assert revoked.returncode == 0, revoked.stderr
        listed = await admin(tmp_path, "keys", "list")
        line = next(x for x in listed.stdout.splitlines() if key_id.group(1) in x)
        assert b" - " not in line.split(b"acme")[1][:40]  # a revocation time, not "-"
        unknown = await admin(tmp_path, "keys", "revoke", "key_0000")
        assert unknown.returncode == 2 and b"no key" in unknown.stderr
        bad = await admin(tmp_path, "keys", "create", "--tenant", "no spaces")
        assert bad.returncode == 2
        audit = await admin(tmp_path, "audit")
        assert audit.stdout.count(b"keys_create") == 1
        assert audit.stdout.count(b"keys_revoke") == 2


async def _serve(data_dir: Path, *args: str) -> tuple[int, bytes]:
    """Start ``sandstorm serve``; (exit code, stderr) once it exits, or (-1, b"") once it
    answers /health (then it is stopped with SIGINT)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sandstorm", "serve", "--data-dir", str(data_dir),
         "--port", "0", *args],
        cwd=REPO, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    err = b""
    try:
        while proc.returncode is None:
            with trio.move_on_after(0.2):
                chunk = await proc.stderr.receive_some(65536)
                if not chunk:
                    await proc.wait()
                    break
                err += chunk
            if (url := re.search(rb"serving on (http://\S+?)[\",\s]", err)) is not None:
                async with httpx.AsyncClient() as client:
                    health = await client.get(url.group(1).decode() + "/health")
                assert health.status_code == 200
                return -1, err
        return proc.returncode or 0, err
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            with trio.move_on_after(20):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await proc.stderr.aclose()


async def test_serve_refuses_an_open_api_beyond_loopback(tmp_path: Path) -> None:
    with trio.fail_after(90):
        code, err = await _serve(tmp_path, "--host", "0.0.0.0")
        assert code == 2, err
        assert b"--insecure-no-auth" in err and b"sandstorm keys create" in err
        # With a key, or explicitly insecure, it serves.
        assert (await admin(tmp_path, "keys", "create", "--tenant", "t")).returncode == 0
        code, err = await _serve(tmp_path, "--host", "0.0.0.0")
        assert code == -1, err
        fresh = tmp_path / "fresh"
        code, err = await _serve(fresh, "--host", "0.0.0.0", "--insecure-no-auth")
        assert code == -1, err
        code, err = await _serve(fresh, "--host", "127.0.0.1")
        assert code == -1, err
