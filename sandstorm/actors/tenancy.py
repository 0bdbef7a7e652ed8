"""Tenants, API keys and quotas (SPEC §5).

A key is ``sst_`` + 43 url-safe characters (256 random bits), shown once when created and stored
only as its sha256. Requests carry it as ``Authorization: Bearer <key>``; WebSocket clients that
cannot set headers (browsers) may offer it as the subprotocol ``bearer.<key>`` instead. Never as
a query parameter: URLs end up in logs.

With no live key the gateway is open, every caller is tenant ``default``, and it may only listen
on loopback (unless started with ``--insecure-no-auth``). A gateway bound elsewhere whose keys
are all revoked refuses every request (401) rather than fall open.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections.abc import Iterable

from sandstorm.errors import QuotaExceeded, Unauthorized
from sandstorm.store import AsyncStore, Quotas, Store, Tenant, key_hash

KEY_PREFIX = "sst_"
DEFAULT_TENANT = "default"
# Owns the warm pool's sandboxes until a request claims one. Not a valid tenant name
# (TENANT_RE), so it can never be a caller's.
POOL_TENANT = "(pool)"
SUBPROTOCOL_PREFIX = "bearer."
TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# A key as issued: the prefix and token_urlsafe(32). Anything else is refused unhashed.
_KEY_RE = re.compile(r"^sst_[A-Za-z0-9_-]{43}$")
# Retry-After bounds (seconds) for quota refusals.
MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 3600


def new_key() -> tuple[str, str]:
    """(key id, secret). The id is public (list, revoke, audit); the secret is shown once."""
    return f"key_{secrets.token_hex(8)}", KEY_PREFIX + secrets.token_urlsafe(32)


def valid_tenant(name: str) -> bool:
    return TENANT_RE.match(name) is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer_from_header(value: str | None) -> str | None:
    """The key of an ``Authorization`` header; Unauthorized when present but not Bearer."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <API key>'")
    return token.strip()


def bearer_from_subprotocols(offered: Iterable[str]) -> str | None:
    for protocol in offered:
        if protocol.startswith(SUBPROTOCOL_PREFIX):
            return protocol.removeprefix(SUBPROTOCOL_PREFIX)
    return None


async def authenticate(store: AsyncStore, key: str | None, *, open_allowed: bool) -> Tenant:
    """The caller's tenant. ``open_allowed``: whether a gateway without keys may serve
    (loopback, or --insecure-no-auth). Raises Unauthorized."""
    digest = key_hash(key) if key is not None and _KEY_RE.match(key) else None
    # The key's tenant, or the default tenant: one trip to the store's thread, unless keys and
    # tenants are unchanged since this key (or no key) was last resolved.
    any_key, tenant, default = await store.cached_credentials(
        digest, _resolve, keep=lambda found: digest is None or found[1] is not None
    )
    if tenant is not None:
        return tenant
    if key is not None:
        # Even on an open gateway: a caller that sends a key means that key, not "default".
        raise Unauthorized("unknown or revoked API key")
    if any_key:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <API key>'")
    if not open_allowed:
        raise Unauthorized(
            "this gateway listens beyond loopback and has no API key: "
            "create one with `sandstorm keys create`"
        )
    return default or Tenant(name=DEFAULT_TENANT, quotas=Quotas())


def _resolve(store: Store, digest: str | None) -> tuple[bool, Tenant | None, Tenant | None]:
    """(any live key, the tenant of the key with this hash, the default tenant's record when
    no live key exists: its quotas apply to an open gateway's callers)."""
    any_key, tenant = store.authenticate(digest)
    default = store.get_tenant(DEFAULT_TENANT) if not any_key else None
    return any_key, tenant, default


# ---------------------------------------------------------------------------- quotas


def retry_after(deadlines: Iterable[float | None], now: float | None = None) -> int:
    """Seconds until the earliest of ``deadlines`` (epoch), clamped to [1, 3600]: when the
    tenant's usage will next drop by itself. Without one, a minute."""
    now = time.time() if now is None else now
    known = [d - now for d in deadlines if d is not None]
    if not known:
        return 60
    return int(max(MIN_RETRY_AFTER, min(MAX_RETRY_AFTER, min(known) + 1)))


def check_sandbox_quota(
    tenant: Tenant, live: int, memory_in_use: int, memory: int, wait_s: int
) -> None:
    """Refuse one more sandbox of ``memory`` bytes for a tenant that already has ``live``
    sandboxes holding ``memory_in_use``."""
    q = tenant.quotas
    if q.max_sandboxes is not None and live + 1 > q.max_sandboxes:
        raise QuotaExceeded(
            f"tenant {tenant.name} already has {live} live sandboxes (max_sandboxes "
            f"{q.max_sandboxes})",
            retry_after=wait_s,
            limit="max_sandboxes",
            value=q.max_sandboxes,
            in_use=live,
        )
    if q.max_memory is not None and memory_in_use + memory > q.max_memory:
        raise QuotaExceeded(
            f"tenant {tenant.name}'s live sandboxes hold {memory_in_use} bytes of memory_limit; "
            f"{memory} more exceeds max_memory {q.max_memory}",
            retry_after=wait_s,
            limit="max_memory",
            value=q.max_memory,
            in_use=memory_in_use,
            requested=memory,
        )


def check_exec_quota(tenant: Tenant, running: int, wait_s: int) -> None:
    q = tenant.quotas
    if q.max_concurrent_execs is not None and running + 1 > q.max_concurrent_execs:
        raise QuotaExceeded(
            f"tenant {tenant.name} already runs {running} execs (max_concurrent_execs "
            f"{q.max_concurrent_execs})",
            retry_after=wait_s,
            limit="max_concurrent_execs",
            value=q.max_concurrent_execs,
            in_use=running,
        )
