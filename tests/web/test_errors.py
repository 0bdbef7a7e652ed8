"""SPEC §3 errors and §5 bad input against a real server with real sandboxes (gVisor and QEMU).

Every error body is exactly ``{"error": {"code", "message", "details"}}``; every 400 names its
field in ``details.field``; no request in this module may ever get a 500. Mounts refused by the
allow-list (403) are in ``test_mounts.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sandstorm.config import DEFAULT_RUNTIME_PATHS
from sandstorm.ids import new_id
from tests.harness import RunningGateway, never_500, send_raw_request

MIB = 1024 * 1024
HELLO: dict[str, Any] = {"command": ["true"]}


# ------------------------------------------------------------------ helpers


def assert_error(
    response: httpx.Response, status: int, code: str, field: str | None = None
) -> dict[str, Any]:
    """The exact SPEC §3 error shape; returns ``details``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, body
    assert error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"].strip(), body
    details = error["details"]
    assert isinstance(details, dict), body
    if status == 400:
        assert isinstance(details.get("field"), str) and details["field"], body
    if field is not None:
        assert details.get("field") == field, body
    return details


def run_body(**fields: Any) -> dict[str, Any]:
    body = dict(HELLO)
    body.update(fields)
    return body


async def post_raw(gw: RunningGateway, path: str, content: bytes) -> httpx.Response:
    return await gw.client.post(path, content=content, headers={"content-type": "application/json"})


# ------------------------------------------------------------------ 400 invalid_request

BAD_RUNS: list[Any] = [
    pytest.param({"code": "x", "language": "cobol"}, "language", id="unknown-language"),
    pytest.param(run_body(runtime_preference="docker"), "runtime_preference", id="unknown-rt"),
    pytest.param(run_body(isolation_level="extreme"), "isolation_level", id="unknown-level"),
    pytest.param(run_body(timeout="30"), "timeout", id="timeout-string"),
    pytest.param(run_body(memory_limit=True), "memory_limit", id="memory-bool"),
    pytest.param(run_body(environment=["A=1"]), "environment", id="environment-list"),
    pytest.param(run_body(memory_limit=32 * MIB - 1), "memory_limit", id="memory-below-32MiB"),
    pytest.param(run_body(memory_limit=0), "memory_limit", id="memory-zero"),
    pytest.param(run_body(memory_limit=-1), "memory_limit", id="memory-negative"),
    pytest.param(run_body(memory_limit=8192 * MIB + 1), "memory_limit", id="memory-above-max"),
    pytest.param(run_body(memory_limit=1 << 60), "memory_limit", id="memory-huge"),
    pytest.param(run_body(cpu_limit=0), "cpu_limit", id="cpu-zero"),
    pytest.param(run_body(cpu_limit=1000), "cpu_limit", id="cpu-1000"),
    pytest.param(run_body(cpu_limit=-1.5), "cpu_limit", id="cpu-negative"),
    pytest.param(run_body(timeout=0), "timeout", id="timeout-zero"),
    pytest.param(run_body(timeout=-1), "timeout", id="timeout-negative"),
    pytest.param(run_body(timeout=1e308), "timeout", id="timeout-1e308"),
    pytest.param(run_body(timeout=10 * 60 * 1000 + 1), "timeout", id="timeout-above-max"),
    pytest.param(run_body(keep_alive=-1), "keep_alive", id="keep-alive-negative"),
    pytest.param(run_body(keep_alive=24 * 3600 + 1), "keep_alive", id="keep-alive-above-max"),
    pytest.param(
        {"code": "print(1)", "language": "python", "command": ["ls"]},
        "command",
        id="code-and-command",
    ),
    pytest.param({"language": "python"}, "code", id="neither-code-nor-command"),
    pytest.param({}, "code", id="empty-object"),
    pytest.param({"code": "print(1)"}, "language", id="code-without-language"),
    pytest.param(run_body(environment={"1BAD": "x"}), "environment", id="env-1BAD"),
    pytest.param(run_body(environment={"A-B": "x"}), "environment", id="env-A-B"),
    pytest.param(run_body(environment={"": "x"}), "environment", id="env-empty-name"),
    pytest.param(
        run_body(environment={f"V{i}": "x" for i in range(129)}),
        "environment",
        id="env-129-entries",
    ),
    pytest.param({"code": "print(1)\x00", "language": "python"}, "code", id="nul-in-code"),
    pytest.param({"command": ["echo", "a\x00b"]}, "command[1]", id="nul-in-argument"),
    pytest.param({"command": []}, "command", id="empty-command"),
    pytest.param(run_body(files={"input.txt": "x"}), "files.input.txt", id="files-relative"),
    pytest.param(
        run_body(files={"/workspace/../etc/x": "x"}), "files./workspace/../etc/x", id="files-dotdot"
    ),
    pytest.param(run_body(timout=5), "timout", id="unknown-field-typo"),
]
DESTINATIONS = ["data", "/workspace/../etc", "/workspace//data", "/workspace/data/", "/proc/x",
                "/.sandstorm", "/.sandstorm/agent", "/", "/dev/shm", "/sys"]  # fmt: skip
