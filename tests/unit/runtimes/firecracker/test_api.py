"""Firecracker's API as the driver speaks it (``firecracker/api.py``).

Firecracker cannot run here (no binary in the package registries, and /dev/kvm emulates instead
of running guests), so every request the driver's real code sends over a real Unix socket is
captured by a small server that answers as Firecracker does (204, or 400 with
``fault_message``) and checked against the vendored OpenAPI document
(``tests/data/firecracker/firecracker.yaml``); the vsock handshake runs against a peer that
speaks docs/vsock.md.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from sandstorm.api.types import MIB
from sandstorm.runtimes.base import RuntimeStartError, SandboxSpec
from sandstorm.runtimes.firecracker import api as fapi
from sandstorm.runtimes.firecracker.jail import boot_args, guest_vcpus
from sandstorm.runtimes.guest import guest_ram

T = 20
DOC = Path(__file__).resolve().parents[3] / "data" / "firecracker" / "firecracker.yaml"


# ----------------------------------------------------------------------------- the document


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    with open(DOC) as f:
        doc: dict[str, Any] = yaml.safe_load(f)
    assert doc["swagger"] == "2.0" and doc["info"]["license"]["name"] == "Apache 2.0"
    return doc


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/definitions/")
        schema = doc["definitions"][name]
    return schema


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "string": (str,),
    "integer": (int,),
    "boolean": (bool,),
    "array": (list,),
    "number": (int, float),
}


def schema_errors(doc: dict[str, Any], schema: dict[str, Any], value: Any, at: str) -> list[str]:
    """A small JSON-schema check for the Swagger 2.0 subset the document uses. Stricter than
    Swagger on one point, as Firecracker is (its API types deny unknown fields): a property
    the schema does not list is an error."""
    schema = _resolve(doc, schema)
    errors: list[str] = []
    kind = schema.get("type", "object" if "properties" in schema else None)
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            return [f"{at}: {value!r} is not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{at}: {value} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{at}: {value} > {schema['maximum']}")
    if kind == "object":
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{at}: missing required {name}")
        for name, item in value.items():
            if name not in props:
                if schema.get("additionalProperties") is not True:
                    errors.append(f"{at}: unknown property {name}")
                continue
            errors += schema_errors(doc, props[name], item, f"{at}.{name}")
    if kind == "array":
        for i, item in enumerate(value):
            errors += schema_errors(doc, schema.get("items", {}), item, f"{at}[{i}]")
    return errors


def request_errors(doc: dict[str, Any], method: str, path: str, body: Any) -> list[str]:
    """Whether ``method path`` with ``body`` is a request the document defines."""
    for template, operations in doc["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if not re.match(pattern, path):
            continue
        operation = operations.get(method.lower())
        if operation is None:
            return [f"{method} {path}: the document has no {method} on {template}"]
        errors: list[str] = []
        for param in operation.get("parameters", []):
            if param["in"] == "path":
                name = param["name"]
                value = re.match(pattern.replace("[^/]+", "([^/]+)"), path)
                assert value is not None
                if param.get("type") == "string" and not value.group(1):
                    errors.append(f"{path}: empty path parameter {name}")
            if param["in"] == "body":
                if body is None and param.get("required"):
                    errors.append(f"{method} {path}: body required")
                elif body is not None:
                    errors += schema_errors(doc, param["schema"], body, "body")
        return errors
    return [f"{method} {path}: no such path in the document"]


def test_the_validator_refuses_what_firecracker_refuses(openapi: dict[str, Any]) -> None:
    """The check itself is only worth something if it fails on bad requests."""
    assert (
        request_errors(openapi, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
        == []
    )
    assert request_errors(openapi, "PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 1})
    assert request_errors(openapi, "PUT", "/machine-config", {"vcpu_count": 1})  # no memory
    assert request_errors(openapi, "PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v"})  # cid < 3
    assert request_errors(openapi, "PUT", "/drives/x", {"drive_id": "x", "readonly": True})
    assert request_errors(openapi, "PATCH", "/vm", {"state": "Stopped"})
    assert request_errors(openapi, "POST", "/actions", {"action_type": "InstanceStart"})
    assert request_errors(openapi, "PUT", "/snapshot/restore", {})
    assert request_errors(openapi, "PUT", "/actions", {"action_type": True})


# ----------------------------------------------------------------------------- a fake API


@dataclass
class Recorded:
    method: str
    path: str
    body: Any


@dataclass
class FakeFirecracker:
    """Plays Firecracker's API on a Unix socket: records each request, answers 204, or
    400 with a ``fault_message`` for the paths in ``faults`` (as Firecracker does)."""

    requests: list[Recorded] = field(default_factory=list)
    faults: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    async def serve(self, listener: trio.SocketListener) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        buf = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                    assert len(buf) < 1 << 20
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _version = lines[0].split(" ")
                headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                body, buf = buf[:length], buf[length:]
                assert headers.get("content-type") == "application/json"
                self.requests.append(Recorded(method, path, json.loads(body) if body else None))
                status, reply = self.faults.get(path, (204, b""))
                reason = {204: "No Content", 400: "Bad Request", 500: "Internal Server Error"}
                response = f"HTTP/1.1 {status} {reason[status]}\r\n"
                if reply:
                    response += "Content-Type: application/json\r\n"
                response += f"Content-Length: {len(reply)}\r\n\r\n"
                await stream.send_all(response.encode() + reply)


async def _unix_listener(directory: Path, name: str) -> trio.SocketListener:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with fapi.short_path(directory, name) as path:
        await sock.bind(path)
    sock.listen(8)
    return trio.SocketListener(sock)


@pytest.fixture
async def fake_api(tmp_path: Path) -> AsyncIterator[tuple[FakeFirecracker, Path]]:
    root = tmp_path / "jail-with-a-deliberately-long-name-so-that-sun-path-would-overflow" / "root"
    root.mkdir(parents=True)
    fake = FakeFirecracker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.serve, await _unix_listener(root, fapi.API_SOCKET))
        yield fake, root
        nursery.cancel_scope.cancel()


SPEC = SandboxSpec(
    sandbox_id="sbx_0123456789ABCDEFGHJKMNPQRS",
    rootfs=Path("/unused"),
    cpu_limit=1.5,
    memory_limit=512 * MIB,
    pids_limit=128,
)


async def test_every_request_of_a_life_cycle_is_in_the_document(
    fake_api: tuple[FakeFirecracker, Path], openapi: dict[str, Any]
) -> None:
    fake, root = fake_api
    assert len(str(root / fapi.API_SOCKET)) > 108  # only reachable through the short path
    with trio.fail_after(T):
        # start
        async with fapi.FirecrackerApi(root) as api:
            await fapi.configure_and_start(
                api,
                boot_args=boot_args(SPEC),
                vcpus=guest_vcpus(SPEC),
                mem_mib=guest_ram(SPEC) // MIB,
            )
        # checkpoint
        async with fapi.FirecrackerApi(root) as api:
            await fapi.pause_and_snapshot(api)
        # restore (a fresh Firecracker; here the same fake)
        async with fapi.FirecrackerApi(root) as api:
            await fapi.load_and_resume(api)
    sent = [(r.method, r.path) for r in fake.requests]
    assert sent == [
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/machine-config"),
        ("PUT", "/vsock"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PUT", "/snapshot/load"),
    ]
    for r in fake.requests:
        assert request_errors(openapi, r.method, r.path, r.body) == [], r
    by_path = {r.path: r.body for r in fake.requests}
    assert by_path["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 512, "smt": False}
    assert by_path["/drives/rootfs"]["is_read_only"] is True
    assert by_path["/actions"] == {"action_type": "InstanceStart"}
    assert by_path["/vm"] == {"state": "Paused"}
    assert by_path["/snapshot/create"]["snapshot_type"] == "Full"
    assert by_path["/snapshot/load"]["resume_vm"] is True
    assert "sandstorm.channel=vsock" in by_path["/boot-source"]["boot_args"]


@pytest.mark.parametrize(
    ("status", "reply", "expected"),
    [
        (400, b'{"fault_message": "Invalid vCPU count: 0"}', "HTTP 400: Invalid vCPU count: 0"),
        (500, b"not json at all", "HTTP 500: not json at all"),
    ],
)
async def test_a_refusal_becomes_a_start_error_with_firecrackers_reason(
    fake_api: tuple[FakeFirecracker, Path], status: int, reply: bytes, expected: str
) -> None:
    fake, root = fake_api
    fake.faults["/machine-config"] = (status, reply)
    with trio.fail_after(T), pytest.raises(RuntimeStartError) as info:
        async with fapi.FirecrackerApi(root) as api:
            await fapi.configure_and_start(api, boot_args="x", vcpus=1, mem_mib=128)
    assert isinstance(info.value, fapi.FirecrackerApiError)
    assert str(info.value) == f"firecracker PUT /machine-config failed: {expected}"
    # Nothing after the refused request was sent.
    assert [r.path for r in fake.requests][-1] == "/machine-config"


async def test_no_api_socket_is_a_start_error(tmp_path: Path) -> None:
    with trio.fail_after(T), pytest.raises(fapi.FirecrackerApiError, match="PUT /vsock"):
        async with fapi.FirecrackerApi(tmp_path) as api:
            await api.put("/vsock", fapi.vsock_device())


# ----------------------------------------------------------------------------- vsock


async def _vsock_peer(
    listener: trio.SocketListener, answers: list[bytes], seen: list[bytes]
) -> None:
    """Plays the host end of Firecracker's vsock device: reads ``CONNECT <port>\\n``, answers
    the next of ``answers`` (empty: close, as when nobody listens in the guest), and on OK
    sends guest bytes right behind the acknowledgement."""
    async with listener:
        for answer in answers:
            await _answer_one(listener, answer, seen)


async def _answer_one(listener: trio.SocketListener, answer: bytes, seen: list[bytes]) -> None:
    stream = await listener.accept()
    async with stream:
        line = b""
        while not line.endswith(b"\n"):
            line += await stream.receive_some(1)
        seen.append(line)
        if answer:
            await stream.send_all(answer + b"HELLO-FROM-GUEST")
            assert await stream.receive_some(64) == b"ping"


async def test_vsock_handshake_keeps_the_guests_first_bytes(tmp_path: Path) -> None:
    seen: list[bytes] = []
    with trio.fail_after(T):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _vsock_peer,
                await _unix_listener(tmp_path, fapi.VSOCK_SOCKET),
                [b"", b"OK 1073741824\n"],
                seen,
            )
            stream = await fapi.vsock_connect_retrying(tmp_path, 10000, lambda: False)
            data = b""
            while len(data) < len(b"HELLO-FROM-GUEST"):
                data += await stream.receive_some(64)
            assert data == b"HELLO-FROM-GUEST"
            await stream.send_all(b"ping")
            await stream.aclose()
    assert seen == [b"CONNECT 10000\n", b"CONNECT 10000\n"]


@pytest.mark.parametrize("answer", [b"NOPE 1\n", b"OK\n", b"OK " + b"9" * 40 + b"\n"])
async def test_vsock_handshake_refuses_a_bad_answer(tmp_path: Path, answer: bytes) -> None:
    seen: list[bytes] = []
    listener = await _unix_listener(tmp_path, fapi.VSOCK_SOCKET)

    async def peer() -> None:
        stream = await listener.accept()
        async with stream:
            while b"\n" not in b"".join(seen):
                seen.append(await stream.receive_some(1))
            await stream.send_all(answer)
            await trio.sleep_forever()

    with trio.fail_after(T):
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            with pytest.raises(ConnectionError, match="vsock port 52"):
                await fapi.vsock_connect(tmp_path, 52)
            nursery.cancel_scope.cancel()
    assert b"".join(seen) == b"CONNECT 52\n"


async def test_vsock_gives_up_once_firecracker_has_exited(tmp_path: Path) -> None:
    with trio.fail_after(T), pytest.raises(OSError):
        await fapi.vsock_connect_retrying(tmp_path, 52, lambda: True)
