"""The Python client library against a real gateway: sync REST, sync streaming, async errors."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from sandstorm.sdk import AsyncClient, Client, SandstormError
from tests.harness import RunningGateway


def _sync_session(url: str) -> tuple[str, list[str], float]:
    with Client(url) as client:
        created = client.run(command=["sh", "-c", "echo one; sleep 30"], wait=False)
        kinds: list[str] = []
        start = time.monotonic()
        for event in client.iter_events(created.id):
            kinds.append(type(event).__name__)
            if kinds[-1] == "StdoutEvent":
                break  # leave early: the stream must close, the thread must end
        left = time.monotonic() - start
        client.delete(created.id)
        return created.id, kinds, left


async def test_sync_client_streams_and_leaving_early_cleans_up(gw: RunningGateway) -> None:
    with trio.fail_after(60):
        _sid, kinds, elapsed = await trio.to_thread.run_sync(_sync_session, gw.url)
    assert "ExecStartedEvent" in kinds and kinds[-1] == "StdoutEvent"
    assert elapsed < 10
    assert not [t for t in threading.enumerate() if t.name == "sandstorm-stream"]


async def test_async_client_errors_are_sandstorm_errors(gw: RunningGateway) -> None:
    with trio.fail_after(30):
        async with AsyncClient(gw.url) as client:
            with pytest.raises(SandstormError) as info:
                await client.status("sbx_00000000000000000000000000")
            assert (info.value.status, info.value.code) == (404, "not_found")
            with pytest.raises(SandstormError) as info:
                async with client.stream("sbx_00000000000000000000000000"):
                    pass
            assert (info.value.status, info.value.code) == (404, "not_found")
            result = await client.run(code="print(2 + 2)", language="python", keep_alive=0)
            assert result.result is not None and result.result.stdout == "4\n"
