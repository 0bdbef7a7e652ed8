"""The soak's verdict: requests by status, every 5xx with its cause and whether a fault explains
it, hung requests, lost output, other unexpected answers, the faults' own checks, and leaks.

A failure is explained only by a fault window it overlaps whose kind accounts for it:

- no answer at all (connection refused or reset): the gateway was down (killed, or crashed);
- a 5xx: 503 while the gateway was down or squeezed for memory, 507 or 503 while the disk was
  full, or a 500 whose message names the full disk;
- an unexpected answer or verdict: any gateway-wide fault (a sandbox whose create straddled a
  kill is failed by the next gateway, as documented).

Never explained: a hang (every request has a deadline), output that differs from what the
program wrote while the exec says it succeeded, a fault's own post-condition, and a leak."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from bench.soak.leaks import Leaks
from bench.soak.record import Anomaly, Outcome, Record, Window

GATEWAY_WIDE = ("gateway_kill", "gateway_crash", "disk_full", "memory")


def _explains(window: Window, outcome: Outcome) -> bool:
    if outcome.status is None:
        return window.kind in ("gateway_kill", "gateway_crash")
    if window.kind in ("gateway_kill", "gateway_crash", "memory"):
        return outcome.status == 503
    if window.kind == "disk_full":
        full = "space" in outcome.message.lower() or "storage" in outcome.message.lower()
        return outcome.status in (503, 507) or (outcome.status == 500 and full)
    return False


def explained_by(record: Record, outcome: Outcome) -> str | None:
    for window in record.windows:
        if window.overlaps(outcome.start, outcome.end) and _explains(window, outcome):
            return window.kind
    return None


def anomaly_explained_by(record: Record, anomaly: Anomaly) -> str | None:
    if anomaly.lost:
        return None
    for window in record.windows:
        if window.kind in GATEWAY_WIDE and window.overlaps(anomaly.start, anomaly.end):
            return window.kind
    return None


def summarize(
    record: Record, leaks: Leaks, unexpected_exits: list[str], settings: dict[str, Any]
) -> dict[str, Any]:
    by_status = Counter(str(o.status) if o.status is not None else o.error for o in record.outcomes)
    t0 = record.began
    errors, unexplained_errors, hung = [], [], []
    for o in record.outcomes:
        row = {
            "kind": o.kind,
            "method": o.method,
            "path": o.path,
            "status": o.status,
            "code": o.error,
            "message": o.message,
            "at_s": round(o.start - t0, 2),
            "took_s": round(o.end - o.start, 2),
            "budget_s": o.budget,
        }
        if o.hung:
            hung.append(row)
        elif o.status is None or o.status >= 500:
            row["explained_by"] = explained_by(record, o)
            errors.append(row)
            if row["explained_by"] is None:
                unexplained_errors.append(row)
    anomalies, unexplained_anomalies, lost = [], [], []
    for a in record.anomalies:
        row = {
            "kind": a.kind,
            "what": a.what,
            "at_s": round(a.start - t0, 2),
            "explained_by": anomaly_explained_by(record, a),
        }
        anomalies.append(row)
        if a.lost:
            lost.append(row)
        elif row["explained_by"] is None:
            unexplained_anomalies.append(row)
    # A gateway the kernel killed while the memory squeeze held it is the squeeze's doing.
    crashes = [
        w
        for w in record.windows
        if w.kind == "gateway_crash"
        and not any(m.kind == "memory" and m.overlaps(w.start, w.start) for m in record.windows)
    ]
    failures = {
        "hung": len(hung),
        "lost_output": len(lost),
        "unexplained_5xx": sum(1 for r in unexplained_errors if r["status"] is not None),
        "unexplained_no_answer": sum(1 for r in unexplained_errors if r["status"] is None),
        "unexpected_answers": len(unexplained_anomalies),
        "fault_checks": len(record.fault_checks),
        "gateway_crashes": len(crashes),
        "leaks": len(leaks.found) + len(leaks.cleanup),
        "vm_runs_failed": record.counts.get("vm_runs_failed", 0),
    }
    return {
        "settings": settings,
        "ok": not any(failures.values()),
        "failures": failures,
        "requests": len(record.outcomes),
        "requests_by_status": dict(sorted(by_status.items())),
        "requests_by_kind": dict(sorted(Counter(o.kind for o in record.outcomes).items())),
        "counts": dict(sorted(record.counts.items())),
        "faults": [
            {
                "kind": w.kind,
                "at_s": round(w.start - t0, 2),
                "detail": w.detail,
                "lasted_s": None if w.end is None else round(w.end - w.start, 2),
            }
            for w in record.windows
        ],
        "errors": errors,
        "hung": hung,
        "lost_output": lost,
        "anomalies": anomalies,
        "fault_checks": record.fault_checks,
        "gateway_exits_unexpected": unexpected_exits,
        "leaks": leaks.to_json(),
    }


def text(summary: dict[str, Any]) -> str:
    out = [f"soak: {summary['settings']}"]
    out.append(f"requests: {summary['requests']}  by status: {summary['requests_by_status']}")
    out.append(f"counts: {summary['counts']}")
    if summary["settings"]["vm_runs"]:
        counts = summary["counts"]
        out.append(
            f"vm runs: {counts.get('vm_runs', 0)} in a row, {counts.get('vm_runs_ok', 0)} succeeded"
        )
    out.append("faults: " + ", ".join(f"{f['kind']}@{f['at_s']}s" for f in summary["faults"]))
    # Explained failures by kind (each is in the JSON); unexplained ones one by one.
    explained = Counter(
        (row["status"] or "no answer", row["code"], row["message"][:80], row["explained_by"])
        for row in summary["errors"]
        if row["explained_by"]
    )
    for (status, code, message, cause), count in sorted(explained.items(), key=str):
        out.append(f"  {count:5d} x {status} {code}: {message} -> {cause}")
    for row in summary["errors"]:
        if not row["explained_by"]:
            out.append(
                f"  {row['status'] or 'no answer'} {row['method']} {row['path']} "
                f"[{row['kind']}] {row['code']}: {row['message'][:200]} -> UNEXPLAINED"
            )
    for row in summary["hung"]:
        out.append(
            f"  HUNG {row['method']} {row['path']} [{row['kind']}] "
            f"after {row['took_s']} s (budget {row['budget_s']} s)"
        )
    explained_anomalies = Counter(
        (row["what"][:100], row["explained_by"])
        for row in summary["anomalies"]
        if row["explained_by"] and row not in summary["lost_output"]
    )
    for (what, cause), count in sorted(explained_anomalies.items(), key=str):
        out.append(f"  {count:5d} x {what} -> {cause}")
    for row in summary["anomalies"]:
        if row in summary["lost_output"] or not row["explained_by"]:
            cause = "LOST OUTPUT" if row in summary["lost_output"] else "UNEXPECTED"
            out.append(f"  {row['kind']} at {row['at_s']} s: {row['what'][:300]} -> {cause}")
    out += [f"  FAULT CHECK {c}" for c in summary["fault_checks"]]
    out += [f"  GATEWAY EXIT {e[:500]}" for e in summary["gateway_exits_unexpected"]]
    leaks = summary["leaks"]
    out.append(f"gateway usage: {leaks['gateway']}")
    out += [f"  LEAK {thing[:500]}" for thing in leaks["found"]]
    out += [f"  CLEANUP {thing[:300]}" for thing in leaks["cleanup"]]
    failures = {k: v for k, v in summary["failures"].items() if v}
    out.append("soak: OK" if summary["ok"] else f"soak: FAILED {failures}")
    return "\n".join(out)


def write_json(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