BAD_RUNS += [
    pytest.param(
        run_body(mounts=[{"source": "/tmp", "destination": d}]),
        "mounts[0].destination",
        id=f"mount-destination-{d}",
    )
    for d in DESTINATIONS
]


@pytest.mark.parametrize(("body", "field"), BAD_RUNS)
async def test_bad_run_is_400_naming_the_field(
    g: RunningGateway, body: dict[str, Any], field: str
) -> None:
    with trio.fail_after(g.seconds(20)):
        response = await g.run(**body)
    details = assert_error(response, 400, "invalid_request")
    if field.startswith("environment"):
        assert details["field"].startswith("environment"), details
    else:
        assert details["field"] == field, details


async def test_env_value_with_nul_is_400(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(20)):
        response = await g.run(**run_body(environment={"GOOD": "a\x00b"}))
    details = assert_error(response, 400, "invalid_request")
    assert details["field"] in ("environment", "environment.GOOD"), details


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(b'{"command": ["true"', "body", id="malformed-json"),
        pytest.param(b"{'command': ['true']}", "body", id="single-quotes"),
        pytest.param(b"", "body", id="empty-body"),
        pytest.param(b'{"code": "\\ud800", "language": "python"}', None, id="lone-surrogate"),
    ],
)
async def test_malformed_bodies_are_400(g: RunningGateway, raw: bytes, field: str | None) -> None:
    with trio.fail_after(g.seconds(20)):
        response = await post_raw(g, "/v1/sandboxes/run", raw)
    assert_error(response, 400, "invalid_request", field)


async def test_a_json_array_body_is_400_naming_a_field(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(20)):
        response = await post_raw(g, "/v1/sandboxes/run", b'[{"command": ["true"]}]')
    # details.field must be named (SPEC §5), e.g. "body"; it must not be null.
    assert_error(response, 400, "invalid_request")


async def test_invalid_utf8_in_the_body_is_400_not_500(g: RunningGateway) -> None:
    """SPEC §3: bodies are UTF-8; bytes that are not must be a 400, not an internal error."""
    with trio.fail_after(g.seconds(20)):
        response = await post_raw(
            g, "/v1/sandboxes/run", b'{"code": "print(\xff)", "language": "python"}'
        )
    assert response.status_code != 500, response.text
    assert_error(response, 400, "invalid_request")


async def test_resume_without_snapshot_id_names_the_field(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(20)):
        response = await g.client.post("/v1/sandboxes/resume", json={})
    assert_error(response, 400, "invalid_request", "snapshot_id")


