"""The kata driver through a real containerd (Debian's package, started here with its own root,
state, config and socket) with runtime type ``io.containerd.runc.v2``: everything but the VM.
Plus the pure pieces: Kata's annotations, the spec, the ``ctr`` command line."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from sandstorm.agent import Frame, FrameKind
from sandstorm.api.types import MIB
from sandstorm.ids import new_id
from sandstorm.runtimes.base import SandboxSpec
from sandstorm.runtimes.cgroups import V1_ALL, SandboxCgroups
from sandstorm.runtimes.kata import KataRuntime
from sandstorm.runtimes.kata.spec import (
    GUEST_OVERHEAD_MIB,
    KATA_RUNTIME_TYPE,
    MEMORY_ANNOTATION,
    NAMESPACE,
    RUNC_RUNTIME_TYPE,
    VCPUS_ANNOTATION,
    ctr_run_argv,
    host_limits,
    kata_annotations,
    oci_spec,
    shim_binary,
)
from sandstorm.runtimes.shimmed import ShimInstance
from tests.conftest import IMAGE_DATA_DIR, require, runsc_usable
from tests.harness import RunningGateway
from tests.hoststate import host_mounts_under, host_state
from tests.web.test_stream import collect_until_exit, next_frame

T = 60
ROOTFS = IMAGE_DATA_DIR / "images" / "default" / "rootfs"


def _spec(sandbox_id: str, cpu: float = 1.0, memory: int = 256 * MIB, pids: int = 64) -> Any:
    return SandboxSpec(sandbox_id, ROOTFS, cpu, memory, pids)


# ------------------------------------------------------------------------- pure pieces


def test_kata_annotations_size_the_vm_from_the_limits() -> None:
    assert kata_annotations(_spec("sbx_x", 0.5, 256 * MIB)) == {
        VCPUS_ANNOTATION: "1",
        MEMORY_ANNOTATION: str(256 + GUEST_OVERHEAD_MIB),
    }
    # vCPUs round up; memory rounds up to whole MiB.
    got = kata_annotations(_spec("sbx_x", 2.01, 100 * MIB + 1))
    assert got == {VCPUS_ANNOTATION: "3", MEMORY_ANNOTATION: str(101 + GUEST_OVERHEAD_MIB)}


def test_spec_and_host_limits_per_runtime_type(tmp_path: Path) -> None:
    spec = _spec("sbx_x", 1.5, 512 * MIB, 100)
    kata = oci_spec(spec, tmp_path, "/p/sbx_x/sandbox", KATA_RUNTIME_TYPE)
    runc = oci_spec(spec, tmp_path, "/p/sbx_x/sandbox", RUNC_RUNTIME_TYPE)
    assert kata["annotations"] == kata_annotations(spec) and "annotations" not in runc
    for config in (kata, runc):
        process: Any = config["process"]
        assert process["user"]["uid"] == 1000 and process["noNewPrivileges"] is True
        assert all(not caps for caps in process["capabilities"].values())
        # NPROC would count every uid-1000 process on the kernel; the cgroup limits instead.
        assert [r["type"] for r in process["rlimits"]] == ["RLIMIT_NOFILE"]
        linux: Any = config["linux"]
        assert linux["resources"]["pids"] == {"limit": 101}
        assert {"type": "network"} in linux["namespaces"]  # a fresh one: loopback only
        assert config["root"] == {"path": str(tmp_path), "readonly": False}
        mounts: Any = config["mounts"]
        agent = next(m for m in mounts if m["destination"] == "/.sandstorm")
        assert "ro" in agent["options"]
    assert host_limits(spec, RUNC_RUNTIME_TYPE).memory_bytes == 512 * MIB
    vm = host_limits(spec, KATA_RUNTIME_TYPE)
    assert vm.memory_bytes > (512 + GUEST_OVERHEAD_MIB) * MIB and vm.cpu == 1.5


def test_ctr_argv_and_shim_names(tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "sandbox_id": "sbx_a",
        "spec_path": tmp_path / "spec.json",
        "fifo_dir": tmp_path / "fifo",
        "gateway_tag": "t1",
        "runc_root": tmp_path / "runc",
    }
    prefix = ["ctr", "--address", "/s", "--namespace", NAMESPACE]
    argv = ctr_run_argv(prefix, runtime_type=KATA_RUNTIME_TYPE, **common)
    assert argv == [
        *prefix, "run", "--rm", "--config", str(tmp_path / "spec.json"),
        "--runtime", "io.containerd.kata.v2", "--fifo-dir", str(tmp_path / "fifo"),
        "--label", "io.sandstorm.supervisor.gateway=t1", "sbx_a",
    ]  # fmt: skip
    # runc-only options are given to runc only (ctr refuses them for another runtime).
    argv = ctr_run_argv(prefix, runtime_type=RUNC_RUNTIME_TYPE, **common)
    assert argv[-3:] == ["--runc-root", str(tmp_path / "runc"), "sbx_a"]
    assert shim_binary(KATA_RUNTIME_TYPE) == "containerd-shim-kata-v2"
    assert shim_binary(RUNC_RUNTIME_TYPE) == "containerd-shim-runc-v2"
    with pytest.raises(ValueError):
        shim_binary("kata")


# ------------------------------------------------------------------------- a real containerd


@dataclass
class Containerd:
    address: str
    directory: Path
    process: subprocess.Popen[bytes]

    def ctr(self, *args: str) -> str:
        result = subprocess.run(
            ["ctr", "--address", self.address, "--namespace", NAMESPACE, *args],
            capture_output=True,
            timeout=10,
            check=True,
        )
        return result.stdout.decode()

    def shim_processes(self) -> list[str]:
        """containerd-shim-runc-v2 processes of this containerd (named by its address)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"containerd-shim" in cmdline and self.address.encode() + b"\0" in cmdline:
                    found.append(entry)
        return found

    def shim_socket(self, sandbox_id: str) -> Path:
        # containerd 1.6 puts a shim's socket at /run/containerd/s/sha256(address/ns/id).
        digest = hashlib.sha256(f"{self.address}/{NAMESPACE}/{sandbox_id}".encode()).hexdigest()
        return Path("/run/containerd/s") / digest

    def leftovers(self) -> list[str]:
        left = [f"container {c}" for c in self.ctr("containers", "list", "-q").split()]
        tasks = self.ctr("tasks", "list").splitlines()[1:]
        left += [f"task {t}" for t in tasks if t.strip()]
        left += [f"shim process {p}" for p in self.shim_processes()]
        left += [f"mount {m}" for m in host_mounts_under(self.directory)]
        return left


