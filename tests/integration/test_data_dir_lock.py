"""A second ``sandstorm serve`` on a data directory a live gateway holds refuses to start with a
message naming the holder, and leaves the first gateway's sandboxes alone."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import trio

from tests.integration.gateway_process import REPO, gateway_process


async def test_a_second_gateway_on_the_same_data_dir_refuses_to_start(
    runsc_required: None, data_dir: Path, cgroup_parent: str, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        async with (
            gateway_process(data_dir, tmp_path, cgroup_parent=cgroup_parent) as gp,
            httpx.AsyncClient(base_url=gp.url, timeout=60) as client,
        ):
            created = await client.post(
                "/v1/sandboxes/run", json={"command": ["true"], "keep_alive": 600}
            )
            sid = created.json()["id"]
            # Refused at once: a second gateway that starts instead never exits on its own.
            with trio.fail_after(30):
                second = await trio.run_process(
                    [sys.executable, "-m", "sandstorm", "serve", "--port", "0", "--data-dir",
                     str(data_dir)],
                    cwd=REPO, capture_stdout=True, capture_stderr=True, check=False,
                )  # fmt: skip
            err = second.stderr.decode()
            assert second.returncode == 1, err[-2000:]
            assert f"is in use by another gateway (pid {gp.proc.pid})" in err, err[-2000:]
            assert "Traceback" not in err
            # The first gateway's sandbox was never touched: it still serves.
            again = await client.post(f"/v1/sandboxes/{sid}/exec", json={"command": ["echo", "ok"]})
            assert again.json()["result"]["stdout"] == "ok\n", again.text
            status = (await client.get(f"/v1/sandboxes/{sid}/status")).json()
            assert status["state"] == "idle", status