async def test_bad_exec_bodies_are_400(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(30)):
        sid = (await g.run_ok(command=["true"]))["id"]
        cases: list[tuple[Any, str]] = [
            ({"command": ["ls"], "cwd": "tmp"}, "cwd"),
            ({"command": ["ls"], "cwd": "/proc/1"}, "cwd"),
            ({"command": ["ls"], "timeout": 10 * 60 * 1000 + 1}, "timeout"),
            ({"command": ["ls"], "timeout": "1"}, "timeout"),
            ({"command": ["ls"], "keep_alive": 5}, "keep_alive"),
            ({"code": "1", "language": "python", "command": ["ls"]}, "command"),
            ({"code": "1"}, "language"),
            ({"command": ["a\x00"]}, "command[0]"),
            ({"command": ["ls"], "environment": {"A-B": "1"}}, "environment"),
        ]
        for body, field in cases:
            response = await g.client.post(f"/v1/sandboxes/{sid}/exec", json=body)
            assert_error(response, 400, "invalid_request", field)
        # The sandbox is still fine after all of that.
        response = await g.client.post(f"/v1/sandboxes/{sid}/exec", json={"command": ["true"]})
        assert response.status_code == 201, response.text


# ------------------------------------------------------------------ 404 not_found


async def test_unknown_sandbox_is_404_on_every_route(g: RunningGateway) -> None:
    ids = [new_id("sbx"), "sbx_123", "nope", new_id("snp"), "sbx_" + "I" * 26, "..%2F..%2Fetc"]
    with trio.fail_after(g.seconds(30)):
        for sid in ids:
            for method, path, body in [
                ("GET", f"/v1/sandboxes/{sid}/status", None),
                ("DELETE", f"/v1/sandboxes/{sid}", None),
                ("POST", f"/v1/sandboxes/{sid}/exec", HELLO),
                ("POST", f"/v1/sandboxes/{sid}/exec", {"bogus": 1}),
                ("GET", f"/v1/sandboxes/{sid}/execs/{new_id('exe')}", None),
                ("POST", f"/v1/sandboxes/{sid}/snapshot", None),
                ("POST", f"/v1/sandboxes/{sid}/snapshot", {"leave_running": False}),
            ]:
                response = await g.client.request(method, path, json=body)
                assert_error(response, 404, "not_found")


async def test_unknown_exec_is_404(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(30)):
        sid = (await g.run_ok(command=["true"]))["id"]
        for eid in (new_id("exe"), "exe_bad", sid):
            response = await g.client.get(f"/v1/sandboxes/{sid}/execs/{eid}")
            assert_error(response, 404, "not_found")


async def test_unknown_snapshot_is_404(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(30)):
        for snap in (new_id("snp"), "snp_bad", "../../etc", new_id("sbx")):
            response = await g.client.post("/v1/sandboxes/resume", json={"snapshot_id": snap})
            assert_error(response, 404, "not_found")
            response = await g.client.delete(f"/v1/snapshots/{snap}")
            assert_error(response, 404, "not_found")
            # There is no GET of one snapshot: whatever it answers is the JSON error format.
            response = await g.client.get(f"/v1/snapshots/{snap}")
            assert response.status_code == 404
            assert_error(response, response.status_code, response.json()["error"]["code"])


async def test_unknown_route_is_404_json(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(20)):
        for path in ("/v1/nope", "/nope", "/v1/sandboxes/run/extra", "/v2/sandboxes"):
            response = await g.client.get(path)
            assert_error(response, 404, "not_found")


async def test_wrong_method_is_405_json(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(20)):
        for method, path in [
            ("GET", "/v1/sandboxes/run"),
            ("PUT", "/v1/sandboxes/run"),
            ("DELETE", "/v1/runtimes"),
            ("POST", "/health"),
            ("PATCH", f"/v1/sandboxes/{new_id('sbx')}"),
        ]:
            response = await g.client.request(method, path)
            assert response.status_code == 405, (method, path, response.text)
            assert_error(response, 405, response.json()["error"]["code"])


# ------------------------------------------------------------------ 409 sandbox_not_running


