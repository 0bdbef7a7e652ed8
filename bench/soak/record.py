"""What the soak saw: every request with its deadline and answer, every answer that was not the
one expected, and the windows in which injected faults were in force.

Classification happens afterwards (``bench.soak.report``): a failure is *explained* only by a
fault window it overlaps and whose kind accounts for it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

#: Past its own budget, a request gets this long before it counts as hung.
HANG_GRACE_S = 5.0


@dataclass
class Outcome:
    kind: str  # the scenario step, e.g. "run.gvisor", "exec", "bad.malformed_json"
    method: str
    path: str
    start: float
    end: float
    budget: float  # the request's own timeout (its exec timeout, a boot, ...)
    status: int | None = None  # None: no answer (transport error, or hung)
    error: str = ""  # the error body's code, or the transport error's type
    message: str = ""
    hung: bool = False


@dataclass
class Anomaly:
    """An answer that was not the one expected. ``lost`` marks output that differs from what the
    program wrote although the exec reported success: nothing explains that."""

    kind: str
    what: str
    start: float
    end: float
    lost: bool = False


@dataclass
class Window:
    kind: str  # gateway_kill, disk_full, memory, shim_kill, runsc_kill, qemu_kill, gateway_crash
    start: float
    end: float | None = None
    detail: str = ""

    def overlaps(self, start: float, end: float) -> bool:
        return start <= (self.end if self.end is not None else float("inf")) and end >= self.start


@dataclass
class Record:
    began: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    fault_checks: list[str] = field(default_factory=list)  # a fault's own post-condition failed
    counts: dict[str, int] = field(default_factory=dict)  # scenario runs, verdicts, bytes checked

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def open_window(self, kind: str, detail: str = "") -> Window:
        window = Window(kind, time.monotonic(), None, detail)
        self.windows.append(window)
        return window

    def anomaly(self, kind: str, what: str, start: float, *, lost: bool = False) -> None:
        self.anomalies.append(Anomaly(kind, what, start, time.monotonic(), lost))


class Client:
    """Requests against whichever gateway is serving now, each under a deadline of its budget
    plus ``HANG_GRACE_S``; every one is recorded. One pooled connection set per client, as an
    ordinary API client keeps."""

    def __init__(self, record: Record, base_url: Callable[[], str], connections: int = 4) -> None:
        self.record = record
        self.base_url = base_url  # the current gateway's URL
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx.AsyncClient(timeout=None, limits=limits)

    def url(self, path: str) -> str:
        return f"{self.base_url()}{path}"

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self.http.aclose()

    async def request(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        budget: float = 10.0,
        json_body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response | None:
        """The answer, or None when none came (recorded as a transport error or a hang)."""
        start = time.monotonic()
        outcome = Outcome(kind, method, path, start, start, budget)
        self.record.outcomes.append(outcome)
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        response: httpx.Response | None = None
        with trio.move_on_after(budget + HANG_GRACE_S) as scope:
            try:
                response = await self.http.request(
                    method, self.url(path), content=content, headers=headers
                )
            except httpx.TransportError as exc:
                outcome.error = type(exc).__name__
                outcome.message = str(exc)[:300]
        outcome.end = time.monotonic()
        if scope.cancelled_caught:
            outcome.hung = True
            outcome.error = "hung"
            return None
        if response is not None:
            outcome.status = response.status_code
            if response.status_code >= 400:
                outcome.error, outcome.message = error_of(response)
        return response


def error_of(response: httpx.Response) -> tuple[str, str]:
    """The error body's code and message (or what the body was, when it is not one)."""
    try:
        error = response.json()["error"]
        return str(error.get("code", "")), str(error.get("message", ""))[:500]
    except (ValueError, KeyError, TypeError):
        return "no_error_body", response.text[:300]
