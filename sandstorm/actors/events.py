"""A sandbox's event log: seq-numbered, encoded once, a bounded replay buffer, bounded fan-out.

Every event is encoded to JSON exactly once, when it is appended; replay and live delivery hand
out the same bytes. Each subscriber has its own bounded outbox: one that falls behind is marked
lagged and cut off, so a slow reader can never grow the gateway's memory or stall the sandbox.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from sandstorm.protocol import JSON_ENCODER, StreamEvent
from sandstorm.timestamps import rfc3339


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    seq: int
    data: bytes


class Subscriber:
    """One reader of the log. Iterate ``outbox``; check ``lagged`` when it ends."""

    def __init__(self, log: EventLog, capacity: int) -> None:
        self._log = log
        self._send, self.outbox = trio.open_memory_channel[EncodedEvent](capacity)
        self.lagged = False
        self.missed_from: int | None = None

    def _deliver(self, event: EncodedEvent) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.lagged = True
            self.missed_from = event.seq
            self.close()
        except trio.BrokenResourceError:
            self.close()

    def close(self) -> None:
        self._log._subscribers.discard(self)
        self._send.close()


class EventLog:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._events: deque[EncodedEvent] = deque()
        self._bytes = 0
        self._next_seq = 1
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

    def subscribe(
        self, since: int = 0, capacity: int = 1024
    ) -> tuple[Subscriber, list[EncodedEvent], tuple[int, int] | None]:
        """Return a live subscriber, the retained events after ``since`` and the missed range.

        The missed range ``(from, to)`` is set when events after ``since`` were already dropped
        from the replay buffer.
        """
        sub = Subscriber(self, capacity)
        replay = [e for e in self._events if e.seq > since]
        missed = None
        first = self.first_retained_seq
        if since + 1 < first:
            missed = (since + 1, first - 1)
        if self.closed:
            sub._send.close()
        else:
            self._subscribers.add(sub)
        return sub, replay, missed

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
