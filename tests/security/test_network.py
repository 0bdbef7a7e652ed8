"""SPEC §5: network is off (loopback only). The sandbox's loopback is its own: the gateway
listening on the host's 127.0.0.1 is out of reach, and what listens inside is out of the host's
reach. Only reserved addresses are ever targeted (192.0.2.0/24 is TEST-NET-1, never routed;
169.254.169.254 is the link-local metadata address); names are resolved, never contacted."""

from __future__ import annotations

import json
import secrets
import socket
from urllib.parse import urlsplit

import trio

from tests.harness import RunningGateway, never_500

PROBE = r"""
import json, os, socket, sys
port = int(sys.argv[1])
abstract = sys.argv[2]
out = {}
def attempt(name, family, kind, addr):
    s = socket.socket(family, kind)
    s.settimeout(1.0)
    try:
        s.connect(addr)
        if kind == socket.SOCK_DGRAM:
            s.send(b'x')
        out[name] = 'connected'
    except OSError as exc:
        out[name] = 'refused %s' % (exc.errno,)
    finally:
        s.close()
attempt('gateway-v4', socket.AF_INET, socket.SOCK_STREAM, ('127.0.0.1', port))
attempt('gateway-v6', socket.AF_INET6, socket.SOCK_STREAM, ('::1', port))
attempt('metadata', socket.AF_INET, socket.SOCK_STREAM, ('169.254.169.254', 80))
attempt('test-net', socket.AF_INET, socket.SOCK_STREAM, ('192.0.2.1', 80))
attempt('test-net-udp', socket.AF_INET, socket.SOCK_DGRAM, ('192.0.2.1', 53))
attempt('host-abstract', socket.AF_UNIX, socket.SOCK_STREAM, '\0' + abstract)
for name in ('example.com', 'metadata.google.internal', 'sandstorm-gateway'):
    try:
        out['dns ' + name] = 'resolved %s' % (socket.getaddrinfo(name, 80)[0][4],)
    except OSError as exc:
        out['dns ' + name] = 'failed'
out['ifaces'] = sorted(n for _, n in socket.if_nameindex())
out['net-dev'] = sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:])
routes = [l.split() for l in open('/proc/net/route').readlines()[1:]]
out['routes'] = [r[0] for r in routes]
print(json.dumps(out))
"""


async def test_nothing_outside_the_sandbox_is_reachable(gw: RunningGateway) -> None:
    never_500(gw)
    port = urlsplit(gw.url).port
    assert port
    # A host abstract-namespace socket: shared by every process on the host's network
    # namespace, never by a sandbox.
    abstract = f"sandstorm-test-{secrets.token_hex(4)}"
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.bind("\0" + abstract)
    host.listen()
    try:
        with trio.fail_after(gw.seconds(30)):
            body = await gw.run_ok(
                command=["python3", "-c", PROBE, str(port), abstract], timeout=20_000
            )
    finally:
        host.close()
    result = body["result"]
    assert result["verdict"] == "ok", result
    out = json.loads(result["stdout"])
    for name in ("gateway-v4", "gateway-v6", "metadata", "test-net", "test-net-udp",
                 "host-abstract"):  # fmt: skip
        assert out[name].startswith("refused"), (name, out[name])
    for key, value in out.items():
        if key.startswith("dns "):
            assert value == "failed", (key, value)
    assert out["ifaces"] == ["lo"], out
    assert out["net-dev"] == ["lo"], out
    assert out["routes"] in ([], ["lo"]), out


LISTEN = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen()
print('listening', flush=True)
time.sleep(60)
"""


async def test_what_listens_inside_is_out_of_the_hosts_reach(gw: RunningGateway) -> None:
    never_500(gw)
    # A port free on the host right now; inside, the sandbox binds the same number.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(command=["python3", "-c", LISTEN, str(port)], wait=False)
        sid, eid = body["id"], body["exec_id"]
        # Inside, loopback works (the listener is reachable from the sandbox itself).
        while True:
            inner = await gw.client.post(
                f"/v1/sandboxes/{sid}/exec",
                json={"code": f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
                      "; print('inner ok')", "language": "python"},
            )  # fmt: skip
            if inner.json()["result"]["stdout"] == "inner ok\n":
                break
            await trio.sleep(0.1)
        # From the host, the same port on loopback has nobody behind it.
        host = socket.socket()
        host.settimeout(1.0)
        try:
            refused = host.connect_ex(("127.0.0.1", port))
        finally:
            host.close()
        assert refused != 0, "the host reached a listener inside the sandbox"
        polled = (await gw.client.get(f"/v1/sandboxes/{sid}/execs/{eid}")).json()
        assert polled["state"] == "running", polled
        await gw.client.delete(f"/v1/sandboxes/{sid}")