async def test_destroyed_sandbox_is_409_for_exec_and_snapshot(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(30)):
        sid = (await g.run_ok(command=["true"]))["id"]
        assert (await g.client.delete(f"/v1/sandboxes/{sid}")).status_code == 200
        response = await g.client.post(f"/v1/sandboxes/{sid}/exec", json=HELLO)
        assert_error(response, 409, "sandbox_not_running")
        response = await g.client.post(f"/v1/sandboxes/{sid}/snapshot", json={})
        assert_error(response, 409, "sandbox_not_running")
        response = await g.client.post(f"/v1/sandboxes/{sid}/snapshot")
        assert_error(response, 409, "sandbox_not_running")
        # Status still answers for the ended sandbox.
        assert (await g.status(sid))["state"] == "destroyed"


# ------------------------------------------------------------------ 413 payload_too_large


async def test_body_over_16_mib_is_413_before_it_is_read(g: RunningGateway) -> None:
    assert g.config.max_body_bytes == 16 * MIB
    host, port = g.url.removeprefix("http://").split(":")
    with trio.fail_after(g.seconds(30)):
        # Announce 17 MiB and send only the first KiB of it: the answer must come anyway, which
        # shows the gateway refused the body from its length without waiting to read it.
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                b"POST /v1/sandboxes/run HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {17 * MIB}\r\n\r\n".encode()
                + b'{"command": ["true"], "stdin": "'
                + b"x" * 1024
            )
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413")
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "payload_too_large"
        # The server is fine, and so is the next client.
        assert (await g.client.get("/health")).status_code == 200


async def test_small_configured_body_limit(start_gateway: Callable[..., Any]) -> None:
    payload = b'{"command": ["true"], "stdin": "' + b"x" * 2048 + b'"}'
    with trio.fail_after(30):
        async with start_gateway(max_body_bytes=1024) as gw:
            never_500(gw)
            response = await post_raw(gw, "/v1/sandboxes/run", payload)
            assert_error(response, 413, "payload_too_large")

            # No Content-Length: the limit must hold while streaming too.
            raw = await send_raw_request(
                gw.url, "/v1/sandboxes/run", payload, chunked=True, chunk_size=256
            )
            assert raw.status == 413
            assert raw.json()["error"]["code"] == "payload_too_large"
            response = await gw.run(command=["true"], keep_alive=0)
            assert response.status_code == 201, response.text


# ------------------------------------------------------------------ 503


async def test_a_broken_runsc_is_an_unavailable_runtime_not_a_dead_gateway(
    start_gateway: Callable[..., Any], tmp_path: Path
) -> None:
    broken = tmp_path / "runsc"
    broken.write_text("#!/bin/sh\necho 'runsc: cannot load its configuration' >&2\nexit 3\n")
    broken.chmod(0o755)
    paths = {name: list(p) for name, p in DEFAULT_RUNTIME_PATHS.items()}
    paths["gvisor"] = [str(broken)]
    paths["qemu"] = ["/nonexistent/qemu-system-x86_64"]
    with trio.fail_after(30):
        async with start_gateway(runtime_paths=paths) as g:
            never_500(g)
            runtimes = {r["name"]: r for r in (await g.client.get("/v1/runtimes")).json()}
            gvisor = runtimes["gvisor"]
            assert not gvisor["available"], gvisor
            assert "exit status 3" in gvisor["reason"], gvisor
            assert "cannot load its configuration" in gvisor["reason"], gvisor
            assert (await g.client.get("/health")).status_code == 200
            details = assert_error(await g.run(command=["true"]), 503, "runtime_unavailable")
            assert details["candidates"], details


async def test_maximum_isolation_is_503_runtime_unavailable(
    start_gateway: Callable[..., Any],
) -> None:
    # Every VM runtime out of reach (qemu runs VMs here; kata and firecracker might elsewhere).
    nowhere = {name: [f"/nonexistent/{name}"] for name in ("kata", "firecracker", "qemu")}
    paths = {name: list(p) for name, p in DEFAULT_RUNTIME_PATHS.items()} | nowhere
    async with start_gateway(runtime_paths=paths) as g:
        await _maximum_is_refused(g)


