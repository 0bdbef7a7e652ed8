"""``python -m bench [--scenario NAME…] [--quick] [--json FILE] [--plot FILE.png]``

Starts a real gateway (Hypercorn on a free port, real runsc) in this process and runs each
scenario against it and against the raw runtime, interleaved (A B A B…) so that both see the same
machine noise. Prints p50/p90/p99 and the ratio of medians; writes JSON on request.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from bench.harness import bench_context, machine
from bench.scenarios import ROUNDS, SCENARIOS


async def run_all(names: list[str], quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with bench_context(quick) as ctx:
        for name in names:
            full, smoke = ROUNDS[name]
            result = await SCENARIOS[name](ctx, smoke if quick else full)
            results[name] = result.to_json()
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{'scenario':<20} {'side':<8} {'unit':<5} {'p50':>9} {'p90':>9} {'p99':>9}  ratio(p50)")
    for name, r in results.items():
        for side in ("gateway", "raw"):
            s = r[side]
            ratio = f"{r['ratio_p50']:.2f}x" if side == "gateway" and r["ratio_p50"] else ""
            print(f"{name:<20} {side:<8} {r['unit']:<5} {s['p50']:>9.2f} {s['p90']:>9.2f} "
                  f"{s['p99']:>9.2f}  {ratio}")  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # optional extra: pip install 'sandstorm[bench]'

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        samples = [r["samples"]["gateway"], r["samples"]["raw"]]
        ax.boxplot(samples, tick_labels=["gateway", "raw runsc"])
        ax.set_title(name)
        ax.set_ylabel(r["unit"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few rounds each")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    names = args.scenario or list(SCENARIOS)
    results = trio.run(run_all, names, args.quick)
    print_table(results)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "results": results}, indent=2) + "\n"
        )
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
