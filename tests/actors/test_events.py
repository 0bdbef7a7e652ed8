"""The event log on its own: seq numbers, replay bounds, lagged ranges and flow control."""

from __future__ import annotations

import json

import trio

from sandstorm.actors.events import EventLog
from sandstorm.protocol import StdoutEvent


def out(data: str):  # type: ignore[no-untyped-def]
    return lambda seq, ts: StdoutEvent(seq=seq, ts=ts, exec_id="exe_x", data=data)


def test_seq_numbers_and_replay_after_since() -> None:
    log = EventLog(max_bytes=1 << 20)
    for i in range(5):
        assert log.append(out(str(i))) == i + 1
    sub, replay, missed = log.subscribe(since=2)
    assert [e.seq for e in replay] == [3, 4, 5]
    assert missed is None
    assert json.loads(replay[0].data)["data"] == "2"
    sub.close()


def test_replay_buffer_is_bounded_and_reports_what_was_dropped() -> None:
    log = EventLog(max_bytes=1000)
    for _ in range(100):
        log.append(out("x" * 50))
    assert log.statistics()["bytes"] <= 1000
    sub, replay, missed = log.subscribe(since=0)
    assert missed == (1, replay[0].seq - 1)
    assert replay[-1].seq == 100
    sub.close()


async def test_a_reading_subscriber_gets_everything_the_producer_waits() -> None:
    log = EventLog(max_bytes=1 << 20)
    sub, _, _ = log.subscribe(capacity=4)
    got: list[int] = []

    async def slow_reader() -> None:
        async for event in sub:
            got.append(event.seq)
            await trio.sleep(0.01)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            for i in range(50):
                log.append(out(str(i)))
                await log.wait_for_readers(stall_timeout=1.0)
            log.close()
    assert got == list(range(1, 51))
    assert not sub.lagged


async def test_a_subscriber_that_stops_reading_is_cut_off_after_the_stall_timeout() -> None:
    log = EventLog(max_bytes=1 << 20)
    stuck, _, _ = log.subscribe(capacity=4)
    with trio.fail_after(10):
        start = trio.current_time()
        for i in range(20):
            log.append(out(str(i)))
            await log.wait_for_readers(stall_timeout=0.2)
        # One stall, then the producer runs free.
        assert 0.2 <= trio.current_time() - start < 1.0
    assert stuck.lagged
    assert stuck.missed_from == 5
    received = [e.seq async for e in stuck]
    assert received == [1, 2, 3, 4]
