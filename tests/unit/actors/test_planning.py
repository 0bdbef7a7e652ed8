"""Planning on its own: the checks of a whole run request and its mounts against the host
(every refusal an ``InvalidRequest`` or ``MountNotAllowed`` naming its field), what the store
keeps of a sandbox's parameters, and the parameters a restarted gateway rebuilds from a stored
row, through a real SQLite store."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sandstorm.actors.planning import Planner, check_run, resolve_mount
from sandstorm.actors.sandbox import StoredParams
from sandstorm.api.selection import NoRuntime, Selected, select_runtime
from sandstorm.api.types import MIB, IsolationLevel, Mount, RunRequest, RuntimeName
from sandstorm.config import Config, load_config
from sandstorm.errors import InvalidRequest, MountNotAllowed
from sandstorm.metrics import Metrics
from sandstorm.store import SandboxRecord, Store


def run(**fields: Any) -> RunRequest:
    fields.setdefault("command", ["true"])
    return RunRequest(**fields)


def gvisor_only(level: IsolationLevel, preference: RuntimeName | None) -> Selected | NoRuntime:
    return select_runtime(level, preference, {}, supported={"gvisor": ("standard", "strong")})


@pytest.fixture
def planner(config: Config, tmp_path: Path) -> Planner:
    return Planner(config, tmp_path / "rootfs", {"python"}, Metrics(process=False), gvisor_only)


def _stored_row(tmp_path: Path, sandbox_id: str, params: dict[str, Any]) -> SandboxRecord:
    """``params`` written as the gateway writes a sandbox's row, and read back."""
    store = Store(tmp_path).open()
    try:
        store.put_sandbox(
            SandboxRecord(
                id=sandbox_id, tenant="t", runtime="gvisor", state="running", params=params,
                created_at=time.time(),
            )
        )  # fmt: skip
        record = store.get_sandbox(sandbox_id)
    finally:
        store.close()
    assert record is not None
    return record


def test_a_run_is_stored_without_its_secrets_and_taken_over_as_it_was(
    planner: Planner, tmp_path: Path
) -> None:
    req = RunRequest(
        code="print('secret code')",
        language="python",
        environment={"TOKEN": "secret value"},
        files={"/workspace/b.txt": "secret file", "/workspace/a.txt": "x"},
        mounts=[Mount(source=str(tmp_path / "allowed"), destination="/data", read_only=False)],
        memory_limit=256 * MIB,
        cpu_limit=0.5,
        timeout=5000,
        keep_alive=30,
        stdin="secret stdin",
    )
    planned = planner.run(req, "t")
    record = _stored_row(tmp_path, planned.params.sandbox_id, planned.stored.to_record())
    row = record.params
    assert "secret" not in json.dumps(row)
    assert row["environment_names"] == ["TOKEN"]
    assert row["files"] == ["/workspace/a.txt", "/workspace/b.txt"]
    assert row["language"] == "python" and row["selection"] == "default"
    assert StoredParams.from_record(row) == planned.stored
    taken = planner.taken_over(record)
    assert taken == planned.params
    assert taken.spec.mounts[0].source == tmp_path / "allowed"


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(
            {
                "isolation_level": "strong", "runtime_preference": None, "language": "sh",
                "cpu_limit": 2, "memory_limit": 128 * MIB, "timeout": 1000, "keep_alive": 60,
                "environment_names": ["A"], "files": [], "selection": "fallback",
                "image": "other", "mounts": [
                    {"source": "/srv/data", "destination": "/data", "read_only": True}
                ],
            },
            id="run",
        ),
        pytest.param(
            {
                "isolation_level": "strong", "cpu_limit": 2.0, "memory_limit": 128 * MIB,
                "timeout": 1000, "keep_alive": 60, "restored_from": "snp_1", "mounts": [
                    {"source": "/srv/data", "destination": "/data", "read_only": True}
                ], "selection": "fallback", "image": "other",
            },
            id="resume",
        ),
    ],
)  # fmt: skip
def test_stored_rows_rebuild_their_parameters(
    planner: Planner, tmp_path: Path, params: dict[str, Any]
) -> None:
    taken = planner.taken_over(_stored_row(tmp_path, "sbx_1", params))
    assert (taken.sandbox_id, taken.tenant, taken.runtime_name) == ("sbx_1", "t", "gvisor")
    assert (taken.isolation_level, taken.selection, taken.image) == ("strong", "fallback", "other")
    assert (taken.spec.cpu_limit, taken.spec.memory_limit) == (2.0, 128 * MIB)
    assert (taken.timeout_ms, taken.keep_alive_s) == (1000, 60)
    assert taken.restored_from == params.get("restored_from")
    assert [(str(m.source), m.destination, m.read_only) for m in taken.spec.mounts] == [
        ("/srv/data", "/data", True)
    ]


