"""``python -m bench [--scenario NAME…] [--quick] [--json FILE] [--plot FILE.png]``

Starts a real gateway (Hypercorn on a free port, real runsc) in this process and runs each
scenario against it and against the raw runtime, interleaved (A B A B…) so that both see the same
machine noise. Prints p50/p90/p99, the ratio of medians and whether issue 6's target is met;
writes JSON (with every sample) and a box plot on request.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from bench.harness import bench_context, loadavg, machine
from bench.scenarios import ROUNDS, SCENARIOS
from bench.targets import verdict


async def run_all(names: list[str], quick: bool) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    ran: set[object] = set()
    async with bench_context(quick) as ctx:
        for name in names:
            scenario = SCENARIOS[name]
            if scenario in ran:
                continue  # snapshot and resume come from one cycle
            ran.add(scenario)
            full, smoke = ROUNDS[name]
            produced = await scenario(ctx, smoke if quick else full)
            for row_name, result in produced.items():
                row = result.to_json()
                row["target"] = verdict(row_name, row)
                rows[row_name] = row
    # Only the rows asked for: --scenario resume does not report the snapshot row.
    return {k: v for k, v in rows.items() if any(k == n or k.startswith(n + "-") for n in names)}


def print_table(results: dict[str, Any]) -> None:
    print(f"{'scenario':<18} {'side':<8} {'unit':<5} {'p50':>9} {'p90':>9} {'p99':>9} "
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
            print(f"{name:<18} {side:<8} {r['unit']:<5} {s['p50']:>9.2f} {s['p90']:>9.2f} "
                  f"{s['p99']:>9.2f} {ratio:>7}  {target}")  # fmt: skip
        extra = ", ".join(f"{k}={v}" for k, v in r["extra"].items())
        for line in ([extra] if extra else []) + r["notes"]:
            print(f"{'':<18} note: {line}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # optional extra: pip install 'sandstorm[bench]'

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(results))
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (name, r) in zip(flat, results.items(), strict=False):
        samples = [r["samples"]["gateway"], r["samples"]["raw"]]
        ax.boxplot(samples, tick_labels=["gateway", "raw runsc"])
        title = name
        if r["target"] is not None:
            title += " (target " + ("met" if r["target"]["met"] else "missed") + ")"
        ax.set_title(title)
        ax.set_ylabel(r["unit"])
    for ax in flat[len(results) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few rounds each")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(args.scenario or SCENARIOS))
    load_before = loadavg()
    results = trio.run(run_all, names, args.quick)
    print_table(results)
    if args.json:
        # The host's load average before and after: other work on the machine shows here.
        about = {**machine(), "loadavg_before": load_before, "loadavg_after": loadavg()}
        args.json.write_text(json.dumps({"machine": about, "results": results}, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