def _containerd_usable() -> str | None:
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        return "containerd is not installed (scripts/install.sh test installs it)"
    if shutil.which("containerd-shim-runc-v2") is None or shutil.which("runc") is None:
        return "containerd-shim-runc-v2 or runc is missing"
    return runsc_usable()  # root and the default image


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    require(_containerd_usable())
    directory = tmp_path / "ctd"
    directory.mkdir()
    address = str(directory / "c.sock")
    # sun_path holds 108 bytes with its NUL, and containerd adds ".ttrpc" for its second socket.
    if len(address) + len(".ttrpc") > 100:
        address = f"/run/sandstorm-ctd-{secrets.token_hex(4)}.sock"
    config = directory / "config.toml"
    config.write_text(
        f"""version = 2
root = "{directory}/root"
state = "{directory}/state"
# Nothing here uses images, Kubernetes or these snapshotters: fewer plugins, a faster start.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{address}"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{directory}/opt"
"""
    )
    log = open(directory / "containerd.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["containerd", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    ctd = Containerd(address, directory, process)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                ctd.ctr("version")
                break
            except subprocess.CalledProcessError:
                assert process.poll() is None, (directory / "containerd.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "containerd did not answer within 15 s"
                time.sleep(0.05)
        yield ctd
        # Proof: the driver left nothing in containerd, and no shim, mount or socket of it.
        assert ctd.leftovers() == []
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        for sock in (address, address + ".ttrpc"):
            Path(sock).unlink(missing_ok=True)
    assert ctd.shim_processes() == []
    assert not host_mounts_under(directory)


@pytest.fixture
def cgroups() -> Iterator[SandboxCgroups]:
    cg = SandboxCgroups(f"sandstorm-test-{secrets.token_hex(4)}")
    yield cg
    left = cg.list_ids()
    for sid in left:
        cg.remove(sid)
    for d in cg._dirs("", V1_ALL):
        if d.is_dir():
            os.rmdir(d)
    assert not left, f"cgroups left behind: {left}"


@pytest.fixture
async def runtime(
    containerd: Containerd, cgroups: SandboxCgroups, tmp_path: Path
) -> AsyncIterator[KataRuntime]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(IMAGE_DATA_DIR / "images")
    driver = KataRuntime(
        ["kata-runtime"], data, cgroups, runtime_type=RUNC_RUNTIME_TYPE, address=containerd.address
    )
    yield driver
    # A test that failed half-way leaves its sandbox: free it before the proofs run.
    with trio.fail_after(30):
        for orphan in await driver.list_orphans(set):
            await driver.destroy(orphan)


async def _until(instance: ShimInstance, kind: FrameKind) -> list[Frame]:
    frames = []
    while True:
        frame = await instance.channel.receive_frame()
        assert frame is not None, f"agent channel closed; log: {instance.diagnostics()}"
        frames.append(frame)
        if frame.kind == kind:
            return frames


async def _run(instance: ShimInstance, channel: int, argv: list[str]) -> tuple[bytes, Frame]:
    await instance.channel.send_exec(channel, argv, {}, "/workspace")
    frames = await _until(instance, FrameKind.EXIT)
    out = b"".join(f.payload for f in frames if f.kind == FrameKind.STDOUT)
    return out, frames[-1]


async def test_detection_says_exactly_why(runtime: KataRuntime, containerd: Containerd) -> None:
    with trio.fail_after(T):
        found = await runtime.detect()
        assert found.available, found
        assert found.details["containerd"].startswith("1.")
        assert found.binary is not None and found.binary.endswith("containerd-shim-runc-v2")

        kata = KataRuntime([], runtime.data_dir, runtime.cgroups, address=containerd.address)
        missing = await kata.detect()
        if shutil.which("containerd-shim-kata-v2") is None:
            assert not missing.available
            assert missing.reason == (
                "containerd-shim-kata-v2 (runtime type io.containerd.kata.v2) not found on PATH"
            )
        nobody = KataRuntime(
            [], runtime.data_dir, runtime.cgroups,
            runtime_type=RUNC_RUNTIME_TYPE, address=str(containerd.directory / "none.sock"),
        )  # fmt: skip
        silent = await nobody.detect()
        assert not silent.available and silent.reason is not None
        assert silent.reason.endswith("none.sock: no socket there"), silent.reason
        # A socket that nobody serves.
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(nobody.address)
            silent = await nobody.detect()
        assert not silent.available and silent.reason is not None
        assert silent.reason.startswith("containerd does not answer at "), silent.reason
        os.unlink(nobody.address)


async def test_a_runc_sandbox_through_containerd_and_nothing_left(
    runtime: KataRuntime, containerd: Containerd
) -> None:
    with trio.fail_after(T):
        assert (await runtime.detect()).available
        sid = new_id("sbx")
        started = trio.current_time()
        instance = await runtime.start(_spec(sid))
        hello = await instance.channel.wait_hello()
        boot = trio.current_time() - started
        assert hello.protocol == 1
        assert containerd.ctr("containers", "list", "-q").split() == [sid]

        script = (
            "id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; "
            "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
            "touch /.sandstorm/x 2>&1 | grep -o 'Read-only'; "
            "echo written > /workspace/probe && cat /workspace/probe"
        )
        out, _ = await _run(instance, 1, ["/bin/sh", "-c", script])
        assert out.split() == [
            b"1000", b"CapEff:", b"0000000000000000", b"NoNewPrivs:", b"1", b"lo",
            b"Read-only", b"written",
        ], out  # fmt: skip
        # The image stays read-only on the host: the write went to the sandbox's tmpfs.
        assert not (ROOTFS / "workspace" / "probe").exists()
        out, _ = await _run(instance, 2, ["python3", "-c", "print('hello from python')"])
        assert out == b"hello from python\n"
        assert runtime.usage(sid).memory_bytes > 0

        # Nothing outside is reachable: no interface but loopback, no route.
        net = "import socket\ntry:\n socket.create_connection(('1.1.1.1', 53), 2)\n"
        net += " print('reached')\nexcept OSError as e:\n print('refused', e.errno)\n"
        out, _ = await _run(instance, 3, ["python3", "-c", net])
        assert out.startswith(b"refused"), out

        # A gateway that lost track of it: the reaper finds it; a new gateway reattaches.
        assert await runtime.list_orphans(set) == [sid]
        assert await runtime.list_orphans(lambda: {sid}) == []
        assert await runtime.surviving() == [sid]
        offset = instance.channel.offset
        await instance.detach()
        again = await runtime.reattach(sid, offset)
        await again.channel.send_ping(b"still")
        assert (await _until(again, FrameKind.PONG))[-1].payload == b"still"

        released = await runtime.destroy(sid)
        assert any(r.startswith("containerd task") for r in released), released
        assert any(r.startswith("mount ") for r in released), released
        await again.wait()
        if instance.process is not None:
            await instance.process.wait()
        assert await runtime.destroy(sid) == []  # idempotent
        assert not (await host_state(runtime.data_dir, runtime.cgroups.parent)).mentioning(sid)
        assert not containerd.shim_socket(sid).exists()
        assert containerd.leftovers() == []
    print(f"runc through containerd: start to agent hello {boot * 1000:.0f} ms")


async def test_out_of_memory_and_pids_limit(runtime: KataRuntime) -> None:
    with trio.fail_after(T):
        assert (await runtime.detect()).available
        sid = new_id("sbx")
        instance = await runtime.start(_spec(sid, memory=64 * MIB, pids=32))
        await instance.channel.wait_hello()
        bomb = (
            "import os, time\nn = 0\ntry:\n for _ in range(100):\n"
            "  if os.fork() == 0:\n   time.sleep(3); os._exit(0)\n  n += 1\n"
            "except OSError as e:\n print('stopped', n, e.errno)\n"
        )
        out, _ = await _run(instance, 1, ["python3", "-c", bomb])
        stopped, forked, code = out.split()
        assert stopped == b"stopped" and 16 <= int(forked) < 32 and code == b"11", out
        hog = "b = []\nwhile True:\n    b.append(bytearray(8 << 20))\n"
        await _run(instance, 2, ["python3", "-c", hog])
        assert runtime.out_of_memory(sid)
        await runtime.destroy(sid)
        await instance.wait()


# ------------------------------------------------------------------------- through the API


@pytest.fixture
async def kgw(
    start_gateway: Callable[..., Any], containerd: Containerd
) -> AsyncIterator[RunningGateway]:
    async with start_gateway(
        kata_runtime_type=RUNC_RUNTIME_TYPE, containerd_address=containerd.address
    ) as running:
        yield running


async def test_the_api_runs_kata_through_containerd(kgw: RunningGateway) -> None:
    program = "import sys\nfor line in sys.stdin:\n    print('echo:', line.strip(), flush=True)\n"
    with trio.fail_after(T):
        runtimes = {r["name"]: r for r in (await kgw.client.get("/v1/runtimes")).json()}
        assert runtimes["kata"]["available"], runtimes["kata"]
        assert runtimes["kata"]["capabilities"]["snapshot"] is False

        body = await kgw.run_ok(
            code="import os; print('hello', os.getuid())",
            language="python",
            isolation_level="strong",
            runtime_preference="kata",
        )
        assert (body["runtime"], body["result"]["stdout"]) == ("kata", "hello 1000\n"), body

        body = await kgw.run_ok(
            code="echo bash $BASH_VERSION | cut -c1-6",
            language="bash",
            runtime_preference="kata",
            isolation_level="strong",
            keep_alive=60,
        )
        assert body["result"]["stdout"] == "bash 5\n", body
        sid = body["id"]
        response = await kgw.client.post(f"/v1/sandboxes/{sid}/snapshot")
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "snapshot_unsupported"

        async with kgw.stream(sid) as ws:
            await ws.send_message(
                json.dumps({"type": "exec", "code": program, "language": "python"})
            )
            exec_id = (await next_frame(ws, "exec_accepted"))["exec_id"]
            await ws.send_message(
                json.dumps({"type": "stdin", "exec_id": exec_id, "data": "containerd\n"})
            )
            reply = ""
            while not reply.endswith("\n"):
                reply += (await next_frame(ws, "stdout"))["data"]
            assert reply == "echo: containerd\n"
            await ws.send_message(json.dumps({"type": "stdin_close", "exec_id": exec_id}))
            assert (await collect_until_exit(ws, exec_id))[-1]["result"]["verdict"] == "ok"

            await ws.send_message(json.dumps({"type": "exec", "command": ["sleep", "60"]}))
            exec_id = (await next_frame(ws, "exec_accepted"))["exec_id"]
            await trio.sleep(0.3)
            await ws.send_message(
                json.dumps({"type": "signal", "exec_id": exec_id, "signal": "SIGTERM"})
            )
            done = (await collect_until_exit(ws, exec_id))[-1]["result"]
            assert (done["signal"], done["verdict"]) == (15, "killed")

        response = await kgw.client.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"command": ["sh", "-c", "echo start; sleep 60"], "timeout": 1000},
        )
        assert response.status_code == 201, response.text
        timed = response.json()["result"]
        assert (timed["verdict"], timed["stdout"]) == ("timeout", "start\n"), timed
        response = await kgw.client.delete(f"/v1/sandboxes/{sid}")
        assert response.status_code == 200, response.text
        assert not (await host_state(kgw.data_dir, kgw.config.cgroup_parent or "")).mentioning(sid)

        body = await kgw.run_ok(
            code="b = []\nwhile True:\n    b.append(bytearray(8 << 20))\n",
            language="python",
            runtime_preference="kata",
            isolation_level="strong",
            memory_limit=64 * MIB,
        )
        # On a real kernel the OOM killer takes the hog, not the sandbox (gVisor loses the whole
        # sandbox): the exec dies of SIGKILL and the sandbox's cgroup recorded the OOM kill.
        result = body["result"]
        assert result["signal"] == 9 and result["verdict"] in ("oom", "killed"), body
