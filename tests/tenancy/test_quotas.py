"""Per-tenant quotas on a real gateway: live sandboxes, their summed memory_limit, and running
execs (REST and stream). Over a limit: 429 quota_exceeded with Retry-After and the limit named;
another tenant goes on unaffected at the same moment."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from sandstorm.sdk import AsyncClient
from tests.harness import RunningGateway
from tests.tenancy.helpers import client_for, make_key

MIB = 1024 * 1024
IDLE: dict[str, Any] = {"command": ["true"], "keep_alive": 120, "memory_limit": 64 * MIB}


def _assert_quota(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["details"]["limit"] == limit
    retry = int(response.headers["retry-after"])
    assert 1 <= retry <= 3600
    assert error["details"]["retry_after"] == retry


async def _run(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/sandboxes/run", json={**IDLE, **body})


async def test_max_sandboxes_and_max_memory(gw: RunningGateway) -> None:
    with trio.fail_after(120):
        _, small = await make_key(gw.data_dir, "small", max_sandboxes=2)
        _, lean = await make_key(gw.data_dir, "lean", max_memory=100 * MIB)
        _, other = await make_key(gw.data_dir, "other")
        async with (
            client_for(gw, small) as s,
            client_for(gw, lean) as m,
            client_for(gw, other) as o,
        ):
            first = await _run(s)
            assert (await _run(s)).status_code == 201
            results: dict[str, httpx.Response] = {}

            async def call(name: str, client: httpx.AsyncClient, **body: Any) -> None:
                results[name] = await _run(client, **body)

            # Refused and admitted at the same time: the other tenant does not notice.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "refused", s)
                nursery.start_soon(call, "other", o)
            _assert_quota(results["refused"], "max_sandboxes")
            # Retry-After: when the oldest sandbox's keep_alive runs out, at most.
            assert int(results["refused"].headers["retry-after"]) <= 121
            assert results["other"].status_code == 201, results["other"].text

            assert (await _run(m, memory_limit=64 * MIB)).status_code == 201
            over = await _run(m, memory_limit=40 * MIB)
            _assert_quota(over, "max_memory")
            assert over.json()["error"]["details"]["in_use"] == 64 * MIB
            assert (await _run(m, memory_limit=32 * MIB)).status_code == 201  # fits: 96 MiB

            # Freeing a sandbox frees its share of the quota.
            await s.delete(f"/v1/sandboxes/{first.json()['id']}")
            while (created := await _run(s)).status_code == 429:
                await trio.sleep(0.05)  # the actor gives its reservation back as it ends
            assert created.status_code == 201, created.text


async def test_max_concurrent_execs_over_rest_and_stream(gw: RunningGateway) -> None:
    with trio.fail_after(120):
        _, one = await make_key(gw.data_dir, "one", max_concurrent_execs=1)
        _, other = await make_key(gw.data_dir, "other")
        async with client_for(gw, one) as t, client_for(gw, other) as o:
            busy = await _run(t, command=["sleep", "30"], wait=False)
            assert busy.status_code == 202, busy.text
            sid = busy.json()["id"]
            exec_path = f"/v1/sandboxes/{sid}/exec"
            _assert_quota(
                await t.post(exec_path, json={"command": ["true"]}), "max_concurrent_execs"
            )
            # A new sandbox's first exec counts too.
            _assert_quota(await _run(t), "max_concurrent_execs")
            # The other tenant, meanwhile, runs as many as it likes.
            theirs = await _run(o, command=["sleep", "30"], wait=False)
            oid = theirs.json()["id"]
            for _ in range(2):
                started = await o.post(
                    f"/v1/sandboxes/{oid}/exec", json={"command": ["true"], "wait": False}
                )
                assert started.status_code == 202, started.text

            # A stream's exec frame is refused the same way, with an error frame.
            async with AsyncClient(gw.url, api_key=one) as client, client.stream(sid) as stream:
                await stream.ws.send_message(
                    json.dumps({"type": "exec", "id": "r1", "command": ["true"]})
                )
                while True:
                    frame = json.loads(await stream.ws.get_message())
                    if frame["type"] == "error":
                        break
                assert frame["code"] == "quota_exceeded"

            # Once the running exec ends, the next one is admitted.
            signal = {"type": "signal", "exec_id": busy.json()["exec_id"], "signal": "SIGKILL"}
            async with AsyncClient(gw.url, api_key=one) as client, client.stream(sid) as stream:
                await stream.ws.send_message(json.dumps(signal))
            while (
                started := await t.post(exec_path, json={"command": ["true"]})
            ).status_code == 429:
                await trio.sleep(0.05)
            assert started.status_code == 201, started.text
