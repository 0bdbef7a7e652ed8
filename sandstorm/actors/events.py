"""A sandbox's event log: seq-numbered, encoded once, a bounded replay buffer, bounded fan-out.

Every event is encoded to JSON exactly once, when it is appended; replay and live delivery hand
out the same bytes. Each subscriber has its own bounded outbox.

Flow control: when a subscriber's outbox is full, the producer (the sandbox's agent reader)
waits for it, which in turn pauses the sandbox's output (its pipe fills) — so a client that reads
gets every byte, however fast the program writes. A subscriber that takes nothing for
``stall_timeout`` seconds has stopped reading: it is marked lagged and cut off, and the producer
goes on. Memory stays bounded either way; a client that stops reading costs the sandbox at most
one stall timeout.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from sandstorm.api.timestamps import rfc3339
from sandstorm.api.types import JSON_ENCODER, StreamEvent


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    seq: int
    data: bytes


# A burst of events appended back to back (an exit and its status, a teardown's final frames)
# must not cut off a reader that is keeping up: the outbox holds this many beyond its mark.
BURST_SLACK = 64


class Subscriber:
    """One reader of the log: iterate it (replay first, then live events); check ``lagged``
    when the iteration ends.

    The outbox has a mark in events and in bytes. At the mark the producer waits for this
    reader (see :meth:`EventLog.wait_for_readers`); beyond mark + slack (or twice the bytes)
    the reader is cut off.
    """

    def __init__(
        self, log: EventLog, capacity: int, max_bytes: int, replay: list[EncodedEvent]
    ) -> None:
        self._log = log
        self._send, self._receive = trio.open_memory_channel[EncodedEvent](capacity + BURST_SLACK)
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self._replay = deque(replay)
        self.lagged = False
        self.closed = False
        self.missed_from: int | None = None
        self._drained = trio.Event()

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> EncodedEvent:
        """The next event; ends when the log closes or this subscriber was cut off."""
        if self._replay:
            await trio.lowlevel.checkpoint()
            return self._replay.popleft()
        try:
            event = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        self.queued_bytes -= len(event.data)
        if not self._above_low_water:
            self._drained.set()
        return event

    @property
    def _queued(self) -> int:
        return self._receive.statistics().current_buffer_used

    @property
    def full(self) -> bool:
        return not self.closed and (
            self._queued >= self.capacity or self.queued_bytes >= self.max_bytes
        )

    @property
    def _above_low_water(self) -> bool:
        return self._queued > self.capacity // 2 or self.queued_bytes > self.max_bytes // 2

    def _cut_off(self, missed_from: int) -> None:
        self.lagged = True
        self.missed_from = missed_from
        self.close()

    def _deliver(self, event: EncodedEvent) -> None:
        if self.queued_bytes + len(event.data) > 2 * self.max_bytes:
            self._cut_off(event.seq)
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._cut_off(event.seq)
            return
        except trio.BrokenResourceError:
            self.close()
            return
        self.queued_bytes += len(event.data)
        if self._above_low_water:
            self._drained = trio.Event()

    def close(self) -> None:
        self.closed = True
        self._log._subscribers.discard(self)
        self._send.close()
        self._drained.set()


class EventLog:
    def __init__(self, max_bytes: int, *, last_seq: int = 0) -> None:
        """``last_seq``: where a log picked up after a gateway restart continues (the events
        up to it are gone with the old process; a reader asking for them is told it lagged)."""
        self.max_bytes = max_bytes
        self._events: deque[EncodedEvent] = deque()
        self._bytes = 0
        self._next_seq = last_seq + 1
        self._subscribers: set[Subscriber] = set()
        self.closed = False

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def first_retained_seq(self) -> int:
        return self._events[0].seq if self._events else self._next_seq

    def append(self, make: Callable[[int, str], StreamEvent]) -> int:
        """Build the event with the next seq and now's timestamp, store it, fan it out."""
        seq = self._next_seq
        self._next_seq += 1
        encoded = EncodedEvent(seq, JSON_ENCODER.encode(make(seq, rfc3339())))
        self._events.append(encoded)
        self._bytes += len(encoded.data)
        while self._bytes > self.max_bytes and len(self._events) > 1:
            self._bytes -= len(self._events.popleft().data)
        for sub in list(self._subscribers):
            sub._deliver(encoded)
        return seq

    async def wait_for_readers(self, stall_timeout: float) -> None:
        """Producer side of flow control: return once no subscriber's outbox is at its mark.

        Each full outbox must drain to half within ``stall_timeout`` (one deadline for all of
        them); a reader that does not is cut off (lagged). So a reader that keeps up gets every
        event, and one that stopped, or crawls, costs the producer at most one timeout.
        """
        full = [sub for sub in self._subscribers if sub.full]
        if not full:
            return
        with trio.move_on_after(stall_timeout):
            for sub in full:
                await sub._drained.wait()
        for sub in full:
            if not sub.closed and sub._above_low_water:
                sub._cut_off(self.last_seq + 1)

    def subscribe(
        self, since: int = 0, capacity: int = 1024, max_bytes: int = 8 * 1024 * 1024
    ) -> tuple[Subscriber, tuple[int, int] | None]:
        """Return a subscriber (which yields the retained events after ``since``, then live
        ones) and the missed range ``(from, to)``, set when events after ``since`` were
        already dropped from the replay buffer."""
        replay = [e for e in self._events if e.seq > since]
        sub = Subscriber(self, capacity, max_bytes, replay)
        missed = None
        first = self.first_retained_seq
        if since + 1 < first:
            missed = (since + 1, first - 1)
        if self.closed:
            sub._send.close()
        else:
            self._subscribers.add(sub)
        return sub, missed

    def close(self) -> None:
        """No more events: every subscriber's outbox ends after what it already holds."""
        self.closed = True
        for sub in list(self._subscribers):
            sub.close()

    def statistics(self) -> dict[str, float]:
        return {
            "events": len(self._events),
            "bytes": self._bytes,
            "subscribers": len(self._subscribers),
            "last_seq": self.last_seq,
            "max_bytes": self.max_bytes if self.max_bytes else math.inf,
        }
