"""A real gateway process is SIGKILLed with 20 sandboxes, some of them mid-exec and printing;
the next gateway on the same data directory takes every one of them over: each is usable, every
exec's whole output is there, and nothing is left on the host afterwards. One printer is a QEMU
microVM (``maximum``, when a VM image is built): its shim holds it like gVisor's."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from sandstorm.images.vm import load_vm_manifest
from sandstorm.shim import read_pids, shim_paths
from tests.conftest import IMAGE_DATA_DIR
from tests.hoststate import HostState, settled_state
from tests.integration.gateway_process import gateway_process

SANDBOXES = 20
PRINTERS = 6
LINES = 40
# Prints a numbered line every 100 ms: about 4 s, so the kill lands mid-output and more is
# written while no gateway is there.
PRINTER = (
    "import sys, time\n"
    f"for i in range({LINES}):\n"
    "    print(f'line {i:03d}', flush=True)\n"
    "    time.sleep(0.1)\n"
)
SLOW_PRINTER = PRINTER.replace("time.sleep(0.1)", "time.sleep(0.3)")


def expected_output() -> str:
    return "".join(f"line {i:03d}\n" for i in range(LINES))


async def _run(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/sandboxes/run", json={"keep_alive": 600, **body})
    assert response.status_code in (201, 202), response.text
    result: dict[str, Any] = response.json()
    return result


async def _finished(client: httpx.AsyncClient, sid: str, exec_id: str) -> dict[str, Any]:
    while True:
        response = await client.get(f"/v1/sandboxes/{sid}/execs/{exec_id}")
        assert response.status_code == 200, response.text
        summary: dict[str, Any] = response.json()
        if summary["state"] == "finished":
            return summary
        await trio.sleep(0.1)


async def test_sigkill_with_20_sandboxes_then_the_next_gateway_takes_them_all_over(
    runsc_required: None, data_dir: Path, cgroup_parent: str, tmp_path: Path
) -> None:
    printers: dict[str, str] = {}  # sandbox id -> exec id of the printing exec
    idle: list[str] = []
    vms: list[str] = []  # the qemu printer, where this host has the VM image
    with_vm = load_vm_manifest(IMAGE_DATA_DIR) is not None
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with trio.fail_after(240):
        async with (
            gateway_process(
                data_dir, tmp_path / "first", cgroup_parent=cgroup_parent, on_shutdown="keep",
                max_sandboxes=64, boot_timeout_s=90.0,  # a TCG boot on a loaded host
            ) as first,
            httpx.AsyncClient(base_url=first.url, timeout=60) as client,
        ):  # fmt: skip
            if with_vm:
                # A TCG boot takes seconds (and both cores): the VM boots alone, before the
                # others, and prints three times slower, so that it is still mid-output when
                # the gateway dies.
                made = await _run(client, {"command": ["true"], "isolation_level": "maximum"})
                assert made["runtime"] == "qemu", made
                sid = made["id"]
                vms.append(sid)
                base = (await client.get(f"/v1/sandboxes/{sid}/status")).json()["last_event_seq"]
                started = await client.post(
                    f"/v1/sandboxes/{sid}/exec",
                    json={"command": ["python3", "-c", SLOW_PRINTER], "wait": False},
                )
                assert started.status_code == 202, started.text
                printers[sid] = started.json()["exec_id"]
                while (await client.get(f"/v1/sandboxes/{sid}/status")).json()[
                    "last_event_seq"
                ] < base + 2:  # started, then its first line
                    await trio.sleep(0.05)

            async def create(n: int) -> None:
                if n < PRINTERS // 2:
                    # The printing exec is the run's own first exec ...
                    made = await _run(
                        client, {"language": "python", "code": PRINTER, "wait": False}
                    )
                    printers[made["id"]] = made["exec_id"]
                elif n < PRINTERS:
                    # ... or a later exec in an existing sandbox.
                    made = await _run(client, {"command": ["true"]})
                    started = await client.post(
                        f"/v1/sandboxes/{made['id']}/exec",
                        json={"command": ["python3", "-c", PRINTER], "wait": False},
                    )
                    assert started.status_code == 202, started.text
                    printers[made["id"]] = started.json()["exec_id"]
                else:
                    made = await _run(client, {"command": ["sh", "-c", "echo ready"]})
                    assert made["result"]["stdout"] == "ready\n"
                    idle.append(made["id"])

            limiter = trio.CapacityLimiter(4)

            async def create_limited(n: int) -> None:
                async with limiter:
                    await create(n)

            # The idle ones first, the printers last: each printer is then sure to be
            # mid-output when the gateway dies, however slowly this host boots sandboxes.
            for phase in (range(PRINTERS, SANDBOXES - len(vms)), range(PRINTERS)):
                async with trio.open_nursery() as nursery:
                    for n in phase:
                        nursery.start_soon(create_limited, n)
            # Every printer is mid-output: wait until each has printed something.
            for sid, exec_id in printers.items():
                while True:
                    summary = (await client.get(f"/v1/sandboxes/{sid}/execs/{exec_id}")).json()
                    assert summary["state"] == "running", summary
                    status = (await client.get(f"/v1/sandboxes/{sid}/status")).json()
                    if status["last_event_seq"] >= 4:
                        break
                    await trio.sleep(0.05)
            # One sandbox dies while no gateway is there: the next one must fail it, not hang.
            doomed = idle.pop()
            first.proc.kill()  # SIGKILL: no drain, no checkpoint, nothing flushed
            await first.wait()

        doomed_pids = read_pids(shim_paths(data_dir, doomed))
        assert doomed_pids is not None
        for pid in doomed_pids:
            os.kill(pid, signal.SIGKILL)
        await trio.sleep(1.0)  # the printers go on printing into their shims' journals

        restarted = time.monotonic()
        async with (
            gateway_process(
                data_dir, tmp_path / "second", cgroup_parent=cgroup_parent,
                on_shutdown="destroy", max_sandboxes=64, boot_timeout_s=90.0,
            ) as second,
            httpx.AsyncClient(base_url=second.url, timeout=60) as client,
        ):  # fmt: skip
            serving_s = time.monotonic() - restarted
            took_over = [
                line for line in second.log_lines() if "took over" in line.get("message", "")
            ]
            assert took_over, second.stderr.decode()[-3000:]
            print(f"\nrestart to serving: {serving_s * 1000:.0f} ms; {took_over[0]['message']}")

            for sid in vms:
                status = (await client.get(f"/v1/sandboxes/{sid}/status")).json()
                assert status["runtime"] == "qemu", status
            failed = (await client.get(f"/v1/sandboxes/{doomed}/status")).json()
            assert failed["state"] == "failed", failed
            assert "no longer running" in failed["failure"]["reason"]

            # Every printing exec finishes with its whole output, in order, exactly once.
            for sid, exec_id in printers.items():
                summary = await _finished(client, sid, exec_id)
                result = summary["result"]
                assert result["stdout"] == expected_output(), (sid, result)
                assert result["verdict"] == "ok", result
            # Every sandbox is usable.
            for sid in [*printers, *idle]:
                status = (await client.get(f"/v1/sandboxes/{sid}/status")).json()
                assert status["state"] in ("idle", "running"), status
                response = await client.post(
                    f"/v1/sandboxes/{sid}/exec", json={"command": ["echo", "again"]}
                )
                assert response.status_code == 201, response.text
                assert response.json()["result"]["stdout"] == "again\n"
            # The listing knows them all.
            listed = {s["id"] for s in (await client.get("/v1/sandboxes")).json()["sandboxes"]}
            assert set(printers) | set(idle) | {doomed} <= listed
        # "destroy" on the way out, then nothing of any of the 20 is left.
        state = await settled_state(data_dir, cgroup_parent, HostState.is_empty, seconds=20)
        assert state.is_empty(), state
