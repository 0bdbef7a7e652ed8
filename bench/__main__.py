"""``python -m bench [--scenario NAME…] [--quick] [--file-mib N] [--json FILE] [--plot FILE.png]``

Starts a real gateway (Hypercorn on a free port, real runsc) in this process and runs each
scenario against it and against the raw runtime, interleaved (A B A B…) so that both see the same
machine noise. Prints p50/p90/p99, the ratio of medians and whether each scenario meets its
performance target (``bench.targets``, docs/performance.md); writes JSON (with every sample)
and a box plot on request.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any, get_args

import trio

from bench.files import FILE_MIB, QUICK_FILE_MIB
from bench.harness import Interrupted, bench_context, loadavg, machine
from bench.scenarios import ROUNDS, SCENARIOS
from bench.targets import verdict
from sandstorm.config import DEFAULT_GVISOR_PLATFORM, GvisorPlatform


async def run_all(
    names: list[str], quick: bool, gvisor_platform: str | None = None, file_mib: int | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The rows of every scenario that ran, and why each one that failed did: a failed
    scenario (a request refused under load) does not cost the others' results."""
    rows: dict[str, Any] = {}
    failed: dict[str, str] = {}
    ran: set[object] = set()
    mib = file_mib or (QUICK_FILE_MIB if quick else FILE_MIB)
    async with bench_context(quick, gvisor_platform, mib) as ctx:
        for name in names:
            scenario = SCENARIOS[name]
            if scenario in ran:
                continue  # snapshot and resume come from one cycle
            ran.add(scenario)
            full, smoke = ROUNDS[name]
            try:
                produced = await scenario(ctx, smoke if quick else full)
            except Exception as exc:  # reported, and the exit status says so
                traceback.print_exc()
                failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"bench: scenario {name} failed: {failed[name]}", file=sys.stderr)
                continue
            for row_name, result in produced.items():
                row = result.to_json()
                row["target"] = verdict(row_name, row)
                rows[row_name] = row
    # Only the rows asked for: --scenario resume does not report the snapshot row.
    asked = {k: v for k, v in rows.items() if any(k == n or k.startswith(n + "-") for n in names)}
    return asked, failed


def print_table(results: dict[str, Any]) -> None:
    print(f"{'scenario':<20} {'side':<8} {'unit':<5} {'p50':>9} {'p90':>9} {'p99':>9} "
          f"{'ratio':>7}  target")  # fmt: skip
    for name, r in results.items():
        for side in ("gateway", "raw"):
            s = r[side]
            ratio = target = ""
            if side == "gateway":
                ratio = f"{r['ratio_p50']:.2f}x" if r["ratio_p50"] else "-"
                if r["target"] is not None:
                    met = "met" if r["target"]["met"] else "MISSED"
                    target = f"{met} ({r['target']['target']})"
            if s["n"] == 0:  # a row measured through the gateway only
                print(f"{name:<20} {side:<8} {r['unit']:<5} {'-':>9} {'-':>9} {'-':>9}")
                continue
            print(f"{name:<20} {side:<8} {r['unit']:<5} {s['p50']:>9.2f} {s['p90']:>9.2f} "
                  f"{s['p99']:>9.2f} {ratio:>7}  {target}")  # fmt: skip
        extra = ", ".join(f"{k}={v}" for k, v in r["extra"].items())
        for line in ([extra] if extra else []) + r["notes"]:
            print(f"{'':<20} note: {line}")


SIDES = (("gateway", "gateway"), ("raw", "raw runsc"))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # optional extra: pip install 'sandstorm[bench]'

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(results))
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (name, r) in zip(flat, results.items(), strict=False):
        sides = [(label, r["samples"][side]) for side, label in SIDES if r["samples"][side]]
        ax.boxplot([samples for _, samples in sides], tick_labels=[label for label, _ in sides])
        title = name
        if r["target"] is not None:
            title += " (target " + ("met" if r["target"]["met"] else "missed") + ")"
        ax.set_title(title)
        ax.set_ylabel(r["unit"])
    for ax in flat[len(results) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _signal_of(group: BaseExceptionGroup[Interrupted]) -> int:
    first = group.exceptions[0]
    return _signal_of(first) if isinstance(first, BaseExceptionGroup) else first.signum


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few rounds each")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument(
        "--gvisor-platform",
        choices=get_args(GvisorPlatform),
        help="runsc --platform for both sides (default: the gateway's, gvisor_platform)",
    )
    parser.add_argument(
        "--file-mib",
        type=int,
        help=f"MiB moved by files-upload/-download (default {FILE_MIB}, {QUICK_FILE_MIB} "
        "with --quick)",
    )
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(args.scenario or SCENARIOS))
    load_before = loadavg()
    try:
        results, failed = trio.run(run_all, names, args.quick, args.gvisor_platform, args.file_mib)
    except BaseExceptionGroup as group:
        interrupted, rest = group.split(Interrupted)
        if interrupted is None or rest is not None:
            raise
        signum = _signal_of(interrupted)
        print(f"bench: stopped by signal {signum}; its sandboxes are destroyed", file=sys.stderr)
        return 128 + signum
    print_table(results)
    for name, why in failed.items():
        print(f"{name:<20} FAILED: {why}")
    if args.json:
        # The host's load average before and after: other work on the machine shows here.
        about = {**machine(), "loadavg_before": load_before, "loadavg_after": loadavg()}
        about["gvisor_platform"] = args.gvisor_platform or DEFAULT_GVISOR_PLATFORM
        report = {"machine": about, "results": results, "failed": failed}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot and results:
        plot(results, args.plot)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
