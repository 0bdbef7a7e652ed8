"""Helpers the tests share (kept out of conftest.py so test modules can import them)."""

from __future__ import annotations

import json
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from sandstorm.agent import AGENT_COMMAND_PREFIX
from sandstorm.api.types import IsolationLevel, RuntimeName
from sandstorm.config import Config
from sandstorm.sdk import AsyncClient

#: The level a request must ask for to be served by each runtime the tests run on (qemu is the
#: fallback for ``maximum`` where Firecracker is missing).
LEVEL_FOR: dict[RuntimeName, IsolationLevel] = {"gvisor": "standard", "qemu": "maximum"}
#: What a teardown's ``released`` calls the sandbox's directory on the host, by runtime.
DIRECTORY_WORD: dict[RuntimeName, str] = {"gvisor": "bundle directory", "qemu": "VM directory"}
#: How much longer a VM test may take than its gVisor bound: every TCG boot costs seconds.
VM_SLOWDOWN = 4.0
_CREATE_PATHS = frozenset({"/v1/sandboxes", "/v1/sandboxes/run"})
#: Shell words for the agent's pid inside a sandbox: 1 in gVisor (the agent is PID 1); in a VM
#: the guest's init is PID 1 and the agent its child. The lowest pid whose command line names the
#: agent's binary (one grep, not a process per pid: under TCG every process costs milliseconds).
AGENT_PID_SH = (
    f"$(grep -alF -- '{AGENT_COMMAND_PREFIX}' /proc/[0-9]*/cmdline 2>/dev/null"
    " | sort -t/ -k3 -n | head -n 1 | cut -d/ -f3)"
)
#: The same as a Python function, ``agent_pid()``, for code that runs in the sandbox.
AGENT_PID_PY = f"""
def agent_pid():
    import os
    for p in sorted((p for p in os.listdir('/proc') if p.isdigit()), key=int):
        try:
            with open('/proc/%s/cmdline' % p, 'rb') as f:
                if f.read().startswith({AGENT_COMMAND_PREFIX.encode()!r}):
                    return int(p)
        except OSError:
            pass
"""


_C_NUMBER_DEFINE = re.compile(r"^#define (\w+) ([0-9A-Fx().*+ ]+?)\s*(?:/\*.*)?$", re.M)


def c_number_defines(source: str) -> dict[str, float]:
    """The numeric ``#define``s of one of our C programs (shim.c, the agent's sources),
    evaluated: the tests compare them with the Python side of the same protocol."""
    # eval: integer arithmetic from our own source (the pattern admits nothing else).
    return {name: float(eval(value, {})) for name, value in _C_NUMBER_DEFINE.findall(source)}


