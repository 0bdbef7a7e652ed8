"""The gateway's performance targets (docs/performance.md), checked against a scenario's JSON
row: "met" or "missed"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    text: str
    p50_max: float | None = None  # gateway median at most (costs)
    p50_min: float | None = None  # gateway median at least (throughputs)
    ratio_max: float | None = None  # gateway median / raw median at most
    ratio_min: float | None = None
    extra_max: tuple[str, float] | None = None  # a named extra figure at most
    zero: tuple[str, ...] = ()  # named extra figures that must be 0

    def check(self, row: dict[str, Any]) -> bool:
        p50, ratio, extra = row["gateway"]["p50"], row["ratio_p50"], row["extra"]
        checks = [
            self.p50_max is None or p50 <= self.p50_max,
            self.p50_min is None or p50 >= self.p50_min,
            self.ratio_max is None or (ratio is not None and ratio <= self.ratio_max),
            self.ratio_min is None or (ratio is not None and ratio >= self.ratio_min),
            self.extra_max is None or extra.get(self.extra_max[0], 0) <= self.extra_max[1],
            all(extra.get(name, 0) == 0 for name in self.zero),
        ]
        return all(checks)


_CONCURRENCY = Target("≥ 0.9x raw sb/s, 0 failures", ratio_min=0.9, zero=("gateway_failures",))
TARGETS: dict[str, Target] = {
    "cold-run": Target("≤ 1.15x raw", ratio_max=1.15),
    "warm-run": Target("p50 ≤ 25 ms", p50_max=25),
    "exec-true": Target("p50 ≤ 10 ms, ≤ 0.5x raw", p50_max=10, ratio_max=0.5),
    "exec-python": Target("p50 ≤ 15 ms, ≤ 0.5x raw", p50_max=15, ratio_max=0.5),
    "stream-first-byte": Target("p50 ≤ 5 ms", p50_max=5),
    "stream-throughput": Target("≥ 50 MB/s", p50_min=50),
    "snapshot": Target("≤ 1.2x raw", ratio_max=1.2),
    "resume": Target("≤ 1.2x raw", ratio_max=1.2),
    "footprint": Target("gateway RSS ≤ 150 MiB", extra_max=("gateway_rss_mib", 150)),
    "files-upload": Target("≥ 150 MB/s, ≥ 0.5x raw", p50_min=150, ratio_min=0.5),
    "files-download": Target("≥ 150 MB/s, ≥ 0.5x raw", p50_min=150, ratio_min=0.5),
    "files-small": Target("p50 ≤ 8 ms", p50_max=8),
}


def target_for(row_name: str) -> Target | None:
    if row_name.startswith("concurrency-"):
        return _CONCURRENCY
    return TARGETS.get(row_name)


def verdict(row_name: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """``{"target": text, "met": bool}`` for the JSON, or None for a row without a target."""
    target = target_for(row_name)
    if target is None:
        return None
    return {"target": target.text, "met": target.check(row)}
