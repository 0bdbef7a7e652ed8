"""Hostile request bodies and stream frames (SPEC §3, §5) through the real HTTP path.

Raw bytes go to a real server (real runsc): oversized bodies get 413 before being read whole;
pathological JSON (100,000-deep nesting, duplicate keys, lone surrogates, NUL, huge or negative
numbers, NaN, trailing garbage, a BOM) gets 400 ``invalid_request`` naming the field (``body``
when none applies), never a 500 and never a hang; the same faults in WebSocket client frames get
an ``error`` frame and the socket stays usable.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest
import trio

from sandstorm.api.decoding import find_duplicate_key
from tests.harness import RunningGateway, never_500, send_raw_request

# Request parsing and validation happen before any runtime is chosen.
pytestmark = pytest.mark.runtimes("gvisor")

MIB = 1024 * 1024
DEEP = 100_000
JSON = {"content-type": "application/json"}


@pytest.fixture
def g(gw: RunningGateway) -> RunningGateway:
    never_500(gw)
    return gw


def assert_400(response: httpx.Response, field: str, case: str) -> None:
    assert response.status_code == 400, (case, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["code"] == "invalid_request", (case, error)
    assert error["details"].get("field") == field, (case, error)
    assert error["message"], (case, error)


# (name, raw body, field named) for POST /v1/sandboxes/run.
RUN_CASES: list[tuple[str, bytes, str]] = [
    ("deep-array-in-code", b'{"code":' + b"[" * DEEP + b"]" * DEEP + b"}", "code"),
    (
        "deep-object-in-environment",
        b'{"environment":' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}",
        "environment",
    ),
    ("deep-array-body", b"[" * DEEP + b"]" * DEEP, "body"),
    ("deep-unclosed", b'{"code":' + b"[" * DEEP, "code"),
    ("deep-unknown-field", b'{"x":' + b'{"x":' * DEEP + b"1" + b"}" * DEEP + b"}", "x"),
    ("dup-top", b'{"command":["true"],"timeout":1000,"timeout":2000}', "timeout"),
    ("dup-command", b'{"command":["true"],"command":["false"]}', "command"),
    ("dup-env", b'{"command":["true"],"environment":{"A":"1","B":"2","A":"3"}}', "environment.A"),
    (
        "dup-mount",
        b'{"command":["true"],"mounts":[{"source":"/a","destination":"/b","source":"/c"}]}',
        "mounts[0].source",
    ),
    ("dup-files", b'{"command":["true"],"files":{"/w/a":"1","/w/a":"2"}}', "files./w/a"),
    ("dup-escaped", b'{"command":["true"],"w\\u0061it":true,"wait":false}', "wait"),
    ("long-int", b'{"command":["true"],"timeout":' + b"9" * 100_000 + b"}", "timeout"),
    ("long-float", b'{"command":["true"],"cpu_limit":' + b"9" * 100_000 + b".5}", "cpu_limit"),
    ("long-fraction", b'{"command":["true"],"cpu_limit":0.' + b"0" * 100_000 + b"1}", "cpu_limit"),
    ("timeout-1e308", b'{"command":["true"],"timeout":1e308}', "timeout"),
    ("memory-1e308", b'{"command":["true"],"memory_limit":1e308}', "memory_limit"),
    ("cpu-1e308", b'{"command":["true"],"cpu_limit":1e308}', "cpu_limit"),
    ("cpu-1e400", b'{"command":["true"],"cpu_limit":1e400}', "cpu_limit"),
    ("keep-alive-1e308", b'{"command":["true"],"keep_alive":1e308}', "keep_alive"),
    ("timeout-neg", b'{"command":["true"],"timeout":-1}', "timeout"),
    ("memory-neg", b'{"command":["true"],"memory_limit":-1}', "memory_limit"),
    ("cpu-neg", b'{"command":["true"],"cpu_limit":-1}', "cpu_limit"),
    ("keep-alive-neg", b'{"command":["true"],"keep_alive":-1}', "keep_alive"),
    ("int-64bit-overflow", b'{"command":["true"],"timeout":18446744073709551616}', "timeout"),
    ("nan", b'{"command":["true"],"cpu_limit":NaN}', "body"),
    ("infinity", b'{"command":["true"],"cpu_limit":Infinity}', "body"),
    ("minus-infinity", b'{"command":["true"],"cpu_limit":-Infinity}', "body"),
    ("trailing-garbage", b'{"command":["true"]} garbage', "body"),
    ("trailing-object", b'{"command":["true"]}{"command":["true"]}', "body"),
    ("bom", b'\xef\xbb\xbf{"command":["true"]}', "body"),
    ("lone-high-surrogate", b'{"command":["true"],"stdin":"\\ud800"}', "body"),
    ("lone-low-surrogate", b'{"command":["true"],"stdin":"a\\udc00b"}', "body"),
    ("lone-surrogate-key", b'{"command":["true"],"environment":{"\\ud800":"x"}}', "body"),
    ("raw-surrogate-bytes", b'{"command":["true"],"stdin":"\xed\xa0\x80"}', "body"),
    ("latin-1", b'{"command":["true"],"stdin":"\xff"}', "body"),
    ("raw-nul-byte", b'{"command":["true"],"stdin":"a\x00b"}', "body"),
    ("nul-in-code", b'{"code":"print(1)\\u0000","language":"python"}', "code"),
    ("nul-in-command", b'{"command":["echo","a\\u0000b"]}', "command[1]"),
    ("nul-in-env-value", b'{"command":["true"],"environment":{"A":"x\\u0000"}}', "environment.A"),
    ("nul-in-env-name", b'{"command":["true"],"environment":{"A\\u0000":"x"}}', "environment"),
    ("nul-in-file-path", b'{"command":["true"],"files":{"/w/a\\u0000b":"x"}}', "files./w/a\x00b"),
    (
        "nul-in-mount-source",
        b'{"command":["true"],"mounts":[{"source":"/tmp\\u0000","destination":"/m"}]}',
        "mounts[0].source",
    ),
    (
        "nul-in-mount-destination",
        b'{"command":["true"],"mounts":[{"source":"/tmp","destination":"/m\\u0000"}]}',
        "mounts[0].destination",
    ),
    ("empty", b"", "body"),
    ("whitespace", b"  \n ", "body"),
    ("null", b"null", "body"),
    ("string", b'"x"', "body"),
]

# (name, raw body, field) for POST /v1/sandboxes/{id}/exec on a live sandbox.
EXEC_CASES: list[tuple[str, bytes, str]] = [
    ("dup-top", b'{"command":["true"],"cwd":"/","cwd":"/tmp"}', "cwd"),
    ("dup-env", b'{"command":["true"],"environment":{"X":"1","X":"2"}}', "environment.X"),
    ("deep", b'{"command":["true"],"stdin":' + b"[" * DEEP + b"]" * DEEP + b"}", "stdin"),
    ("nul-in-cwd", b'{"command":["true"],"cwd":"/tmp\\u0000"}', "cwd"),
    ("nul-in-code", b'{"code":"\\u0000","language":"sh"}', "code"),
    ("nul-in-env", b'{"command":["true"],"environment":{"A":"\\u0000"}}', "environment.A"),
    ("timeout-1e308", b'{"command":["true"],"timeout":1e308}', "timeout"),
    ("timeout-neg", b'{"command":["true"],"timeout":-1}', "timeout"),
    ("nan", b'{"command":["true"],"timeout":NaN}', "body"),
    ("lone-surrogate", b'{"command":["true"],"stdin":"\\udfff"}', "body"),
]


@pytest.mark.parametrize(("name", "raw", "field"), RUN_CASES, ids=[c[0] for c in RUN_CASES])
async def test_pathological_run_body_is_400_naming_the_field(
    g: RunningGateway, name: str, raw: bytes, field: str
) -> None:
    with trio.fail_after(g.seconds(60)):
        response = await g.client.post("/v1/sandboxes/run", content=raw, headers=JSON)
        assert_400(response, field, name)
        # Nothing was created, and the gateway still works.
        assert (await g.client.get("/v1/sandboxes")).json()["sandboxes"] == []
        assert (await g.client.get("/health")).status_code == 200


async def test_pathological_exec_and_resume_bodies_are_400(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        sid = (await g.run_ok(command=["true"]))["id"]
        for name, raw, field in EXEC_CASES:
            response = await g.client.post(f"/v1/sandboxes/{sid}/exec", content=raw, headers=JSON)
            assert_400(response, field, name)
        resume = b'{"snapshot_id":"snp_x","snapshot_id":"snp_y"}'
        response = await g.client.post("/v1/sandboxes/resume", content=resume, headers=JSON)
        assert_400(response, "snapshot_id", "resume-dup")
        snap = b'{"leave_running":true,"leave_running":false}'
        response = await g.client.post(f"/v1/sandboxes/{sid}/snapshot", content=snap, headers=JSON)
        assert_400(response, "leave_running", "snapshot-dup")
        status = await g.status(sid)
        assert status["state"] == "idle"
        assert len(status["execs"]) == 1  # none of the bad execs started anything


async def test_large_bodies_are_decoded_off_the_loop_and_still_checked(g: RunningGateway) -> None:
    """Bodies just under 16 MiB: a duplicate at the very end is found, a valid one runs."""
    big = "x" * (7 * MIB)
    with trio.fail_after(g.seconds(60)):
        raw = json.dumps({"command": ["true"], "stdin": big, "files": {"/w/a": big}}).encode()
        dup = raw[:-1] + b',"environment":{"A":"1","A":"2"}}'
        assert 14 * MIB < len(dup) < 16 * MIB
        response = await g.client.post("/v1/sandboxes/run", content=dup, headers=JSON)
        assert_400(response, "environment.A", "big-dup")
        many = {"command": ["true"], "environment": {f"V{i}": "1" for i in range(200_000)}}
        response = await g.client.post("/v1/sandboxes/run", json=many)
        assert_400(response, "environment", "many-env")
        response = await g.client.post(
            "/v1/sandboxes/run",
            content=json.dumps({"command": ["wc", "-c"], "stdin": big}).encode(),
            headers=JSON,
        )
        assert response.status_code == 201, response.text[:300]
        assert response.json()["result"]["stdout"].strip() == str(len(big))


async def test_over_16_mib_is_413_with_or_without_content_length(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        too_big = b'{"stdin":"' + b"x" * (16 * MIB) + b'"}'
        for chunked in (False, True):
            response = await send_raw_request(g.url, "/v1/sandboxes/run", too_big, chunked=chunked)
            assert response.status == 413, response.body[:300]
            assert response.json()["error"]["code"] == "payload_too_large"
        assert (await g.client.get("/health")).status_code == 200


async def test_an_answer_before_the_body_is_read_leaves_the_connection_usable(
    g: RunningGateway,
) -> None:
    """404 for an unknown sandbox comes before the body is looked at, but the body is drained:
    the next request on the same keep-alive connection must not hang."""
    body = json.dumps({"command": ["true"], "stdin": "x" * MIB}).encode()
    with trio.fail_after(g.seconds(30)):
        async with httpx.AsyncClient(base_url=g.url, timeout=10) as client:
            for path in ("/v1/sandboxes/sbx_nope/exec", "/v1/sandboxes/sbx_nope/snapshot"):
                for _ in range(3):
                    response = await client.post(path, content=body, headers=JSON)
                    assert response.status_code == 404, response.text[:300]
                    assert (await client.get("/health")).status_code == 200


async def next_frame(ws: Any, type_: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if frame["type"] == type_:
            return frame


async def test_bad_stream_frames_get_error_frames_naming_the_field(gw: RunningGateway) -> None:
    deep = '{"type":"exec","command":["true"],"stdin":' + "[" * DEEP + "]" * DEEP + "}"
    cases: list[tuple[str, str]] = [
        ('{"type":"exec","command":["true"],"environment":{"X":"1","X":"2"}}', "environment.X"),
        ('{"type":"stdin","exec_id":"exe_a","exec_id":"exe_b","data":"x"}', "exec_id"),
        ('{"type":"stdin_close","exec_id":"e","type":"stdin_close"}', "type"),
        ('{"type":"exec","command":["true"],"command":["sh"]}', "command"),
        (deep, "stdin"),
        ('{"type":"exec","command":' + "[" * DEEP, "command"),
        ('{"type":"exec","command":["true"],"timeout":1e308}', "timeout"),
        ('{"type":"exec","command":["true"],"timeout":-1}', "timeout"),
        ('{"type":"exec","command":["true"],"timeout":NaN}', "invalid character"),
        ('{"type":"exec","command":["true"],"stdin":"\\ud800"}', "surrogate"),
        ('{"type":"exec","command":["true"]} trailing', "trailing"),
        ("\ufeff" + '{"type":"stdin_close","exec_id":"e"}', "invalid character"),
    ]
    with trio.fail_after(gw.seconds(60)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        async with gw.stream(sid, max_message_size=8 * MIB) as ws:
            for frame, named in cases:
                await ws.send_message(frame)
                error = await next_frame(ws, "error")
                assert error["code"] == "invalid_frame", (frame[:80], error)
                assert named in error["message"], (frame[:80], error)
            # A NUL in an exec frame is refused by the same checks as REST, naming the field.
            await ws.send_message('{"type":"exec","command":["true"],"cwd":"/\\u0000"}')
            error = await next_frame(ws, "error")
            assert error["code"] == "invalid_request" and "NUL" in error["message"], error
            # The socket is still usable.
            await ws.send_message(json.dumps({"type": "exec", "command": ["echo", "ok"]}))
            assert (await next_frame(ws, "stdout"))["data"] == "ok\n"
            assert (await next_frame(ws, "exit"))["result"]["verdict"] == "ok"
        status = await gw.status(sid)
        assert status["state"] == "idle"
        assert len(status["execs"]) == 2  # the run and the one good exec frame


def test_duplicate_key_check_agrees_with_the_standard_library() -> None:
    """The cheap count-based test against ``object_pairs_hook`` on random JSON (seeded)."""
    rng = random.Random(1234)
    alphabet = ["a", "b", '"', "\\", "\\\\", ":", "é", "\u2028", "\x00", "😀", "\n", "{", "}"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))

    def value(depth: int) -> str:
        r = rng.random()
        ascii_only = rng.random() < 0.5
        if depth > 3 or r < 0.3:
            return json.dumps(
                rng.choice([text(), 1, -2.5e300, None, True]), ensure_ascii=ascii_only
            )
        if r < 0.6:
            return "[" + ",".join(value(depth + 1) for _ in range(rng.randint(0, 3))) + "]"
        keys = [rng.choice(["a", "b", '"', "\\", ":"]) if rng.random() < 0.7 else text()]
        keys += [rng.choice(["a", "b", '"', "\\", ":"]) for _ in range(rng.randint(0, 3))]
        sep = rng.choice([":", " : "])
        return "{" + ", ".join(json.dumps(k) + sep + value(depth + 1) for k in keys) + "}"

    def truth(doc: str) -> bool:
        repeated = False

        def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            nonlocal repeated
            repeated = repeated or len({k for k, _ in pairs}) != len(pairs)
            return dict(pairs)

        json.loads(doc, object_pairs_hook=hook)
        return repeated

    found = 0
    for _ in range(5000):
        doc = value(0)
        expected = truth(doc)
        found += expected
        for raw in (doc, doc.encode()):
            assert (find_duplicate_key(raw) is not None) == expected, doc
    assert 500 < found < 4500


async def test_cross_site_requests_are_refused(g: RunningGateway) -> None:
    """A page on another site cannot drive the gateway through a visitor's browser (CSRF, and
    cross-site WebSockets, which browsers do not restrict)."""
    host = g.url.removeprefix("http://")
    evil = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    with trio.fail_after(g.seconds(30)):
        response = await g.client.post(
            "/v1/sandboxes/run", content=b'{"command": ["true"]}', headers=evil
        )
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "origin_not_allowed"
        assert (await g.client.get("/v1/sandboxes")).json()["sandboxes"] == []
        upgrade = {
            "Origin": "https://evil.example",
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        refused = await g.client.get("/v1/sandboxes/sbx_00000000000000000000000000/stream",
                                     headers=upgrade)  # fmt: skip
        assert refused.status_code == 403
        # The gateway's own pages (same origin) and clients without an Origin work.
        same = await g.client.post(
            "/v1/sandboxes/run",
            json={"command": ["echo", "ok"], "keep_alive": 0},
            headers={"Origin": f"http://{host}"},
        )
        assert same.status_code == 201
        assert same.json()["result"]["stdout"] == "ok\n"
