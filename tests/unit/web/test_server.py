"""The HTTP/1.1 protocol the gateway serves with (``GatewayH11Protocol``): an answer's head
and body leave in one write, with nothing changed in what is written."""

from __future__ import annotations

from typing import Any

import h11
from hypercorn.config import Config
from hypercorn.events import Event, RawData
from hypercorn.protocol.events import Body, EndBody, Response
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.worker_context import WorkerContext

from sandstorm.web.server import GatewayH11Protocol

REQUEST = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"


async def _answer(protocol_class: type[H11Protocol], events: list[Any]) -> list[bytes]:
    """The writes ``protocol_class`` makes for ``events``, after a request was read."""
    writes: list[bytes] = []

    async def send(event: Event) -> None:
        assert isinstance(event, RawData)
        writes.append(event.data)

    config = Config()
    config.include_server_header = False
    config.include_date_header = False
    protocol = protocol_class(
        None,
        config,
        WorkerContext(None),
        None,
        {},
        False,
        None,
        None,
        send,  # type: ignore[arg-type]
    )
    protocol.connection.receive_data(REQUEST)
    assert isinstance(protocol.connection.next_event(), h11.Request)
    assert isinstance(protocol.connection.next_event(), h11.EndOfMessage)
    for event in events:
        await protocol.stream_send(event)
    return writes


def _sized(body: bytes) -> list[Any]:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return [Response(stream_id=1, status_code=201, headers=headers), Body(stream_id=1, data=body),
            EndBody(stream_id=1)]  # fmt: skip


async def test_a_sized_answer_is_one_write_of_the_same_bytes() -> None:
    events = _sized(b'{"ok":true}')
    plain = await _answer(H11Protocol, events)
    coalesced = await _answer(GatewayH11Protocol, events)
    # Hypercorn's own: head, body, and an empty end of message.
    assert len(plain) == 3 and plain[2] == b""
    assert coalesced == [b"".join(plain)]
    assert coalesced[0].startswith(b"HTTP/1.1 201 ") and coalesced[0].endswith(b'{"ok":true}')


async def test_an_answer_without_a_body_and_a_chunked_one() -> None:
    empty = [Response(stream_id=1, status_code=204, headers=[]), EndBody(stream_id=1)]
    assert await _answer(GatewayH11Protocol, empty) == [b"".join(await _answer(H11Protocol, empty))]
    chunked = [
        Response(stream_id=1, status_code=200, headers=[(b"transfer-encoding", b"chunked")]),
        Body(stream_id=1, data=b"one"),
        Body(stream_id=1, data=b"two"),
        EndBody(stream_id=1),
    ]
    plain = await _answer(H11Protocol, chunked)
    coalesced = await _answer(GatewayH11Protocol, chunked)
    # The head goes with the first chunk; later chunks and the last-chunk marker as before.
    assert coalesced == [plain[0] + plain[1], plain[2], plain[3]]
    assert coalesced[-1] == b"0\r\n\r\n"
