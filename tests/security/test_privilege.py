"""SPEC §2/§5 privilege promises, checked from inside real sandboxes the way an escape would
probe them: identity, no_new_privs (by prctl, not /proc text), capabilities, setuid files, leaked
file descriptors (runc CVE-2024-21626), the gateway's environment, and request environment that
targets the loader or the shell (LD_PRELOAD, BASH_ENV, PATH)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import pytest
import trio

from tests.harness import AGENT_PID_SH, RunningGateway, never_500
from tests.hoststate import runsc_processes

PROBE = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
PR_GET_NO_NEW_PRIVS, PR_CAPBSET_READ, PR_GET_DUMPABLE = 39, 23, 3
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
# listdir's own descriptor is closed again by the time is_open looks at it.
fds = sorted(fd for fd in map(int, os.listdir('/proc/self/fd')) if is_open(fd))
targets = {f: os.readlink('/proc/self/fd/%d' % f) for f in fds}
print(json.dumps({
    'ids': [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), *os.getresuid(),
            *os.getresgid()],
    'groups': os.getgroups(),
    'nnp': libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
    'bset': [c for c in range(64) if libc.prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1],
    'caps': {k: status[k].strip() for k in ('CapInh', 'CapEff', 'CapPrm', 'CapBnd', 'CapAmb')
             if k in status},
    'fds': fds,
    'targets': targets,
    'setuid0': libc.setuid(0),
    'home': os.environ.get('HOME'),
    'cwd': os.getcwd(),
}))
"""


async def test_identity_no_new_privs_and_no_capabilities(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(code=PROBE, language="python")
        assert body["result"]["verdict"] == "ok", body["result"]
        got = json.loads(body["result"]["stdout"])
        # Also in a process that is not a direct child of the agent (a grandchild via sh).
        nested = await gw.client.post(
            f"/v1/sandboxes/{body['id']}/exec",
            json={"command": ["sh", "-c", 'python3 -c "$P"'], "environment": {"P": PROBE}},
        )
        nested_got = json.loads(nested.json()["result"]["stdout"])
    for probe in (got, nested_got):
        assert probe["ids"] == [1000] * 10, probe
        assert probe["groups"] in ([], [1000]), probe
        assert probe["nnp"] == 1, probe
        assert probe["bset"] == [], probe
        for key, value in probe["caps"].items():
            assert int(value, 16) == 0, (key, value)
        assert {"CapEff", "CapPrm", "CapBnd"} <= set(probe["caps"]), probe
        assert probe["setuid0"] == -1  # EPERM
        assert probe["home"] == "/workspace" and probe["cwd"] == "/workspace"


async def test_no_setuid_or_setgid_file_anywhere(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        body = await gw.run_ok(
            command=["sh", "-c", "find / -xdev -type f -perm /6000 2>/dev/null; "
                     "find /.sandstorm -perm /6000 2>/dev/null; echo end"],
        )  # fmt: skip
    assert body["result"]["stdout"] == "end\n", body["result"]


FD_LIST = {
    # listdir's own descriptor is closed again when fstat looks: only inherited ones remain.
    "python": "import os\ndef ok(fd):\n    try:\n        return bool(os.fstat(fd))\n"
    "    except OSError:\n        return False\n"
    "print(sorted(f for f in map(int, os.listdir('/proc/self/fd')) if ok(f)))",
    "javascript": "const fs = require('fs'); for (const f of fs.readdirSync('/proc/self/fd')) {"
    " try { console.log(f, fs.readlinkSync('/proc/self/fd/' + f)); } catch (e) {} }",
}


async def test_a_new_process_holds_only_fds_0_to_2(gw: RunningGateway) -> None:
    """No descriptor of the agent, runsc or the host leaks into the code (CVE-2024-21626 was a
    leaked host directory fd)."""
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(code=FD_LIST["python"], language="python")
        assert body["result"]["stdout"] == "[0, 1, 2]\n", body["result"]
        sid = body["id"]
        # `ls` opens the directory itself as fd 3; every entry past 2 must be that directory.
        ls = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"command": ["sh", "-c", "ls -l /proc/self/fd/ | tail -n +2"]},
        )
        entries = ls.json()["result"]["stdout"].splitlines()
        extra = {}
        for line in entries:
            name, _, target = line.split()[-3:]
            if int(name) > 2:
                extra[int(name)] = target
        assert len(entries) - len(extra) == 3, entries
        assert all("/proc/" in t and t.endswith("/fd") for t in extra.values()), entries
        # With stdin given: still 0-2 only (the stdin pipe is fd 0, nothing more).
        given = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"code": FD_LIST["python"], "language": "python", "stdin": "x\n"},
        )
        assert given.json()["result"]["stdout"] == "[0, 1, 2]\n", given.text
        js = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"code": FD_LIST["javascript"], "language": "javascript"},
        )
        # node opens its own epoll/eventfd descriptors; nothing else may be there.
        js_fds = dict(line.split(" ", 1) for line in js.json()["result"]["stdout"].splitlines())
        assert {"0", "1", "2"} <= set(js_fds), js.text
        for fd, target in js_fds.items():
            assert target.startswith(("pipe:", "anon_inode:", "/proc/", "socket:", "/dev/null")), (
                fd,
                target,
            )
        agent = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"command": ["sh", "-c", f"ls -l /proc/{AGENT_PID_SH}/fd/ 2>&1 | tail -n +2"]},
        )
    # Even the agent holds nothing of the host but its channel on fds 0-2 (runsc's donated
    # stdio, shown as host:[n]; in a VM the virtio-serial port, and the guest's kernel log for
    # stderr): pipes, /dev/null, its own files.
    lines = agent.json()["result"]["stdout"].splitlines()
    assert lines, agent.text
    for line in lines:
        fd, target = int(line.split()[-3]), line.split()[-1]
        if fd <= 2 and target.startswith(("host:[", "/dev/vport", "/dev/kmsg")):
            continue
        assert target.startswith(("pipe:", "socket:", "anon_inode:", "/dev/null", "/proc/",
                                  "/.sandstorm/")), line  # fmt: skip


