"""What code inside a sandbox sees of itself and of the host (the basics; tests/security goes
further)."""

from __future__ import annotations

import trio

from sandstorm.agent import AGENT_COMMAND_PREFIX
from tests.harness import RunningGateway

PROBE = r"""
import os, socket
status = open('/proc/self/status').read()
caps = {l.split(':')[0]: l.split()[1] for l in status.splitlines() if l.startswith('Cap')}
print('uid', os.getuid(), os.geteuid(), os.getgid())
print('caps', caps.get('CapEff'), caps.get('CapPrm'), caps.get('CapBnd'))
print('fds', sorted(int(f) for f in os.listdir('/proc/self/fd')))
print('ifaces', sorted(name for _, name in socket.if_nameindex()))
print('env', sorted(os.environ))
print('cwd', os.getcwd())
"""


async def test_code_runs_unprivileged_in_its_own_world(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(code=PROBE, language="python", environment={"MINE": "1"})
    lines = dict(line.split(" ", 1) for line in body["result"]["stdout"].splitlines())
    assert lines["uid"] == "1000 1000 1000"
    assert lines["caps"] == "0000000000000000 0000000000000000 0000000000000000"
    # Only stdin, stdout, stderr (and the fd listdir itself opened) reach the program.
    assert lines["fds"] in ("[0, 1, 2]", "[0, 1, 2, 3]")
    assert lines["ifaces"] == "['lo']"  # no network but loopback
    env = lines["env"]
    assert "'MINE'" in env and "'HOME'" in env
    # Nothing of the gateway's own environment leaks in.
    assert "VIRTUAL_ENV" not in env and "SANDSTORM" not in env and "'PWD'" not in env
    assert lines["cwd"] == "/workspace"


async def test_writes_are_private_to_one_sandbox_and_never_reach_the_image(
    gw: RunningGateway,
) -> None:
    with trio.fail_after(gw.seconds(30)):
        first = await gw.run_ok(command=["sh", "-c", "echo secret > /workspace/s; echo $?"])
        assert first["result"]["stdout"] == "0\n"
        second = await gw.run_ok(command=["sh", "-c", "cat /workspace/s 2>&1; ls /workspace"])
        assert "No such file" in second["result"]["stdout"]
        root = await gw.run_ok(command=["sh", "-c", "echo x > /etc/passwd"])
        assert root["result"]["verdict"] == "error"
    image = gw.data_dir / "images" / "default" / "rootfs"
    assert not (image / "workspace" / "s").exists()


async def test_host_is_not_visible(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(
            command=["sh", "-c", f"ls {gw.data_dir} 2>&1; ls /.sandstorm; cat /proc/1/cmdline"]
        )
    out = body["result"]["stdout"]
    assert "No such file" in out
    assert "zygote.py" in out  # the agent's own read-only mount, and nothing else of the host
    # PID 1 is the agent in gVisor; in a VM it is the guest's init, whose only child is the agent.
    assert (AGENT_COMMAND_PREFIX if gw.runtime == "gvisor" else "/init\x00") in out
