"""``python -m bench.soak --minutes M --concurrency N [--json FILE] [--vm-runs K] ...``

Starts a real gateway (``sandstorm serve``) on a data directory of its own (a tmpfs it mounts),
drives a mixed workload at N in flight on gVisor and QEMU while injecting faults on a schedule,
then deletes everything and checks for leaks. Prints a report; exits 1 on any leak, hang, lost
output, unexplained 5xx or unexpected answer, 0 otherwise. Needs root (mounts, cgroups, runsc).

``--vm-runs K`` instead does K QEMU runs in a row (no faults) and reports how many succeeded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from bench.soak.faults import FAULTS
from bench.soak.report import text, write_json
from bench.soak.run import Settings, soak


def parse(argv: list[str]) -> tuple[Settings, Path | None]:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16, help="scenarios in flight")
    p.add_argument(
        "--vm-workers",
        type=int,
        default=None,
        help="of those, how many run QEMU microVMs (default: 1 per 8)",
    )
    p.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, injected in turn (any of {', '.join(FAULTS)}; empty for none)",
    )
    p.add_argument("--first-fault", type=float, default=10.0, help="seconds before the first")
    p.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults")
    p.add_argument(
        "--fault-hold",
        type=float,
        default=8.0,
        help="seconds a full disk or a memory squeeze lasts",
    )
    p.add_argument("--disk-mib", type=int, default=1024, help="size of the data directory's tmpfs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vm-runs", type=int, default=0, help="only K QEMU runs in a row")
    p.add_argument(
        "--warm-pool", type=int, default=0, help="a gVisor warm pool of this size (default none)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults: {sorted(unknown)}")
    vm_workers = args.vm_workers if args.vm_workers is not None else max(1, args.concurrency // 8)
    pool = [{"runtime": "gvisor", "memory_limit": 128 << 20, "size": args.warm_pool}]
    settings = Settings(
        seconds=0 if args.vm_runs else args.minutes * 60,
        concurrency=args.concurrency,
        vm_workers=vm_workers,
        faults=[] if args.vm_runs else faults,
        first_fault_s=args.first_fault,
        fault_every_s=args.fault_every,
        fault_hold_s=args.fault_hold,
        disk_bytes=args.disk_mib << 20,
        seed=args.seed,
        vm_runs=args.vm_runs,
        warm_pool=pool if args.warm_pool else [],
    )
    return settings, args.json


def main(argv: list[str] | None = None) -> int:
    settings, json_path = parse(sys.argv[1:] if argv is None else argv)
    summary = trio.run(soak, settings)
    print(text(summary))
    if json_path is not None:
        write_json(summary, json_path)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
