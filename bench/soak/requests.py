"""Bad requests of every kind, each with the answer the API contract gives it (never a 5xx),
and unread bodies on a pooled connection that must keep serving the next request."""

from __future__ import annotations

import random
import time
from typing import Any

from bench.soak.record import Client, Record

UNKNOWN = "sbx_0000000000000000000000000Z"


def _cases() -> list[tuple[str, str, str, Any, set[int]]]:
    """(name, method, path, body: bytes or a JSON value, statuses allowed)."""
    run = "/v1/sandboxes/run"
    return [
        ("malformed_json", "POST", run, b'{"code": "print(1)", "language": ', {400}),
        ("not_an_object", "POST", run, b"[1, 2, 3]", {400}),
        ("empty_body", "POST", run, b"", {400}),
        ("not_utf8", "POST", run, b'{"code": "\xff\xfe", "language": "python"}', {400}),
        ("wrong_type", "POST", run, {"code": 5, "language": "python"}, {400}),
        ("timeout_string", "POST", run, {"command": ["true"], "timeout": "soon"}, {400}),
        ("negative_timeout", "POST", run, {"command": ["true"], "timeout": -1}, {400}),
        ("huge_timeout", "POST", run, {"command": ["true"], "timeout": 10**12}, {400}),
        ("cpu_out_of_range", "POST", run, {"command": ["true"], "cpu_limit": 1000}, {400}),
        ("memory_too_small", "POST", run, {"command": ["true"], "memory_limit": 1}, {400}),
        ("unknown_language", "POST", run, {"code": "x", "language": "cobol-85"}, {400}),
        (
            "unknown_runtime",
            "POST",
            run,
            {"command": ["true"], "runtime_preference": "vmx"},
            {400},
        ),
        (
            "code_and_command",
            "POST",
            run,
            {"code": "1", "language": "python", "command": ["true"]},
            {400},
        ),
        ("neither_code_nor_command", "POST", run, {"language": "python"}, {400}),
        ("bad_env_name", "POST", run, {"command": ["true"], "environment": {"1X": "y"}}, {400}),
        (
            "nul_in_env",
            "POST",
            run,
            {"command": ["true"], "environment": {"X": "a\u0000b"}},
            {400},
        ),
        (
            "mount_not_allowed",
            "POST",
            run,
            {"command": ["true"], "mounts": [{"source": "/etc", "destination": "/workspace/etc"}]},
            {403},
        ),
        ("unknown_field_type", "POST", run, {"command": "true"}, {400}),
        (
            "exec_unknown_sandbox",
            "POST",
            f"/v1/sandboxes/{UNKNOWN}/exec",
            {"command": ["true"]},
            {404},
        ),
        ("status_unknown", "GET", f"/v1/sandboxes/{UNKNOWN}/status", None, {404}),
        ("delete_unknown", "DELETE", f"/v1/sandboxes/{UNKNOWN}", None, {404}),
        ("malformed_id", "GET", "/v1/sandboxes/not-an-id/status", None, {400, 404}),
        ("snapshot_unknown", "POST", f"/v1/sandboxes/{UNKNOWN}/snapshot", {}, {404}),
        (
            "resume_unknown",
            "POST",
            "/v1/sandboxes/resume",
            {"snapshot_id": "snp_0000000000000000000000000Z"},
            {404},
        ),
        ("exec_record_unknown", "GET", f"/v1/sandboxes/{UNKNOWN}/execs/exe_x", None, {404}),
        ("unknown_route", "GET", "/v1/nothing-here", None, {404}),
        ("unknown_route_put", "PUT", "/v1/nothing-here", b"z" * 5000, {404, 405}),
        ("wrong_method", "PATCH", run, b"{}", {404, 405}),
        ("deep_json", "POST", run, b"[" * 100_000 + b"]" * 100_000, {400, 413}),
    ]


CASES = _cases()


async def bad_request(record: Record, client: Client, rng: random.Random) -> None:
    """One bad request (or an unread-body probe), answered as the contract says."""
    choice = rng.randrange(len(CASES) + 2)
    if choice == len(CASES):
        await huge_body(record, client)
        return
    if choice == len(CASES) + 1:
        await unread_body(record, client, rng)
        return
    name, method, path, body, allowed = CASES[choice]
    kind = f"bad.{name}"
    start = time.monotonic()
    if isinstance(body, bytes) or body is None:
        response = await client.request(
            kind,
            method,
            path,
            content=body,
            budget=10,
            headers={"content-type": "application/json"},
        )
    else:
        response = await client.request(kind, method, path, json_body=body, budget=10)
    if response is not None and response.status_code not in allowed:
        record.anomaly(
            kind,
            f"answered {response.status_code} (expected {sorted(allowed)}): {response.text[:300]}",
            start,
        )


async def huge_body(record: Record, client: Client) -> None:
    """A body over the 16 MiB limit: 413, refused before it is read whole."""
    start = time.monotonic()
    response = await client.request(
        "bad.huge_body",
        "POST",
        "/v1/sandboxes/run",
        budget=30,
        content=b" " * (17 << 20),
        headers={"content-type": "application/json"},
    )
    if response is not None and response.status_code != 413:
        record.anomaly("bad.huge_body", f"answered {response.status_code}", start)


async def unread_body(record: Record, client: Client, rng: random.Random) -> None:
    """An answer given without reading the body, then another request on the same pooled
    connection: it must be answered at once."""
    one = Client(record, client.base_url, connections=1)
    try:
        size = rng.choice([100, 5000, 65_536, 200_000, 1 << 20])
        start = time.monotonic()
        first = await one.request(
            "bad.unread_body", "PUT", "/v1/nothing-here", content=b"u" * size, budget=10
        )
        if first is None:
            return
        second = await one.request("bad.after_unread_body", "GET", "/health", budget=5)
        if second is not None and second.status_code != 200:
            record.anomaly("bad.after_unread_body", f"answered {second.status_code}", start)
    finally:
        await one.aclose()