@dataclass
class RunningGateway:
    url: str
    client: httpx.AsyncClient
    config: Config
    data_dir: Path
    #: The runtime that serves the sandboxes this test creates without naming one.
    runtime: RuntimeName = "gvisor"

    @property
    def isolation_level(self) -> IsolationLevel:
        return LEVEL_FOR[self.runtime]

    @property
    def directory_word(self) -> str:
        """How ``released`` names the sandbox's directory on the host."""
        return DIRECTORY_WORD[self.runtime]

    @property
    def selection(self) -> str:
        """Why the gateway picks ``runtime`` for this test's requests."""
        return "default" if self.runtime == "gvisor" else "fallback"

    def seconds(self, gvisor_bound: float) -> float:
        """A test's time bound, scaled for the runtime it runs on."""
        return gvisor_bound if self.runtime == "gvisor" else gvisor_bound * VM_SLOWDOWN

    async def require_runtime(self) -> None:
        """Fail the test at once, saying why, if its runtime cannot run sandboxes here."""
        runtimes = {r["name"]: r for r in (await self.client.get("/v1/runtimes")).json()}
        if not runtimes[self.runtime]["available"]:
            raise AssertionError(f"{self.runtime} unavailable: {runtimes[self.runtime]['reason']}")

    async def run(self, **body: Any) -> httpx.Response:
        return await self.client.post("/v1/sandboxes/run", json=body)

    async def run_ok(self, **body: Any) -> dict[str, Any]:
        response = await self.run(**body)
        assert response.status_code in (201, 202), response.text
        data: dict[str, Any] = response.json()
        return data

    async def status(self, sandbox_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/sandboxes/{sandbox_id}/status")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def wait_state(self, sandbox_id: str, *states: str) -> dict[str, Any]:
        """Poll status until the sandbox is in one of ``states`` (callers bound the time)."""
        while True:
            status = await self.status(sandbox_id)
            if status["state"] in states:
                return status
            await trio.sleep(0.05)

    @asynccontextmanager
    async def stream(self, sandbox_id: str, since: int | None = None, **options: Any) -> Any:
        """A real WebSocket on the sandbox's stream (``.ws`` gives raw frames)."""
        async with (
            AsyncClient(self.url) as client,
            client.stream(sandbox_id, since or 0, **options) as stream,
        ):
            yield stream.ws


class RuntimeRouting(httpx.AsyncBaseTransport):
    """Sends the test's create and run requests to its runtime.

    A body that names neither ``isolation_level`` nor ``runtime_preference`` gets the level that
    ``runtime`` serves (``LEVEL_FOR``); anything else, malformed bodies included, goes out as the
    test wrote it. The request is otherwise untouched, so the test still speaks the real API."""

    def __init__(self, inner: httpx.AsyncBaseTransport, runtime: RuntimeName) -> None:
        self._inner = inner
        self._level = LEVEL_FOR[runtime]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        routed = self._level != "standard" and request.method == "POST"
        if routed and request.url.path in _CREATE_PATHS:
            request = self._routed(request)
        return await self._inner.handle_async_request(request)

    def _routed(self, request: httpx.Request) -> httpx.Request:
        raw = request.read()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return request
        if not isinstance(body, dict) or {"isolation_level", "runtime_preference"} & set(body):
            return request
        # Inserted as text after the opening brace: every other byte goes out as written
        # (duplicate keys, number spellings, whitespace), so the request is the test's own.
        brace = raw.index(b"{") + 1
        separator = b"," if body else b""
        field = b'"isolation_level":"%s"%s' % (self._level.encode(), separator)
        content = raw[:brace] + field + raw[brace:]
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        return httpx.Request(request.method, request.url, headers=headers, content=content)

    async def aclose(self) -> None:
        await self._inner.aclose()


def never_500(gw: RunningGateway) -> None:
    """Make every 5xx but 503 from ``gw.client`` fail the request that got it, where it happens."""

    async def hook(response: httpx.Response) -> None:
        if response.status_code >= 500 and response.status_code != 503:
            await response.aread()
            raise AssertionError(
                f"{response.status_code} for {response.request.method} "
                f"{response.request.url.path}: {response.text}"
            )

    gw.client.event_hooks["response"].append(hook)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send_raw_request(
    url: str,
    path: str,
    body: bytes,
    *,
    chunked: bool = False,
    chunk_size: int = 256 * 1024,
    method: str = "POST",
) -> RawResponse:
    """``method`` (POST) `body` over a plain socket while reading the answer, which may come
    before the body is sent whole (413). httpx cannot do this cleanly: it abandons its own
    async generator over the body, which the garbage collector later reports as an unraisable
    warning."""
    host, port = url.removeprefix("http://").split(":")
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    answer = bytearray()

    async def send_body() -> None:
        try:
            await stream.send_all(head)
            for offset in range(0, len(body), chunk_size):
                chunk = body[offset : offset + chunk_size]
                if chunked:
                    chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                await stream.send_all(chunk)
            if chunked:
                await stream.send_all(b"0\r\n\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # The server answered and closed before taking the whole body.

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send_body)
        while (parsed := _parse_response(bytes(answer))) is None:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"connection closed mid-answer: {bytes(answer)[:300]!r}")
            answer += chunk
        nursery.cancel_scope.cancel()
    return parsed


def _parse_response(data: bytes) -> RawResponse | None:
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        return None
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if len(rest) < length:
        return None
    return RawResponse(int(status_line.split()[1]), headers, rest[:length])
