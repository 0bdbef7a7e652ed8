"""``GET /metrics``: real runs, execs, refusals and a stream against a real gateway, then the
scrape parsed with prometheus_client's own parser; every value moved by exactly what was done."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from sandstorm.api.types import ExecResult
from sandstorm.metrics import Metrics
from tests.harness import RunningGateway

MIB = 1024 * 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(gw: RunningGateway) -> Samples:
    response = await gw.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape_until(gw: RunningGateway, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``ready`` holds: teardown bookkeeping lands just after DELETE-like events."""
    while not ready(samples := await scrape(gw)):
        await trio.sleep(0.05)
    return samples


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_move_by_exactly_what_was_done(start_gateway: Callable[..., Any]) -> None:
    async with start_gateway(max_sandboxes=2) as gw:
        with trio.fail_after(120):
            before = await scrape(gw)
            ok = await gw.run_ok(command=["true"], keep_alive=0)
            timeout = await gw.run_ok(command=["sleep", "30"], timeout=300, keep_alive=0)
            oom = await gw.run_ok(
                code="b = []\nwhile True:\n    b.append(bytearray(8 << 20))",
                language="python",
                memory_limit=64 * MIB,
                keep_alive=0,
            )
            assert ok["result"]["verdict"] == "ok"
            assert timeout["result"]["verdict"] == "timeout"
            assert oom["result"]["verdict"] == "oom"
            for body in (ok, timeout, oom):
                await gw.wait_state(body["id"], "destroyed", "failed")
            # At its limit the sentry either fails the allocation (the exec gets "oom" and the
            # sandbox lives on) or the host kernel kills the whole sandbox (failed, an agent
            # failure): both happen here, and the metrics must count whichever it was.
            oom_failed = int((await gw.status(oom["id"]))["state"] == "failed")
            kept = await gw.run_ok(command=["true"], keep_alive=120)
            other = await gw.run_ok(command=["true"], keep_alive=120)
            sid = kept["id"]
            for command, verdict in ((["echo", "hi"], "ok"), (["false"], "error")):
                response = await gw.client.post(
                    f"/v1/sandboxes/{sid}/exec", json={"command": command}
                )
                assert response.json()["result"]["verdict"] == verdict, response.text
            # max_sandboxes=2 and two live sandboxes: the third is refused.
            refused = await gw.run(command=["true"])
            assert refused.status_code == 503, refused.text
            async with gw.stream(sid) as ws:
                await ws.get_message()
                during = await scrape(gw)
            after = await scrape_until(
                gw,
                lambda s: value(s, "sandstorm_stream_connections") == 0
                and delta(before, s, "sandstorm_sandboxes_ended_total", state="failed",
                          runtime="gvisor") == oom_failed
                and delta(before, s, "sandstorm_sandboxes_ended_total", state="destroyed",
                          runtime="gvisor") == 3 - oom_failed,
            )  # fmt: skip

        def moved(name: str, **labels: str) -> float:
            return delta(before, after, name, **labels)

        assert value(during, "sandstorm_stream_connections") == 1
        assert moved("sandstorm_stream_connections_opened_total") == 1
        assert {
            verdict: moved("sandstorm_exec_verdicts_total", verdict=verdict)
            for verdict in ("ok", "error", "timeout", "oom", "output_limit", "killed")
        } == {"ok": 4, "error": 1, "timeout": 1, "oom": 1, "output_limit": 0, "killed": 0}
        assert moved("sandstorm_exec_duration_seconds_count", runtime="gvisor") == 7
        # The timeout exec ran at least 0.3 s; the sum is in seconds, not milliseconds.
        assert 0.3 <= moved("sandstorm_exec_duration_seconds_sum", runtime="gvisor") < 60
        create = {"runtime": "gvisor", "source": "image"}
        assert moved("sandstorm_sandbox_create_seconds_count", **create) == 5
        assert moved("sandstorm_sandbox_create_seconds_bucket", le="+Inf", **create) == 5
        assert moved("sandstorm_sandbox_create_seconds_bucket", le="0.001", **create) == 0
        assert moved("sandstorm_admissions_refused_total", reason="at_capacity",
                     resource="sandbox") == 1  # fmt: skip
        refusals = sum(
            v - value(before, n, **dict(labels))
            for (n, labels), v in after.items()
            if n == "sandstorm_admissions_refused_total"
        )
        assert refusals == 1
        assert moved("sandstorm_agent_failures_total", reason="oom") == oom_failed
        failures = sum(
            v - value(before, n, **dict(labels))
            for (n, labels), v in after.items()
            if n == "sandstorm_agent_failures_total"
        )
        assert failures == oom_failed
        assert value(after, "sandstorm_sandboxes", state="idle", runtime="gvisor") == 2
        for state in ("creating", "running", "snapshotting", "stopping"):
            assert value(after, "sandstorm_sandboxes", state=state, runtime="gvisor") == 0
        assert value(after, "sandstorm_draining") == 0
        assert value(after, "sandstorm_gateway_info", version="0.1.0", python=_python()) == 1
        assert value(after, "process_resident_memory_bytes") > 0
        for body in (kept, other):
            await gw.client.delete(f"/v1/sandboxes/{body['id']}")


def _python() -> str:
    import platform

    return platform.python_version()


def test_each_gateway_has_its_own_registry() -> None:
    one, two = Metrics(process=False), Metrics(process=False)
    result = ExecResult(
        exec_id="exe_x", exit_code=0, signal=None, verdict="ok", stdout="", stderr="",
        stdout_truncated=False, stderr_truncated=False, duration_ms=12.0, cpu_time_ms=1.0,
        max_rss_bytes=0,
    )  # fmt: skip
    one.exec_finished("gvisor", result)
    assert b'sandstorm_exec_verdicts_total{verdict="ok"} 1.0' in one.render()
    assert b'sandstorm_exec_verdicts_total{verdict="ok"} 0.0' in two.render()
    assert b'sandstorm_exec_duration_seconds_bucket{le="0.025",runtime="gvisor"} 1.0' in (
        one.render()
    )