def test_a_row_without_choices_takes_the_defaults(
    planner: Planner, config: Config, tmp_path: Path
) -> None:
    row = {"isolation_level": "standard", "cpu_limit": 1.0, "memory_limit": 64 * MIB,
           "timeout": 1000, "keep_alive": 5}  # fmt: skip
    taken = planner.taken_over(_stored_row(tmp_path, "sbx_2", row))
    assert (taken.selection, taken.image, taken.spec.mounts) == ("preference", config.image, ())


def test_a_row_without_its_limits_cannot_be_taken_over(planner: Planner, tmp_path: Path) -> None:
    row = {"memory_limit": 1 << 26, "cpu_limit": 1.0, "timeout": 1000}
    with pytest.raises(msgspec.ValidationError):
        planner.taken_over(_stored_row(tmp_path, "sbx_3", row))


# ------------------------------------------------------------------ mounts


def test_mount_inside_the_allow_list_resolves(config: Config, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    spec = resolve_mount(Mount(source=str(allowed), destination="/workspace/data"), 0, config)
    assert spec.source == allowed.resolve()
    assert spec.destination == "/workspace/data"
    assert spec.read_only is True
    spec = resolve_mount(
        Mount(source=str(allowed / "file.txt"), destination="/data.txt", read_only=False), 0, config
    )
    assert spec.read_only is False


def test_mount_through_a_symlink_is_resolved_to_its_target(config: Config, tmp_path: Path) -> None:
    link = tmp_path / "outside-link"
    link.symlink_to(tmp_path / "allowed")
    spec = resolve_mount(Mount(source=str(link), destination="/d"), 0, config)
    assert spec.source == (tmp_path / "allowed").resolve()


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("/", id="root"),
        pytest.param("/proc", id="proc"),
        pytest.param("/proc/self", id="proc-self"),
        pytest.param("/etc", id="etc"),
        pytest.param("/tmp", id="tmp"),
        pytest.param("{tmp}", id="parent-of-allowed-and-data"),
        pytest.param("{tmp}/data", id="data-dir"),
        pytest.param("{tmp}/elsewhere", id="outside"),
        pytest.param("{tmp}/allowed/../data", id="dotdot-escape"),
        pytest.param("{tmp}/allowed/escape", id="symlink-escape"),
        pytest.param("{tmp}/allowed/root", id="symlink-to-root"),
        pytest.param("{tmp}/allowedx", id="sibling-with-the-same-prefix"),
        pytest.param("{tmp}/allowed/missing/../../data", id="dotdot-through-missing"),
    ],
)
def test_mount_sources_outside_the_allow_list_are_refused(
    config: Config, tmp_path: Path, source: str
) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "allowedx").mkdir()
    (tmp_path / "allowed" / "escape").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "allowed" / "root").symlink_to("/")
    mount = Mount(source=source.format(tmp=tmp_path), destination="/workspace/data")
    with pytest.raises(MountNotAllowed) as info:
        resolve_mount(mount, 2, config)
    assert info.value.status == 403 and info.value.code == "mount_not_allowed"
    assert info.value.details["field"] == "mounts[2].source"


