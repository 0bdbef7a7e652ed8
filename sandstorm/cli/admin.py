"""Administration commands that open the gateway's database directly (WAL lets them run while
the gateway serves; a new or revoked key counts from the gateway's next request):

    sandstorm keys create --tenant T [--max-sandboxes N] [--max-memory BYTES]
                                     [--max-concurrent-execs N]
    sandstorm keys list
    sandstorm keys revoke KEY_ID
    sandstorm audit [--tenant T] [--since 2026-01-01T00:00:00Z | 10m | 2h | 1d] [--json]

``keys create`` prints the key alone on stdout, once (``KEY=$(sandstorm keys create …)``); only
its sha256 is stored.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sandstorm.actors import tenancy
from sandstorm.api.timestamps import rfc3339_from_epoch
from sandstorm.config import ConfigError, load_config
from sandstorm.store import AuditRecord, Quotas, Store, StoreError, key_hash

COMMANDS = ("keys", "audit")
EXIT_USAGE = 2
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", default=None, help="state directory of the gateway")
    where.add_argument("--config", default=None, help="TOML configuration file")

    keys = sub.add_parser("keys", help="manage API keys and tenants")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", parents=[where], help="create a key (shown once)")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--max-sandboxes", type=_count, default=None)
    create.add_argument("--max-memory", type=_count, default=None, help="bytes (sum of limits)")
    create.add_argument("--max-concurrent-execs", type=_count, default=None)
    keys_sub.add_parser("list", parents=[where], help="list keys (never the secrets)")
    revoke = keys_sub.add_parser("revoke", parents=[where], help="revoke a key at once")
    revoke.add_argument("key_id")

    audit = sub.add_parser("audit", parents=[where], help="print the audit log")
    audit.add_argument("--tenant", default=None)
    audit.add_argument("--since", default=None, help="ISO-8601 time, or an age: 10m, 2h, 1d")
    audit.add_argument("--json", action="store_true", help="one JSON array")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def parse_since(text: str, now: float | None = None) -> float:
    """An ISO-8601 moment (naive = UTC) or an age like 10m / 2h / 1d → epoch seconds."""
    now = time.time() if now is None else now
    match = _DURATION.match(text.strip())
    if match is not None:
        return now - int(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r} is neither ISO-8601 nor an age like 10m") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, data_dir=args.data_dir)
        store = Store(Path(config.data_dir)).open()
    except (ConfigError, StoreError, OSError) as exc:
        return _fail(str(exc))
    try:
        if args.command == "keys":
            return _keys(store, args)
        return _audit(store, args)
    except ValueError as exc:
        return _fail(str(exc))
    finally:
        store.close()


def _keys(store: Store, args: argparse.Namespace) -> int:
    if args.keys_command == "create":
        if not tenancy.valid_tenant(args.tenant):
            return _fail(f"tenant {args.tenant!r}: use 1 to 64 of A-Z a-z 0-9 _ . -")
        quotas = Quotas(
            max_sandboxes=args.max_sandboxes,
            max_memory=args.max_memory,
            max_concurrent_execs=args.max_concurrent_execs,
        )
        tenant = store.set_tenant(args.tenant, quotas)
        key_id, secret = tenancy.new_key()
        store.add_key(key_id, tenant.name, key_hash(secret))
        _audit_admin(store, tenant.name, "keys_create", "ok")
        print(secret)
        q = tenant.quotas
        print(
            f"sandstorm: created {key_id} for tenant {tenant.name} (max_sandboxes "
            f"{_limit(q.max_sandboxes)}, max_memory {_limit(q.max_memory)}, "
            f"max_concurrent_execs {_limit(q.max_concurrent_execs)}); the key above is shown "
            "only now",
            file=sys.stderr,
        )
        return 0
    if args.keys_command == "list":
        print(f"{'ID':<22} {'TENANT':<20} {'CREATED':<25} {'REVOKED':<25} QUOTAS")
        for key in store.list_keys():
            owner = store.get_tenant(key.tenant)
            q = owner.quotas if owner is not None else Quotas()
            revoked = rfc3339_from_epoch(key.revoked_at) if key.revoked_at else "-"
            print(
                f"{key.id:<22} {key.tenant:<20} {rfc3339_from_epoch(key.created_at):<25} "
                f"{revoked:<25} sandboxes={_limit(q.max_sandboxes)} "
                f"memory={_limit(q.max_memory)} execs={_limit(q.max_concurrent_execs)}"
            )
        return 0
    revoked_key = store.revoke_key(args.key_id)
    if revoked_key is None:
        _audit_admin(store, None, "keys_revoke", "404 not_found")
        return _fail(f"no key {args.key_id!r}")
    _audit_admin(store, revoked_key.tenant, "keys_revoke", "ok")
    print(f"revoked {revoked_key.id} (tenant {revoked_key.tenant})")
    return 0


def _audit(store: Store, args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since is not None else None
    records = store.audit(args.tenant, since)
    if args.json:
        rows = [
            {
                "time": rfc3339_from_epoch(r.time),
                "tenant": r.tenant,
                "action": r.action,
                "sandbox_id": r.sandbox_id,
                "exec_id": r.exec_id,
                "snapshot_id": r.snapshot_id,
                "outcome": r.outcome,
                "request_id": r.request_id,
                "target": r.target,
            }
            for r in records
        ]
        print(json.dumps(rows, indent=1))
        return 0
    for r in records:
        ids = " ".join(x for x in (r.sandbox_id, r.exec_id, r.snapshot_id, r.target) if x)
        print(
            f"{rfc3339_from_epoch(r.time)} {r.tenant or '-':<16} {r.action:<16} "
            f"{r.outcome:<24} {ids}"
        )
    return 0


def _audit_admin(store: Store, tenant: str | None, action: str, outcome: str) -> None:
    store.record_audit(AuditRecord(time=time.time(), tenant=tenant, action=action, outcome=outcome))


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _fail(message: str) -> int:
    print(f"sandstorm: {message}", file=sys.stderr)
    return EXIT_USAGE


def check_bind(host: str, data_dir: str, insecure_no_auth: bool) -> str | None:
    """Why ``serve`` must not start (an open API beyond loopback), or None."""
    if insecure_no_auth or tenancy.is_loopback(host):
        return None
    store = Store(Path(data_dir)).open()
    try:
        if store.has_live_keys():
            return None
    finally:
        store.close()
    return (
        f"refusing to serve on {host} without API keys: anyone who can reach it could run "
        "code. Create a key (`sandstorm keys create --tenant NAME`), bind to 127.0.0.1, or "
        "pass --insecure-no-auth"
    )
