"""Planning on its own: what the store keeps of a sandbox's parameters, and the parameters a
restarted gateway rebuilds from a stored row, through a real SQLite store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sandstorm.actors.planning import Planner
from sandstorm.actors.sandbox import StoredParams
from sandstorm.api.selection import NoRuntime, Selected, select_runtime
from sandstorm.api.types import MIB, IsolationLevel, Mount, RunRequest, RuntimeName
from sandstorm.config import Config, load_config
from sandstorm.metrics import Metrics
from sandstorm.store import SandboxRecord, Store


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "allowed").mkdir()
    return load_config(
        None, data_dir=str(tmp_path / "data"), mount_allow_list=[str(tmp_path / "allowed")]
    )


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