def test_no_allow_list_refuses_every_mount(tmp_path: Path) -> None:
    config = load_config(None, data_dir=str(tmp_path / "data"))
    assert config.mount_allow_list == []
    with pytest.raises(MountNotAllowed):
        resolve_mount(Mount(source=str(tmp_path), destination="/d"), 0, config)


def test_data_dir_is_refused_even_when_allowed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sandboxes").mkdir(parents=True)
    config = load_config(None, data_dir=str(data), mount_allow_list=[str(tmp_path)])
    for source in (data, data / "sandboxes", tmp_path):
        with pytest.raises(MountNotAllowed):
            resolve_mount(Mount(source=str(source), destination="/d"), 0, config)


def test_relative_source_and_missing_source(config: Config, tmp_path: Path) -> None:
    with pytest.raises((InvalidRequest, MountNotAllowed)) as info:
        resolve_mount(Mount(source="allowed", destination="/d"), 0, config)
    assert info.value.details["field"] == "mounts[0].source"
    with pytest.raises(InvalidRequest) as missing:
        resolve_mount(Mount(source=str(tmp_path / "allowed" / "nope"), destination="/d"), 0, config)
    assert missing.value.field == "mounts[0].source"


def test_bad_destination_is_checked_before_the_source(config: Config) -> None:
    # Even a refused source: the 400 for the destination comes first, with its field.
    with pytest.raises(InvalidRequest) as info:
        resolve_mount(Mount(source="/", destination="relative"), 1, config)
    assert info.value.field == "mounts[1].destination"


# ------------------------------------------------------------------ whole requests


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param({"cpu_limit": 1000.0}, "cpu_limit", id="cpu-above-host"),
        pytest.param({"memory_limit": 8192 * MIB + 1}, "memory_limit", id="memory-above-max"),
        pytest.param({"timeout": 10 * 60 * 1000 + 1}, "timeout", id="timeout-above-max"),
        pytest.param({"keep_alive": 24 * 3600 + 1}, "keep_alive", id="keep-alive-above-max"),
        pytest.param({"files": {"input.txt": "x"}}, "files.input.txt", id="files-relative"),
        pytest.param({"files": {"/proc/x": "x"}}, "files./proc/x", id="files-proc"),
        pytest.param({"environment": {"1BAD": "x"}}, "environment", id="env-name"),
        pytest.param(
            {"mounts": [Mount(source="/x", destination="/proc/x")]},
            "mounts[0].destination",
            id="mount-proc",
        ),
        pytest.param(
            {
                "mounts": [
                    Mount(source="{allowed}", destination="/d"),
                    Mount(source="{allowed}", destination="/d"),
                ]
            },
            "mounts",
            id="mount-duplicate-destination",
        ),
    ],
)
def test_check_run_refusals(
    config: Config, tmp_path: Path, fields: dict[str, Any], field: str
) -> None:
    if "mounts" in fields:
        allowed = str(tmp_path / "allowed")
        fields["mounts"] = [
            Mount(source=m.source.format(allowed=allowed), destination=m.destination)
            for m in fields["mounts"]
        ]
    with pytest.raises(InvalidRequest) as info:
        check_run(run(**fields), config)
    assert info.value.field == field


def test_check_run_limits_are_inclusive(config: Config, tmp_path: Path) -> None:
    cpus = os.cpu_count() or 1
    mounts = check_run(
        run(
            cpu_limit=float(cpus),
            memory_limit=config.max_memory_limit,
            timeout=config.max_timeout_ms,
            keep_alive=config.max_keep_alive_s,
            files={"/workspace/a.txt": "x", "/tmp/b": "y"},
            mounts=[Mount(source=str(tmp_path / "allowed"), destination="/workspace/data")],
        ),
        config,
    )
    assert [m.destination for m in mounts] == ["/workspace/data"]
