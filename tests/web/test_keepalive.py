"""A connection stays usable after an answer that did not read its request's body.

Every client library pools connections, so a refused request (a 404, a 413, a refused upload)
must leave the connection ready for the next, unrelated call, or end it and say so in the
answer (``Connection: close``), never leave it hanging."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from tests.harness import RawResponse, _parse_response

SIZES = (100, 5_000, 20_000, 65_536, 100_000, 200_000)
T = 20


@pytest.mark.parametrize("method", ["PUT", "POST"])
async def test_a_pooled_client_goes_on_after_refused_bodies(
    start_gateway: Callable[..., Any], method: str
) -> None:
    async with start_gateway() as gw:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=gw.url, limits=limits, timeout=10) as client:
            for _ in range(3):
                for size in SIZES:
                    with trio.fail_after(T):
                        body = b"x" * size
                        refused = await client.request(method, "/v1/nothing-here", content=body)
                        assert refused.status_code in (404, 405)
                        health = await client.get("/health")
                        assert health.status_code == 200


class Connection:
    """One raw HTTP/1.1 connection: requests written whole, answers read one at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def answer(self) -> RawResponse:
        while (parsed := _parse_response(self.buffer)) is None:
            chunk = await self.stream.receive_some(65536)
            assert chunk, f"connection closed mid-answer: {self.buffer[:300]!r}"
            self.buffer += chunk
        head = self.buffer.index(b"\r\n\r\n") + 4
        self.buffer = self.buffer[head + len(parsed.body) :]
        return parsed

    async def closed(self) -> bool:
        return self.buffer == b"" and await self.stream.receive_some(1) == b""


async def _connect(url: str) -> Connection:
    host, port = url.removeprefix("http://").split(":")
    return Connection(await trio.open_tcp_stream(host, int(port)))


def _put(path: str, body: bytes, *, chunked: bool = False) -> bytes:
    if chunked:
        framing, body = "Transfer-Encoding: chunked", b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    else:
        framing = f"Content-Length: {len(body)}"
    return f"PUT {path} HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode() + body


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_the_same_connection_answers_after_an_unread_body(
    start_gateway: Callable[..., Any],
) -> None:
    async with start_gateway() as gw:
        with trio.fail_after(T):
            conn = await _connect(gw.url)
            async with conn.stream:
                for size in SIZES:
                    await conn.stream.send_all(_put("/v1/nothing-here", b"y" * size))
                    refused = await conn.answer()
                    assert refused.status == 404
                    assert refused.headers.get("connection") != "close"
                    await conn.stream.send_all(HEALTH)
                    assert (await conn.answer()).status == 200
                # Pipelined: a refused body and the next request in one write.
                await conn.stream.send_all(_put("/v1/nothing-here", b"z" * 70_000) + HEALTH)
                assert (await conn.answer()).status == 404
                assert (await conn.answer()).status == 200


async def test_more_unread_body_than_is_discarded_ends_the_connection_and_says_so(
    start_gateway: Callable[..., Any],
) -> None:
    async with start_gateway(max_body_bytes=64 * 1024) as gw:
        with trio.fail_after(T):
            # Declared longer than the gateway discards: answered, then the connection ends.
            conn = await _connect(gw.url)
            async with conn.stream:
                await conn.stream.send_all(_put("/v1/nothing-here", b""))
                head = (
                    b"PUT /v1/nothing-here HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                )
                await conn.stream.send_all(head + b"w" * 1000)
                # The first request (an empty body) is answered and the connection kept.
                assert (await conn.answer()).status == 404
                refused = await conn.answer()
                assert refused.status == 404 and refused.headers["connection"] == "close"
                assert await conn.closed()
            # A chunked body still coming when the answer goes: its size is unknown, so the same.
            conn = await _connect(gw.url)
            async with conn.stream:
                unfinished = _put("/v1/nothing-here", b"v" * 1000, chunked=True)[
                    : -len(b"0\r\n\r\n")
                ]
                await conn.stream.send_all(unfinished)
                refused = await conn.answer()
                assert refused.status == 404 and refused.headers["connection"] == "close"
                assert await conn.closed()
            # The gateway goes on serving.
            conn = await _connect(gw.url)
            async with conn.stream:
                await conn.stream.send_all(HEALTH)
                assert (await conn.answer()).status == 200
