"""Shared fixtures: a real gateway (real Hypercorn on port 0, real runsc sandboxes) per test.

The default image is built once by the set-up script into ``SANDSTORM_TEST_DATA_DIR`` (default
``/var/lib/sandstorm``); each test gets a fresh data directory that links to that image, its own
runsc state root and its own cgroup parent, so tests never see each other's sandboxes.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sandstorm import logs
from sandstorm.api.types import RuntimeName
from sandstorm.config import Config, load_config
from sandstorm.images import load_manifest
from sandstorm.images.vm import load_vm_manifest
from sandstorm.main import serve
from sandstorm.runtimes.cgroups import V1_ALL, SandboxCgroups
from tests.harness import RunningGateway, RuntimeRouting
from tests.hoststate import HostState, host_mounts_under, settled_state

IMAGE_DATA_DIR = Path(os.environ.get("SANDSTORM_TEST_DATA_DIR", "/var/lib/sandstorm"))
TESTS = Path(__file__).resolve().parent


def runsc_usable() -> str | None:
    """Why real-sandbox tests cannot run here, or None when they can."""
    if shutil.which("runsc") is None:
        return "runsc is not installed (run scripts/install.sh)"
    if os.geteuid() != 0:
        return "runsc sandboxes need root"
    if load_manifest(IMAGE_DATA_DIR) is None:
        return f"no default image in {IMAGE_DATA_DIR} (run `sandstorm image build`)"
    return None


def require(reason: str | None) -> None:
    """``reason``: what this machine lacks for the test, or None. Under CI, where the install
    script has put everything in place, a missing piece fails the test; elsewhere it skips."""
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def runsc_required() -> None:
    require(runsc_usable())


@pytest.fixture
def isolated_logging() -> Iterator[None]:
    """For a test that runs ``sandstorm`` in-process: its ``logs.configure`` points the root
    logger at this test's captured stderr through a writer thread; afterwards the writer is
    stopped and the root logger given back, so later tests never log into a closed capture."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logs._stop_writer()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    # Share the one built image; everything else (runsc root, bundles, snapshots) is per test.
    (d / "images").symlink_to(IMAGE_DATA_DIR / "images")
    return d


@pytest.fixture
def cgroup_parent() -> Iterator[str]:
    name = f"sandstorm-test-{secrets.token_hex(4)}"
    yield name
    cg = SandboxCgroups(name)
    for sid in cg.list_ids():
        cg.remove(sid)
    for d in cg._dirs("", V1_ALL):
        if d.is_dir():
            os.rmdir(d)


GatewayFactory = Callable[..., Any]

#: The runtimes every API test runs on: gVisor, and a QEMU microVM (TCG where there is no KVM).
#: A test that takes ``gw`` (or ``sandbox_runtime``) under these folders of tests/ (tests/web,
#: not tests/unit/web) runs once per runtime: the API and its security properties must hold on
#: each. Elsewhere (CLI and client, tenancy, the console) the runtime plays no part and gVisor
#: serves. ``@pytest.mark.runtimes("gvisor")`` narrows a test that is about one runtime only.
SANDBOX_RUNTIMES: tuple[RuntimeName, ...] = ("gvisor", "qemu")
EVERY_RUNTIME_IN = frozenset({"web", "security"})
#: A TCG boot takes seconds, more while other work loads the machine: a generous boot deadline.
VM_OVERRIDES: dict[str, Any] = {"boot_timeout_s": 90.0}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sandbox_runtime" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("runtimes")
    if marker is not None:
        runtimes = marker.args
    elif metafunc.definition.path.resolve().relative_to(TESTS).parts[0] in EVERY_RUNTIME_IN:
        runtimes = SANDBOX_RUNTIMES
    else:
        runtimes = ("gvisor",)
    metafunc.parametrize("sandbox_runtime", runtimes)


def vm_image_missing() -> str | None:
    if load_vm_manifest(IMAGE_DATA_DIR) is None:
        return f"no VM image in {IMAGE_DATA_DIR} (sandstorm image build --vm)"
    return None


@pytest.fixture
def start_gateway(runsc_required: None, data_dir: Path, cgroup_parent: str) -> Callable[..., Any]:
    """``async with start_gateway(**config_overrides) as gw:`` — a real server on port 0.

    ``sandbox_runtime="qemu"`` serves the sandboxes a test creates from QEMU microVMs: requests
    that name neither an isolation level nor a runtime ask for ``maximum`` (see
    ``RuntimeRouting``), and the test fails at once if qemu cannot run here."""

    @asynccontextmanager
    async def factory(
        *, sandbox_runtime: RuntimeName = "gvisor", **overrides: Any
    ) -> AsyncIterator[RunningGateway]:
        if sandbox_runtime != "gvisor":
            require(vm_image_missing())
            for name, value in VM_OVERRIDES.items():
                overrides.setdefault(name, value)
        # A test's gateway ends by cancellation: its sandboxes go with it unless a test asks
        # otherwise (the teardown proof below checks).
        overrides.setdefault("on_shutdown", "destroy")
        # No warm pool unless a test asks for one: pool boots would load every other test.
        overrides.setdefault("warm_pool", [])
        config = load_config(
            None,
            host="127.0.0.1",
            port=0,
            data_dir=str(data_dir),
            cgroup_parent=cgroup_parent,
            **overrides,
        )
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(_serve_quietly, config)
            url = binds[0]
            routing = RuntimeRouting(httpx.AsyncHTTPTransport(), sandbox_runtime)
            async with httpx.AsyncClient(base_url=url, timeout=120, transport=routing) as client:
                running = RunningGateway(url, client, config, data_dir, sandbox_runtime)
                if sandbox_runtime != "gvisor":
                    await running.require_runtime()
                yield running
            nursery.cancel_scope.cancel()
        # Teardown proof: whatever the test did, the gateway's shutdown left nothing on the host.
        with trio.fail_after(30):
            left = await settled_state(data_dir, cgroup_parent, HostState.is_empty, seconds=10)
        assert left.is_empty(), f"the gateway left this on the host: {left}"
        assert not host_mounts_under(data_dir), host_mounts_under(data_dir)

    return factory


async def _serve_quietly(config: Config, *, task_status: trio.TaskStatus[list[str]]) -> None:
    await serve(config, task_status=task_status, handle_signals=False)


@pytest.fixture
async def gw(
    start_gateway: Callable[..., Any], sandbox_runtime: RuntimeName
) -> AsyncIterator[RunningGateway]:
    async with start_gateway(sandbox_runtime=sandbox_runtime) as running:
        yield running
