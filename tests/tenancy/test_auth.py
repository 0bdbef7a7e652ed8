"""API keys on a real gateway: every route but the probes needs one once any exists, REST and
the WebSocket upgrade alike; revocation counts on the next request, without a restart."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from sandstorm.sdk import AsyncClient, SandstormError
from tests.harness import RunningGateway
from tests.tenancy.helpers import client_for, make_key, revoke, ws_upgrade

HELLO: dict[str, Any] = {"command": ["echo", "hi"], "keep_alive": 60}


def _assert_401(response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"


async def test_no_keys_means_tenant_default_and_open(gw: RunningGateway) -> None:
    with trio.fail_after(60):
        body = await gw.run_ok(**HELLO)
        assert body["result"]["stdout"] == "hi\n", body
        listed = (await gw.client.get("/v1/sandboxes")).json()["sandboxes"]
        assert [s["id"] for s in listed] == [body["id"]]


async def test_refusals_and_revocation_without_restart(gw: RunningGateway) -> None:
    with trio.fail_after(90):
        # An open gateway: keys appear while it runs, and count from the next request.
        assert (await gw.client.get("/v1/sandboxes")).status_code == 200
        key_id, key = await make_key(gw.data_dir, "acme")
        for headers in (
            {},
            {"Authorization": f"Basic {key}"},  # wrong scheme
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer sst_" + "A" * 43},  # well formed, unknown
            {"Authorization": f"Bearer {key}x"},
        ):
            _assert_401(await gw.client.get("/v1/sandboxes", headers=headers))
            _assert_401(await gw.client.post("/v1/sandboxes/run", json=HELLO, headers=headers))
            _assert_401(await gw.client.get("/metrics", headers=headers))
        # The probes stay open (and so does the console page, which holds no data).
        assert (await gw.client.get("/health")).status_code == 200
        assert (await gw.client.get("/ready")).status_code == 200
        assert (await gw.client.get("/")).status_code == 200
        second_id, second = await make_key(gw.data_dir, "acme")
        async with client_for(gw, key) as acme, client_for(gw, second) as acme2:
            created = await acme.post("/v1/sandboxes/run", json=HELLO)
            assert created.status_code == 201, created.text
            assert (await acme.get("/metrics")).status_code == 200
            status = f"/v1/sandboxes/{created.json()['id']}/status"
            await revoke(gw.data_dir, key_id)
            _assert_401(await acme.get(status))
            assert (await acme2.get(status)).status_code == 200  # same tenant, live key
            await revoke(gw.data_dir, second_id)
            # No live key left: the gateway is open again, but a revoked key is still refused.
            _assert_401(await acme2.get(status))
        # All keys revoked: a loopback gateway is open again (tenant default) and the acme
        # sandbox is not the default tenant's.
        listed = (await gw.client.get("/v1/sandboxes")).json()["sandboxes"]
        assert listed == []


async def test_websocket_upgrade_needs_the_key(gw: RunningGateway) -> None:
    with trio.fail_after(60):
        _, key = await make_key(gw.data_dir, "acme")
        async with client_for(gw, key) as acme:
            created = await acme.post("/v1/sandboxes/run", json=HELLO)
            sid = created.json()["id"]
        path = f"/v1/sandboxes/{sid}/stream"
        # Refused before the upgrade, with the same 401 JSON as REST.
        _assert_401(await ws_upgrade(gw, path))
        _assert_401(await ws_upgrade(gw, path, {"Authorization": "Bearer nope"}))
        _assert_401(await ws_upgrade(gw, path, {"Sec-WebSocket-Protocol": "bearer.nope"}))
        with pytest.raises(SandstormError) as refused:
            async with AsyncClient(gw.url, api_key="sst_" + "B" * 43) as c, c.stream(sid):
                pass
        assert refused.value.status == 401
        # The header (the client library) and the subprotocol (browsers) both work.
        async with AsyncClient(gw.url, api_key=key) as client, client.stream(sid) as stream:
            first = await stream.ws.get_message()
            assert '"type":"status"' in first
        ws_url = f"ws://{gw.url.removeprefix('http://')}{path}"
        async with open_websocket_url(ws_url, subprotocols=[f"bearer.{key}"]) as ws:
            assert ws.subprotocol == f"bearer.{key}"
            assert '"type":"status"' in await ws.get_message()


async def test_client_library_and_cli_take_the_key(gw: RunningGateway) -> None:
    from sandstorm.sdk import Client
    from tests.integration.test_cli import _env, cli

    with trio.fail_after(60):
        _, key = await make_key(gw.data_dir, "cli")
        async with AsyncClient(gw.url, api_key=key) as client:
            created = await client.run(command=["echo", "lib"], keep_alive=60)
            assert created.result is not None and created.result.stdout == "lib\n"

        def sync_list() -> list[str]:
            with Client(gw.url, api_key=key) as c:
                return [s.id for s in c.sandboxes()]

        assert await trio.to_thread.run_sync(sync_list) == [created.id]
        listed = await cli(gw, "ls", env=_env(SANDSTORM_API_KEY=key))
        assert listed.returncode == 0, listed.stderr
        assert created.id.encode() in listed.stdout
        refused = await cli(gw, "ls", env=_env())
        assert refused.returncode == 2 and b"SANDSTORM_API_KEY" in refused.stderr
