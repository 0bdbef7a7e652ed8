"""Prometheus metrics of one gateway (``GET /metrics``).

Every :class:`Metrics` owns its own ``CollectorRegistry``: several gateways can run in one process
(the tests do), and the global default registry would mix them. Counters and histograms are
updated where things happen (one call each); gauges that mirror the router's tables (sandboxes by
state, open streams) are read at scrape time, so they can never drift from the truth.
"""

from __future__ import annotations

import platform
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sandstorm import __version__
from sandstorm.api.types import ExecResult, RuntimeName, SandboxState, Verdict

# The classic text format that generate_latest() writes, which every Prometheus version reads
# (prometheus-client's CONTENT_TYPE_LATEST names a newer version in recent releases).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# 1 ms to 30 s: a warm exec takes milliseconds, a cold gVisor boot a few hundred, a restore or a
# loaded host seconds. Longer ones land in +Inf (and in _sum).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
LIVE_STATES: tuple[SandboxState, ...] = ("creating", "running", "idle", "snapshotting", "stopping")
RUNTIMES: tuple[RuntimeName, ...] = get_args(RuntimeName)
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)
# Why a request for new work was refused; each is also the error code the client got, except
# shutting_down (an at_capacity answer while the gateway drains).
REFUSAL_REASONS = ("at_capacity", "quota_exceeded", "runtime_unavailable", "shutting_down")
REFUSED_RESOURCES = ("sandbox", "exec", "stream")
# How a sandbox's agent (or the runtime under it) failed.
AGENT_FAILURES = ("boot", "exited", "oom", "protocol", "unresponsive", "internal")
# Warm pool: a sandbox booted into it, claimed as booted or with its limits set on claim, a
# run it could not serve, one destroyed unused to make room, one that failed.
POOL_EVENTS = ("booted", "claimed", "adjusted", "miss", "evicted", "failed")
POOL_STATES = ("ready", "booting")

LiveSandboxes = Callable[[], Iterable[tuple[str, str]]]
PoolGauges = Callable[[], Iterable[tuple[str, str, int]]]


class Metrics:
    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.create_seconds = Histogram(
            "sandstorm_sandbox_create_seconds",
            "Time from admission until a new sandbox's agent is ready",
            ["runtime", "source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exec_seconds = Histogram(
            "sandstorm_exec_duration_seconds",
            "Wall time of finished execs, from start to exit",
            ["runtime"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter(
            "sandstorm_exec_verdicts", "Finished execs by verdict", ["verdict"], registry=r
        )
        self.refusals = Counter(
            "sandstorm_admissions_refused",
            "Requests for new work refused, by reason and by what was asked for",
            ["reason", "resource"],
            registry=r,
        )
        self.streams_opened = Counter(
            "sandstorm_stream_connections_opened", "Stream WebSockets accepted", registry=r
        )
        self.agent_failures = Counter(
            "sandstorm_agent_failures",
            "Sandboxes failed because of their agent or runtime, by reason class",
            ["reason"],
            registry=r,
        )
        self.sandboxes_ended = Counter(
            "sandstorm_sandboxes_ended",
            "Sandboxes that ended, by final state",
            ["state", "runtime"],
            registry=r,
        )
        self.pool_events = Counter(
            "sandstorm_pool_events",
            "Warm pool sandboxes booted, claimed (as booted, or adjusted to the request's "
            "limits), runs it could not serve (miss), and pool sandboxes evicted or failed",
            ["runtime", "event"],
            registry=r,
        )
        info = Info("sandstorm_gateway", "The gateway build", registry=r)
        info.info({"version": __version__, "python": platform.python_version()})
        # Series that exist from the start, at 0, so rates and alerts work before the first event.
        for verdict in VERDICTS:
            self.verdicts.labels(verdict)
        for reason in REFUSAL_REASONS:
            for resource in REFUSED_RESOURCES:
                self.refusals.labels(reason, resource)
        for failure in AGENT_FAILURES:
            self.agent_failures.labels(failure)
        self._creating: Tally[str] = Tally()
        self._live: LiveSandboxes = lambda: ()
        self._streams: Callable[[], int] = lambda: 0
        self._draining: Callable[[], bool] = lambda: False
        self._pool: PoolGauges = lambda: ()
        r.register(_LiveCollector(self))
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    # ------------------------------------------------------------------ wiring

    def watch(
        self, sandboxes: LiveSandboxes, streams: Callable[[], int], draining: Callable[[], bool]
    ) -> None:
        """Where the scrape-time gauges read from: ``sandboxes()`` yields (state, runtime) of
        every sandbox the router knows, ``streams()`` the open stream count."""
        self._live, self._streams, self._draining = sandboxes, streams, draining

    def watch_pool(self, pool: PoolGauges) -> None:
        """Where ``sandstorm_pool_sandboxes`` reads from: (runtime, state, count) triples.
        Pool sandboxes are counted there only, never in ``sandstorm_sandboxes``."""
        self._pool = pool

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ events

    @contextmanager
    def creating(self, runtime: str, source: str) -> Iterator[None]:
        """Count a sandbox as ``creating`` while it boots, and time it when it succeeds."""
        self._creating[runtime] += 1
        started = time.perf_counter()
        try:
            yield
            self.create_seconds.labels(runtime, source).observe(time.perf_counter() - started)
        finally:
            self._creating[runtime] -= 1

    def exec_finished(self, runtime: str, result: ExecResult) -> None:
        self.exec_seconds.labels(runtime).observe(result.duration_ms / 1000)
        self.verdicts.labels(result.verdict).inc()

    def refused(self, reason: str, resource: str) -> None:
        self.refusals.labels(reason, resource).inc()

    def agent_failed(self, reason: str) -> None:
        self.agent_failures.labels(reason).inc()

    def pool_event(self, runtime: str, event: str) -> None:
        self.pool_events.labels(runtime, event).inc()

    def sandbox_ended(self, state: str, runtime: str) -> None:
        self.sandboxes_ended.labels(state, runtime).inc()


class _LiveCollector(Collector):
    """The gauges computed at scrape time from the router's tables."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        counts: Tally[tuple[str, str]] = Tally()
        counts.update((s, r) for s, r in m._live() if s in LIVE_STATES)
        for runtime, n in m._creating.items():
            counts["creating", runtime] += n
        sandboxes = GaugeMetricFamily(
            "sandstorm_sandboxes",
            "Sandboxes not yet ended, by state and runtime",
            labels=["state", "runtime"],
        )
        for runtime in RUNTIMES:
            for state in LIVE_STATES:
                sandboxes.add_metric([state, runtime], counts[state, runtime])
        pool = GaugeMetricFamily(
            "sandstorm_pool_sandboxes",
            "Unclaimed warm pool sandboxes, by runtime and state (ready, booting)",
            labels=["runtime", "state"],
        )
        pooled: Tally[tuple[str, str]] = Tally()
        for pool_runtime, pool_state, n in m._pool():
            pooled[pool_runtime, pool_state] += n
        for (pool_runtime, pool_state), n in sorted(pooled.items()):
            pool.add_metric([pool_runtime, pool_state], n)
        return [
            sandboxes,
            pool,
            GaugeMetricFamily(
                "sandstorm_stream_connections", "Stream WebSockets open now", m._streams()
            ),
            GaugeMetricFamily(
                "sandstorm_draining",
                "1 while the gateway is shutting down and refusing new work",
                1 if m._draining() else 0,
            ),
        ]
