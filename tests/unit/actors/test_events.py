"""The event log on its own: seq numbers, replay bounds, lagged ranges and flow control."""

from __future__ import annotations

import json

import trio

from sandstorm.actors.events import BURST_SLACK, EventLog
from sandstorm.api.types import StdoutEvent


def out(data: str):  # type: ignore[no-untyped-def]
    return lambda seq, ts: StdoutEvent(seq=seq, ts=ts, exec_id="exe_x", data=data)


async def take_all(sub) -> list[int]:  # type: ignore[no-untyped-def]
    return [e.seq async for e in sub]


async def test_seq_numbers_and_replay_after_since() -> None:
    log = EventLog(max_bytes=1 << 20)
    for i in range(5):
        assert log.append(out(str(i))) == i + 1
    sub, missed = log.subscribe(since=2)
    assert missed is None
    log.close()
    events = [e async for e in sub]
    assert [e.seq for e in events] == [3, 4, 5]
    assert json.loads(events[0].data)["data"] == "2"


async def test_a_log_picked_up_after_a_restart_continues_its_seq_and_reports_the_gap() -> None:
    log = EventLog(max_bytes=1 << 20, last_seq=41)
    assert log.last_seq == 41
    assert log.append(out("after")) == 42
    sub, missed = log.subscribe(since=10)
    log.close()
    assert missed == (11, 41)
    assert await take_all(sub) == [42]


async def test_replay_buffer_is_bounded_and_reports_what_was_dropped() -> None:
    log = EventLog(max_bytes=1000)
    for _ in range(100):
        log.append(out("x" * 50))
    assert log.statistics()["bytes"] <= 1000
    sub, missed = log.subscribe(since=0)
    log.close()
    seqs = await take_all(sub)
    assert missed == (1, seqs[0] - 1)
    assert seqs[-1] == 100


async def test_a_reading_subscriber_gets_everything_the_producer_waits() -> None:
    log = EventLog(max_bytes=1 << 20)
    sub, _ = log.subscribe(capacity=4)
    got: list[int] = []

    async def slow_reader() -> None:
        async for event in sub:
            got.append(event.seq)
            await trio.sleep(0.005)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            for i in range(50):
                log.append(out(str(i)))
                # Bursts (an exit then a status) are appended without a wait in between.
                if i % 10 == 0:
                    log.append(out("burst"))
                await log.wait_for_readers(stall_timeout=1.0)
            log.close()
    assert got == list(range(1, 56))
    assert not sub.lagged


async def test_a_reader_still_on_its_replay_is_not_cut_off() -> None:
    log = EventLog(max_bytes=1 << 20)
    for i in range(100):
        log.append(out(str(i)))
    sub, _ = log.subscribe(capacity=4)
    got: list[int] = []

    async def reader() -> None:
        async for event in sub:
            got.append(event.seq)
            await trio.sleep(0.002)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(20):
                log.append(out(str(i)))
                await log.wait_for_readers(stall_timeout=1.0)
            log.close()
    assert got == list(range(1, 121))


async def test_a_subscriber_that_stops_reading_is_cut_off_after_the_stall_timeout() -> None:
    log = EventLog(max_bytes=1 << 20)
    stuck, _ = log.subscribe(capacity=4)
    with trio.fail_after(10):
        start = trio.current_time()
        for i in range(20):
            log.append(out(str(i)))
            await log.wait_for_readers(stall_timeout=0.2)
        # One stall, then the producer runs free.
        assert 0.2 <= trio.current_time() - start < 1.0
    assert stuck.lagged
    assert stuck.missed_from == 5
    assert await take_all(stuck) == [1, 2, 3, 4]


def test_the_outbox_is_bounded_in_bytes_too() -> None:
    log = EventLog(max_bytes=64 << 20)
    stuck, _ = log.subscribe(capacity=1000, max_bytes=100_000)
    for _ in range(100):
        log.append(out("x" * 10_000))  # no wait: a burst well past the byte mark
    assert stuck.lagged
    assert stuck.queued_bytes <= 2 * 100_000
    assert BURST_SLACK > 0
