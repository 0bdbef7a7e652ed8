"""Helpers for the tenancy tests: keys made straight in the gateway's database (as the
``sandstorm keys`` command does), and HTTP clients that carry them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from sandstorm.actors.tenancy import new_key
from sandstorm.store import Quotas, Store, key_hash
from tests.harness import RunningGateway

# Headers that differ between any two responses, whatever they answer.
VARYING_HEADERS = {"date", "x-request-id"}


def _make_key(data_dir: Path, tenant: str, quotas: Quotas) -> tuple[str, str]:
    store = Store(data_dir).open()
    try:
        store.set_tenant(tenant, quotas)
        key_id, secret = new_key()
        store.add_key(key_id, tenant, key_hash(secret))
        return key_id, secret
    finally:
        store.close()


async def make_key(
    data_dir: Path,
    tenant: str,
    *,
    max_sandboxes: int | None = None,
    max_memory: int | None = None,
    max_concurrent_execs: int | None = None,
) -> tuple[str, str]:
    """(key id, secret) of a new key for ``tenant`` (created with these limits)."""
    quotas = Quotas(
        max_sandboxes=max_sandboxes,
        max_memory=max_memory,
        max_concurrent_execs=max_concurrent_execs,
    )
    return await trio.to_thread.run_sync(_make_key, data_dir, tenant, quotas)


def _revoke(data_dir: Path, key_id: str) -> None:
    store = Store(data_dir).open()
    try:
        store.revoke_key(key_id)
    finally:
        store.close()


async def revoke(data_dir: Path, key_id: str) -> None:
    await trio.to_thread.run_sync(_revoke, data_dir, key_id)


@asynccontextmanager
async def client_for(gw: RunningGateway, key: str | None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=gw.url, timeout=60, headers=headers) as client:
        yield client


def comparable(response: httpx.Response, the_id: str) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers with the requested id masked (an unknown id of the same
    length stands in for it), and the headers that vary per response left out."""
    headers = {k: v for k, v in response.headers.items() if k not in VARYING_HEADERS}
    return response.status_code, response.content.replace(the_id.encode(), b"<id>"), headers


async def ws_upgrade(
    gw: RunningGateway, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """A WebSocket upgrade request, for the answers given instead of upgrading."""
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        **(headers or {}),
    }
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        return await client.get(path, headers=upgrade)