async def _maximum_is_refused(g: RunningGateway) -> None:
    runtimes = {r["name"]: r for r in (await g.client.get("/v1/runtimes")).json()}
    assert not any(runtimes[n]["available"] for n in ("kata", "firecracker", "qemu")), runtimes
    with trio.fail_after(20):
        response = await g.run(**run_body(isolation_level="maximum"))
        details = assert_error(response, 503, "runtime_unavailable")
        candidates = details["candidates"]
        assert set(candidates) == {"gvisor", "kata", "firecracker", "qemu"}, details
        assert all(isinstance(v, str) and v for v in candidates.values()), candidates
        assert "maximum" in candidates["gvisor"]
        for name in ("kata", "firecracker", "qemu"):
            assert candidates[name] == runtimes[name]["reason"], (name, candidates)
        # A preference does not change it.
        response = await g.run(**run_body(isolation_level="maximum", runtime_preference="gvisor"))
        assert_error(response, 503, "runtime_unavailable")


@pytest.mark.runtimes("gvisor")  # about selection, which this test drives itself
async def test_strong_without_kata_falls_back_to_gvisor(g: RunningGateway) -> None:
    runtimes = {r["name"]: r for r in (await g.client.get("/v1/runtimes")).json()}
    if runtimes["kata"]["available"]:
        pytest.skip("kata is available here")
    with trio.fail_after(g.seconds(20)):
        body = await g.run_ok(command=["true"], isolation_level="strong", keep_alive=0)
    assert (body["runtime"], body["selection"]) == ("gvisor", "fallback")
    assert body["isolation_level"] == "strong"


async def test_at_capacity_is_503_with_retry_after(start_gateway: Callable[..., Any]) -> None:
    with trio.fail_after(60):
        async with start_gateway(max_sandboxes=1) as gw:
            never_500(gw)
            first = await gw.run_ok(command=["true"])
            response = await gw.run(command=["true"])
            assert_error(response, 503, "at_capacity")
            retry_after = response.headers.get("retry-after")
            assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
            # Bad input is still a 400 at capacity (validation comes first).
            assert_error(await gw.run(command=[]), 400, "invalid_request", "command")
            # Deleting the one sandbox frees the slot.
            assert (await gw.client.delete(f"/v1/sandboxes/{first['id']}")).status_code == 200
            second = await gw.run_ok(command=["echo", "ok"], keep_alive=0)
            assert second["result"]["stdout"] == "ok\n"


# ------------------------------------------------------------------ DELETE


async def test_delete_is_idempotent_and_says_what_it_freed(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(30)):
        sid = (await g.run_ok(command=["true"]))["id"]
        first = await g.client.delete(f"/v1/sandboxes/{sid}")
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["id"] == sid and body["state"] == "destroyed"
        released = body["released"]
        assert any("cgroup" in r for r in released), released
        assert any(g.directory_word in r for r in released), released
        second = await g.client.delete(f"/v1/sandboxes/{sid}")
        assert second.status_code == 200, second.text
        assert second.json() == {"id": sid, "state": "destroyed", "released": []}


async def test_concurrent_deletes_free_once(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(30)):
        sid = (await g.run_ok(command=["sleep", "30"], wait=False))["id"]
        responses: list[httpx.Response] = []

        async def delete() -> None:
            responses.append(await g.client.delete(f"/v1/sandboxes/{sid}"))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(delete)
        assert [r.status_code for r in responses] == [200, 200, 200]
        released = [r.json()["released"] for r in responses]
        assert sum(1 for r in released if r) == 1, released


# ------------------------------------------------------------------ 429 quota_exceeded


async def test_too_many_execs_in_one_sandbox_is_429(start_gateway: Callable[..., Any]) -> None:
    async with start_gateway(max_execs_per_sandbox=1) as gw:
        never_500(gw)
        with trio.fail_after(30):
            body = await gw.run_ok(command=["sleep", "5"], wait=False)
            response = await gw.client.post(
                f"/v1/sandboxes/{body['id']}/exec", json={"command": ["true"]}
            )
            assert_error(response, 429, "quota_exceeded")
            assert response.headers["Retry-After"] == "1"
            await gw.client.delete(f"/v1/sandboxes/{body['id']}")
