"""Sandboxes held by their shim outlive the gateway: real runsc, real shim processes.

A gateway's death is simulated twice: in-process by letting go of the instance without any
teardown (the shim sees its connection close, as after a crash), and for real by SIGKILLing the
process group of a separate Python process that started the sandbox mid-output. Either way a
fresh runtime object finds the sandbox with ``surviving()``, ``reattach``es at the offset the
dead one had consumed, and reads what was written meanwhile from the journal, then the rest live.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from sandstorm.agent import AgentChannel, FrameKind, decode_exit
from sandstorm.ids import new_id
from sandstorm.images import image_rootfs
from sandstorm.runtimes.base import RuntimeStartError, SandboxSpec
from sandstorm.runtimes.cgroups import SandboxCgroups
from sandstorm.runtimes.gvisor import GvisorRuntime
from sandstorm.shim import shim_paths
from tests.hoststate import HostState, settled_state

pytestmark = pytest.mark.usefixtures("runsc_required")

MIB = 1024 * 1024
# Prints numbered lines, one every 5 ms, so a gateway can die in the middle.
COUNTER = "import sys, time\nfor i in range({n}):\n    print(i, flush=True); time.sleep(0.005)\n"


def make_runtime(data_dir: Path, cgroup_parent: str, **kwargs: int) -> GvisorRuntime:
    return GvisorRuntime(
        ["/usr/local/bin/runsc", "/usr/bin/runsc"],
        data_dir,
        SandboxCgroups(cgroup_parent),
        **kwargs,
    )


def make_spec(data_dir: Path) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=new_id("sbx"),
        rootfs=image_rootfs(data_dir),
        cpu_limit=1.0,
        memory_limit=512 * MIB,
        pids_limit=256,
    )


@pytest.fixture
async def runtime(data_dir: Path, cgroup_parent: str) -> AsyncIterator[GvisorRuntime]:
    rt = make_runtime(data_dir, cgroup_parent)
    assert (await rt.detect()).available
    yield rt
    # Teardown proof: destroy frees everything, shims, journals and sockets included.
    with trio.fail_after(60):
        for orphan in await rt.list_orphans(set):
            await rt.destroy(orphan)
        left = await settled_state(data_dir, cgroup_parent, HostState.is_empty, seconds=10)
    assert left.is_empty(), f"left on the host: {left}"


async def read_exec(
    channel: AgentChannel, exec_channel: int, *, until: bytes | None = None
) -> bytes:
    """Stdout of one exec until its EXIT (or until ``until`` has been seen)."""
    out = bytearray()
    while True:
        frame = await channel.receive_frame()
        assert frame is not None, f"stream ended; got {bytes(out[-200:])!r}"
        if frame.channel != exec_channel:
            continue
        if frame.kind == FrameKind.STDOUT:
            out += frame.payload
            if until is not None and until in out:
                return bytes(out)
        elif frame.kind == FrameKind.EXIT:
            assert decode_exit(frame.payload).exit_code == 0
            return bytes(out)


def contiguous(text: bytes, first: int, last: int) -> None:
    numbers = [int(x) for x in text.split()]
    assert numbers == list(range(first, last + 1)), (numbers[:5], numbers[-5:])


async def test_sandbox_survives_a_dropped_gateway(runtime: GvisorRuntime, data_dir: Path) -> None:
    spec = make_spec(data_dir)
    with trio.fail_after(60):
        instance = await runtime.start(spec)
        shim = instance.process
        assert shim is not None
        await instance.channel.wait_hello()
        await instance.channel.send_exec(1, ["python3", "-c", COUNTER.format(n=400)], {}, "/")
        seen = await read_exec(instance.channel, 1, until=b"\n50\n")
        # Only whole frames count: everything up to ``offset`` has been taken.
        offset = instance.channel.offset
        # The gateway "dies": its connection closes, nothing is torn down.
        await instance.detach()
        del instance
        await trio.sleep(0.5)  # the sandbox goes on writing into the journal meanwhile

        fresh = make_runtime(data_dir, runtime.cgroups.parent)
        assert (await fresh.detect()).available
        assert await fresh.surviving() == [spec.sandbox_id]
        again = await fresh.reattach(spec.sandbox_id, offset)
        assert again.handshake.end_offset > offset  # written while nobody was attached
        rest = await read_exec(again.channel, 1)
        contiguous(seen + rest, 0, 399)
        # The same sandbox goes on: a new exec, live.
        await again.channel.send_exec(2, ["echo", "still here"], {}, "/")
        assert await read_exec(again.channel, 2) == b"still here\n"

        # Asking for bytes before the journal's start, or past its end, is refused.
        with pytest.raises(RuntimeStartError, match="not in the shim's journal"):
            await fresh.reattach(spec.sandbox_id, 10**12)
        released = await fresh.destroy(spec.sandbox_id)
        assert any("shim" in r for r in released), released
        await again.wait()
        await again.channel.aclose()
        assert await fresh.surviving() == []
        with pytest.raises(RuntimeStartError, match=r"no live shim|exited"):
            await fresh.reattach(spec.sandbox_id, 0)
        await shim.wait()  # the first gateway's child: reaped by whoever is still around


async def test_teardown_through_the_channel_ends_the_shim(
    runtime: GvisorRuntime, data_dir: Path
) -> None:
    """Closing the channel is still "stop": the shim closes the agent's stdin, the agent exits,
    runsc exits, the shim records the status and leaves."""
    spec = make_spec(data_dir)
    with trio.fail_after(60):
        instance = await runtime.start(spec)
        await instance.channel.wait_hello()
        await instance.channel.aclose()
        with trio.fail_after(10):
            status = await instance.wait()
        assert status == 0
        assert instance.exited
        paths = shim_paths(data_dir, spec.sandbox_id)
        assert paths.exit_file.read_text().strip() == "0"
        await runtime.destroy(spec.sandbox_id)
        assert not paths.directory.exists() and not paths.socket.exists()


async def test_teardowns_that_race_both_succeed_and_free_everything(
    runtime: GvisorRuntime, data_dir: Path
) -> None:
    """Two teardowns of one sandbox at once (or one finding parts already gone) each release
    what is left, and neither fails on what the other took."""
    spec = make_spec(data_dir)
    with trio.fail_after(60):
        instance = await runtime.start(spec)
        await instance.channel.wait_hello()
        released: list[list[str]] = []

        async def destroy() -> None:
            released.append(await runtime.destroy(spec.sandbox_id))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(destroy)
        everything = [item for items in released for item in items]
        assert any(item.startswith("runsc container") for item in everything), released
        assert any(item.startswith("bundle directory") for item in everything), released
        assert await runtime.destroy(spec.sandbox_id) == []  # nothing left to release
        await instance.wait()


async def test_backpressure_at_journal_max(data_dir: Path, cgroup_parent: str) -> None:
    journal_max = 256 * 1024
    rt = make_runtime(data_dir, cgroup_parent, journal_max=journal_max)
    assert (await rt.detect()).available
    spec = make_spec(data_dir)
    total = 4 * MIB
    try:
        with trio.fail_after(60):
            instance = await rt.start(spec)
            channel = instance.channel
            channel.auto_ack = False
            await channel.wait_hello()
            await channel.send_exec(1, ["head", "-c", str(total), "/dev/zero"], {}, "/")
            received = 0
            while True:
                with trio.move_on_after(1.5):
                    frame = await channel.receive_frame()
                    assert frame is not None
                    if frame.kind == FrameKind.STDOUT:
                        received += len(frame.payload)
                    continue
                break  # nothing for 1.5 s: the shim stopped reading the sandbox
            # Never more than journal_max (plus one read) unacknowledged: nothing dropped,
            # nothing grown; the program waits.
            assert 0 < channel.offset <= journal_max + 65536, channel.offset
            paths = shim_paths(data_dir, spec.sandbox_id)
            journal = sum(p.stat().st_size for p in paths.directory.glob("journal.*"))
            assert journal <= journal_max + 65536, journal
            # Acknowledging lets it go on, and acknowledged segments are dropped.
            done = False
            while not done:
                await channel.send_ack(channel.offset)
                frame = await channel.receive_frame()
                assert frame is not None
                if frame.kind == FrameKind.STDOUT:
                    received += len(frame.payload)
                done = frame.kind == FrameKind.EXIT
            assert received == total
            journal = sum(p.stat().st_size for p in paths.directory.glob("journal.*"))
            assert journal <= journal_max + 65536, journal
            await channel.aclose()
            await instance.wait()
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(30):
            await rt.destroy(spec.sandbox_id)
    left = await settled_state(data_dir, cgroup_parent, HostState.is_empty, seconds=10)
    assert left.is_empty(), left


VICTIM = textwrap.dedent(
    """
    import json, sys, trio
    from pathlib import Path
    from sandstorm.agent import FrameKind
    from tests.unit.runtimes.test_shimmed import COUNTER, make_runtime, make_spec

    async def main():
        data_dir, cgroup_parent = Path(sys.argv[1]), sys.argv[2]
        runtime = make_runtime(data_dir, cgroup_parent)
        await runtime.detect()
        spec = make_spec(data_dir)
        instance = await runtime.start(spec)
        await instance.channel.wait_hello()
        await instance.channel.send_exec(1, ["python3", "-c", COUNTER.format(n=600)], {}, "/")
        out = b""
        while True:
            frame = await instance.channel.receive_frame()
            if frame.channel == 1 and frame.kind == FrameKind.STDOUT:
                out += frame.payload
            if b"\\n100\\n" in out:
                print(json.dumps({"id": spec.sandbox_id, "offset": instance.channel.offset,
                                  "seen": out.decode()}), flush=True)
                out = b"\\n"
                await trio.sleep_forever()  # killed in the middle of the output

    trio.run(main)
    """
)


async def test_sandbox_survives_sigkill_of_the_gateway_process(
    runtime: GvisorRuntime, data_dir: Path, cgroup_parent: str
) -> None:
    root = Path(__file__).resolve().parents[3]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            victim = await nursery.start(
                _run_victim, [sys.executable, "-c", VICTIM, str(data_dir), cgroup_parent], root
            )
            line = b""
            while not line.endswith(b"\n"):
                chunk = await victim.stdout.receive_some(65536)
                assert chunk, "the victim died before starting its sandbox"
                line += chunk
            # The whole process group, as a supervisor would kill a gateway.
            os.killpg(victim.pid, signal.SIGKILL)
            assert await victim.wait() == -signal.SIGKILL
            await victim.stdout.aclose()
        report = json.loads(line)
        sandbox_id, offset, seen = report["id"], report["offset"], report["seen"].encode()
        await trio.sleep(0.3)

        assert await runtime.surviving() == [sandbox_id]
        instance = await runtime.reattach(sandbox_id, offset)
        rest = await read_exec(instance.channel, 1)
        contiguous(seen + rest, 0, 599)
        await instance.channel.send_exec(2, ["echo", "after the crash"], {}, "/")
        assert await read_exec(instance.channel, 2) == b"after the crash\n"
        await instance.channel.aclose()
        assert await instance.wait() == 0
        await runtime.destroy(sandbox_id)


async def _run_victim(
    argv: list[str], cwd: Path, *, task_status: trio.TaskStatus[trio.Process]
) -> None:
    process = await trio.lowlevel.open_process(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        start_new_session=True,  # its own group, so killpg reaches it and only it
    )
    task_status.started(process)


async def test_the_reaper_reads_runscs_containers_from_its_state_files(
    runtime: GvisorRuntime, data_dir: Path
) -> None:
    """The reaper's view of runsc's containers comes from runsc's state files, not `runsc list`
    (which loads every container under its lock and ran past its 15 s bound with 100 sandboxes
    booting here, which stopped the gateway): both must agree."""
    spec = make_spec(data_dir)
    with trio.fail_after(60):
        instance = await runtime.start(spec)
        await instance.channel.wait_hello()
        assert await runtime.list_containers() == {spec.sandbox_id}
        log = runtime.state_root / "runsc.log"
        listed = json.loads(await runtime._control(log, None, "list", "--format", "json"))
        assert {entry["id"] for entry in listed} == {spec.sandbox_id}
        assert await runtime.list_orphans(set) == [spec.sandbox_id]
        assert await runtime.list_orphans(lambda: {spec.sandbox_id}) == []
        await runtime.destroy(spec.sandbox_id)
        await instance.wait()
        assert await runtime.list_containers() == set()