ENVIRON_SCAN = r"""
import os, json
found = {}
for p in os.listdir('/proc'):
    if not p.isdigit():
        continue
    try:
        with open('/proc/%s/environ' % p, 'rb') as f:
            found[p] = f.read().decode('utf-8', 'replace')
    except OSError as exc:
        found[p] = 'ERR %s' % exc.errno
print(json.dumps(found))
"""


def _proc_file(pid: str, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


async def test_the_gateway_environment_never_reaches_a_sandbox_and_the_request_environment_never_reaches_runsc(  # noqa: E501
    start_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"SANDSTORM_GW_SECRET_{secrets.token_hex(4).upper()}"
    value = f"gw-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv(name, value)
    request_value = f"req-secret-{secrets.token_hex(8)}"
    with trio.fail_after(60):
        async with start_gateway() as gw:
            never_500(gw)
            body = await gw.run_ok(
                command=["sh", "-c", 'sleep 30 & python3 -c "$SCAN"'],
                environment={"SCAN": ENVIRON_SCAN, "REQ_SECRET": request_value},
                wait=False,
            )
            sid, eid = body["id"], body["exec_id"]
            while True:
                polled = (await gw.client.get(f"/v1/sandboxes/{sid}/execs/{eid}")).json()
                if polled["state"] == "finished":
                    break
                await trio.sleep(0.05)
            environs = json.loads(polled["result"]["stdout"])
            # Every process inside, PID 1 (the agent) included, was readable and is clean.
            assert "1" in environs and len(environs) >= 3, environs
            for pid, env in environs.items():
                assert not env.startswith("ERR"), (pid, env)
                assert name not in env and value not in env, (pid, env)
                assert "VIRTUAL_ENV" not in env, (pid, env)
            assert request_value not in environs["1"]  # the request's env is not the agent's
            # On the host: runsc (sandbox, gofer, the foreground `runsc run`) sees neither.
            procs = runsc_processes(gw.data_dir)
            assert procs, "no runsc process found for the live sandbox"
            for entry in procs:
                pid = entry.split(":", 1)[0]
                host_env, cmdline = _proc_file(pid, "environ"), _proc_file(pid, "cmdline")
                for secret in (name, value, request_value):
                    assert secret.encode() not in host_env, (entry, secret)
                    assert secret.encode() not in cmdline, (entry, secret)
            await gw.client.delete(f"/v1/sandboxes/{sid}")


async def _exec(gw: RunningGateway, sid: str, **body: Any) -> dict[str, Any]:
    response = await gw.client.post(f"/v1/sandboxes/{sid}/exec", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()["result"]
    return result


async def test_loader_and_shell_variables_affect_only_their_own_exec(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        body = await gw.run_ok(
            command=["true"],
            files={"/workspace/env.sh": "echo BASH_ENV_RAN\n"},
        )
        sid = body["id"]

        preload = await _exec(gw, sid, command=["echo", "hi"],
                              environment={"LD_PRELOAD": "/nonexistent.so"})  # fmt: skip
        assert preload["verdict"] == "ok" and preload["stdout"] == "hi\n", preload
        assert "/nonexistent.so" in preload["stderr"], preload  # the ld.so warning
        clean = await _exec(gw, sid, command=["echo", "hi"])
        assert clean == {**clean, "verdict": "ok", "stdout": "hi\n", "stderr": ""}, clean

        bash_env = await _exec(gw, sid, command=["bash", "-c", "echo body"],
                               environment={"BASH_ENV": "/workspace/env.sh"})  # fmt: skip
        assert bash_env["stdout"] == "BASH_ENV_RAN\nbody\n", bash_env
        clean = await _exec(gw, sid, command=["bash", "-c", "echo body"])
        assert clean["stdout"] == "body\n", clean

        no_path = await _exec(gw, sid, command=["ls", "/"], environment={"PATH": "/nowhere"})
        assert no_path["verdict"] == "error" and no_path["exit_code"] == 127, no_path
        in_shell = await _exec(gw, sid, command=["/bin/sh", "-c", "ls /"],
                               environment={"PATH": "/nowhere"})  # fmt: skip
        assert in_shell["exit_code"] == 127, in_shell
        listed = await _exec(gw, sid, command=["ls", "/"])
        assert listed["verdict"] == "ok" and "workspace" in listed["stdout"].split(), listed

        # Variables that would steer the agent itself (a Python program) change nothing for it.
        hostile = {"PYTHONSTARTUP": "/workspace/env.sh", "PYTHONPATH": "/nowhere",
                   "PYTHONHOME": "/nowhere", "LD_LIBRARY_PATH": "/nowhere", "IFS": "x"}  # fmt: skip
        steered = await _exec(gw, sid, command=["true"], environment=hostile)
        assert steered["verdict"] == "ok", steered
        after = await _exec(gw, sid, code="import os; print(os.environ.get('PYTHONHOME'))",
                            language="python")  # fmt: skip
        assert after["stdout"] == "None\n", after
        # PID 1 never took any of it in.
        env1 = await _exec(
            gw, sid, command=["sh", "-c", f"tr '\\0' '\\n' < /proc/{AGENT_PID_SH}/environ"]
        )
    assert env1["stdout"].strip(), env1
    for var in ("LD_PRELOAD", "BASH_ENV", "PYTHONSTARTUP", "PYTHONHOME"):
        assert var not in env1["stdout"], env1
