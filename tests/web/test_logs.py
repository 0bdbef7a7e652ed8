"""Request ids on every response, and the structured JSON log of a real ``sandstorm serve``:
one object per line, the request's id (and sandbox id) in its lines, and no secrets anywhere."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import httpx
import trio
import trio_websocket

from sandstorm.logs import ContextFilter, JsonFormatter, LogContext, log_context, request_id_from
from tests.harness import RunningGateway
from tests.integration.gateway_process import gateway_process

UNKNOWN = "sbx_" + "0" * 26
GENERATED = re.compile(r"[0-9a-f]{32}")


async def test_every_response_carries_a_request_id(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        ok = await gw.client.get("/health", headers={"X-Request-Id": "client-id.1:a_b-c"})
        assert ok.headers["x-request-id"] == "client-id.1:a_b-c"
        # Unsafe or oversized ids are replaced, never echoed.
        for bad in ("has space", "x" * 129, 'quote"', "é"):
            response = await gw.client.get("/health", headers={"X-Request-Id": bad.encode("utf-8")})
            assert GENERATED.fullmatch(response.headers["x-request-id"]), bad
        fresh = {(await gw.client.get("/health")).headers["x-request-id"] for _ in range(3)}
        assert len(fresh) == 3 and all(GENERATED.fullmatch(i) for i in fresh)
        # Errors: 404, 400, 405.
        missing = await gw.client.get(f"/v1/sandboxes/{UNKNOWN}/status")
        assert missing.status_code == 404 and GENERATED.fullmatch(missing.headers["x-request-id"])
        bad_body = await gw.client.post(
            "/v1/sandboxes/run", content=b"{", headers={"X-Request-Id": "r-400"}
        )
        assert (bad_body.status_code, bad_body.headers["x-request-id"]) == (400, "r-400")
        wrong = await gw.client.put("/health", headers={"X-Request-Id": "r-405"})
        assert (wrong.status_code, wrong.headers["x-request-id"]) == (405, "r-405")
        # WebSocket: an accepted upgrade and a refused one.
        body = await gw.run_ok(command=["true"], keep_alive=60)
        ws_url = gw.url.replace("http://", "ws://")
        async with trio_websocket.open_websocket_url(
            f"{ws_url}/v1/sandboxes/{body['id']}/stream", extra_headers=[(b"x-request-id", b"ws-1")]
        ) as ws:
            assert (b"x-request-id", b"ws-1") in ws.handshake_headers
        # A refused upgrade, sent as plain HTTP (trio-websocket's ConnectionRejected path leaks
        # its socket; see test_stream.upgrade).
        refused = await gw.client.get(
            f"/v1/sandboxes/{UNKNOWN}/stream",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "X-Request-Id": "ws-404",
            },
        )
        assert (refused.status_code, refused.headers["x-request-id"]) == (404, "ws-404")
        await gw.client.delete(f"/v1/sandboxes/{body['id']}")


async def test_json_logs_of_a_real_gateway(
    runsc_required: None, data_dir: Path, cgroup_parent: str, tmp_path: Path
) -> None:
    secrets = ["s3cr3t-env-value", "s3cr3t-code-marker", "s3cr3t-stdin-text", "s3cr3t-token"]
    with trio.fail_after(90):
        async with (
            gateway_process(data_dir, tmp_path, cgroup_parent=cgroup_parent) as gp,
            httpx.AsyncClient(base_url=gp.url, timeout=60) as client,
        ):
            run = await client.post(
                "/v1/sandboxes/run",
                headers={"X-Request-Id": "req-run-1"},
                json={
                    "code": "import sys; print(sys.stdin.read() + 's3cr3t-code-marker')",
                    "language": "python",
                    "environment": {"TOKEN": "s3cr3t-env-value"},
                    "stdin": "s3cr3t-stdin-text",
                    "keep_alive": 0,
                },
            )
            assert run.status_code == 201, run.text
            sid = run.json()["id"]
            result = run.json()["result"]
            assert result["stdout"] == "s3cr3t-stdin-texts3cr3t-code-marker\n", result
            # Whatever the answer (no keys exist), the header is never logged.
            await client.get("/v1/runtimes", headers={"Authorization": "Bearer s3cr3t-token"})
            await client.get(f"/v1/sandboxes/{UNKNOWN}/status", headers={"X-Request-Id": "r-404"})
            while (await client.get(f"/v1/sandboxes/{sid}/status")).json()["state"] != "destroyed":
                await trio.sleep(0.05)
            gp.signal()
            assert await gp.wait() == 0
    text = gp.stderr.decode()
    for secret in secrets:
        assert secret not in text, secret
    lines = gp.log_lines()  # every line parses as JSON
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    access = [line for line in lines if line["logger"] == "sandstorm.access"]
    run_line = next(line for line in access if line.get("request_id") == "req-run-1")
    assert run_line["method"] == "POST" and run_line["path"] == "/v1/sandboxes/run"
    assert run_line["status"] == 201 and run_line["duration_ms"] > 0
    # The id of the sandbox the request created shows in the request's line.
    assert run_line["sandbox_id"] == sid
    missing = next(line for line in access if line.get("request_id") == "r-404")
    assert (missing["status"], missing["sandbox_id"]) == (404, UNKNOWN)
    # The sandbox actor's own lines name its sandbox, not the request that created it.
    own = [
        line
        for line in lines
        if line.get("sandbox_id") == sid and line["logger"] != "sandstorm.access"
    ]
    assert own and all("request_id" not in line for line in own), own


def test_formatter_fields_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sandstorm.test-logs")
    logger.addHandler(handler)
    logger.propagate = False
    token = log_context.set(LogContext(request_id="r1", sandbox_id="sbx_1", exec_id="exe_1"))
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed %s", "here")
        logger.warning("given", extra={"exec_id": "exe_2"})
    finally:
        log_context.reset(token)
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "failed here" and first["level"] == "ERROR"
    assert (first["request_id"], first["sandbox_id"], first["exec_id"]) == ("r1", "sbx_1", "exe_1")
    assert "ValueError: boom" in first["exception"]
    assert second["exec_id"] == "exe_2"
    assert request_id_from("ok-1") == "ok-1"
    assert GENERATED.fullmatch(request_id_from(None))
