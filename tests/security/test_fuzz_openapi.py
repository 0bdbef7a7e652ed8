"""Schemathesis against the real gateway: no 5xx but 503, and every answer as documented.

Every operation of ``protocol/openapi.json`` is fuzzed over HTTP against a real server (real
runsc), with valid and invalid data, a bounded, derandomized number of examples each (CI runs the
same cases every time). The gateway is kept small (4 sandboxes, 256 MiB, 2 s runs, 1 s keep-alive)
so that most generated runs are refused at once (400, 503) instead of booting a sandbox each.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

schemathesis = pytest.importorskip("schemathesis")

import hypothesis  # noqa: E402
import requests  # noqa: E402
from hypothesis import HealthCheck, Phase  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness import RunningGateway  # noqa: E402

OPENAPI = Path(__file__).resolve().parents[2] / "protocol" / "openapi.json"
MAX_EXAMPLES = int(os.environ.get("SANDSTORM_FUZZ_EXAMPLES", "20"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MIB = 1024 * 1024
# An archive upload's body is bytes like any file's (a tar, or gzip of one).
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: report, do not minimise
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


class _Fuzzer:
    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.failures: list[str] = []
        self.previous: list[str] = []  # what came just before a request that got no answer
        self.made = 0

    def operation(self, operation: Any, mode: GenerationMode) -> None:
        label = f"{operation.label} [{mode.value}]"
        try:
            strategy = operation.as_strategy(generation_mode=mode)
        except Exception as exc:  # an operation with nothing to negate
            if mode is GenerationMode.NEGATIVE:
                return
            raise AssertionError(f"{label}: no strategy: {exc}") from exc

        @SETTINGS
        @hypothesis.given(case=strategy)
        def run(case: Any) -> None:
            self.made += 1
            request = f"{case.method} {case.formatted_path} body={case.body!r:.200}"
            try:
                response = case.call(base_url=self.url, session=self.session, timeout=20)
            except requests.RequestException as exc:
                self.failures.append(
                    f"{label} no answer: {exc!r:.300} ({request}; after {self.previous[-3:]})"
                )
                return
            self.previous.append(f"{request} -> {response.status_code} in {response.elapsed:.2f}s")
            try:
                case.validate_response(response, checks=CHECKS)
            except AssertionError as exc:  # schemathesis's FailureGroup is one
                self.failures.append(
                    f"{label} {response.status_code} {request}: {str(exc)[:600]} "
                    f"-> {response.text[:300]}"
                )

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            # Nothing in this operation can be made invalid (no parameters, no body).
            if mode is not GenerationMode.NEGATIVE:
                raise


def _fuzz(url: str) -> tuple[list[str], int]:
    """Every operation, both generation modes; returns (failures, requests made)."""
    schema = schemathesis.openapi.from_path(str(OPENAPI))
    fuzzer = _Fuzzer(url)
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzzer.operation(operation, mode)
    return fuzzer.failures, fuzzer.made


@pytest.mark.runsc
async def test_fuzz_every_operation(start_gateway: Callable[..., Any]) -> None:
    config = {
        "max_sandboxes": 4,
        "memory_budget": 256 * MIB,
        "max_memory_limit": 256 * MIB,
        "max_timeout_ms": 2000,
        "max_keep_alive_s": 1,
    }
    with trio.fail_after(240):
        async with start_gateway(**config) as gw:
            gw_: RunningGateway = gw
            # Some real ids, so that path parameters can also hit things that exist.
            await gw_.run_ok(command=["true"], keep_alive=1, memory_limit=64 * MIB, timeout=2000)
            failures, made = await trio.to_thread.run_sync(_fuzz, gw_.url)
            listed = (await gw_.client.get("/v1/sandboxes")).json()
    print(f"fuzz: {made} requests")
    assert made > 0
    assert not failures, f"{len(failures)} of {made} requests failed:\n" + "\n".join(failures[:40])
    assert isinstance(listed, dict), json.dumps(listed)[:200]
