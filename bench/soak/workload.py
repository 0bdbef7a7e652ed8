"""The mixed workload: each scenario is one user's short story against the gateway (a run; a
kept sandbox with execs back to back and with pauses; a stream read fast, slowly, or abandoned;
a snapshot and its resume; a timeout; an OOM; a fork bomb; a delete while busy), every answer
checked against what the program wrote.

A scenario records what it saw through its ``Client`` and calls ``Soak.anomaly`` for an answer
that is not the one expected; it never decides whether a fault explains it (the report does)."""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

from bench.soak import programs
from bench.soak.gateway import Gateway
from bench.soak.record import Client, Record
from bench.soak.requests import bad_request

#: The gateway's boot deadline (``boot_timeout_s`` in the soak's config): part of every
#: creating request's own budget.
BOOT_S = 90.0
EXEC_TIMEOUT_MS = 20_000
#: A VM under TCG on a loaded host runs the same program many times slower.
VM_EXEC_TIMEOUT_MS = 80_000
GVISOR_MEMORY = 128 << 20
VM_MEMORY = 256 << 20


@dataclass
class Soak:
    record: Record
    gateway: Gateway
    stop_at: float  # monotonic time at which workers start no new scenario
    rng: random.Random
    up: bool = True  # False while the soak holds the gateway down
    sandboxes: set[str] = field(default_factory=set)  # every sandbox id ever created
    snapshots: set[str] = field(default_factory=set)

    def url(self) -> str:
        return self.gateway.url

    def client(self) -> Client:
        return Client(self.record, self.url)

    async def wait_up(self, limit: float = 120.0) -> None:
        """Until the gateway serves again (a fault holds it down for a few seconds)."""
        with trio.move_on_after(limit):
            while not self.up:
                await trio.sleep(0.1)


Scenario = Callable[[Soak, Client, str], Awaitable[None]]


def level(runtime: str) -> dict[str, Any]:
    if runtime == "qemu":
        return {"isolation_level": "maximum", "memory_limit": VM_MEMORY}
    return {"isolation_level": "standard", "memory_limit": GVISOR_MEMORY}


def exec_timeout_ms(runtime: str) -> int:
    return VM_EXEC_TIMEOUT_MS if runtime == "qemu" else EXEC_TIMEOUT_MS


def run_budget(timeout_ms: int = EXEC_TIMEOUT_MS) -> float:
    return BOOT_S + timeout_ms / 1000 + 1


async def create(
    soak: Soak, client: Client, runtime: str, kind: str, program: programs.Program, **extra: Any
) -> dict[str, Any] | None:
    """A run (``wait`` true unless ``extra`` says otherwise); its body when it was answered
    with 201/202, after checking its result against ``program``."""
    body = {
        **level(runtime),
        "timeout": exec_timeout_ms(runtime),
        "keep_alive": 0,
        **program.body,
        **extra,
    }
    start = time.monotonic()
    response = await client.request(
        kind, "POST", "/v1/sandboxes/run", json_body=body, budget=run_budget(body["timeout"])
    )
    if response is None:
        await soak.wait_up()
        return None
    if response.status_code not in (201, 202):
        soak.record.anomaly(
            kind, f"run answered {response.status_code}: {response.text[:300]}", start
        )
        return None
    answer: dict[str, Any] = response.json()
    soak.sandboxes.add(answer["id"])
    if response.status_code == 201:
        check_result(soak, kind, answer["result"], program, start)
    return answer


def check_result(
    soak: Soak, kind: str, result: dict[str, Any], program: programs.Program, start: float
) -> None:
    soak.record.count(f"verdict.{result['verdict']}")
    if result["verdict"] != program.verdict:
        what = (
            f"verdict {result['verdict']} (expected {program.verdict}): "
            + json.dumps({k: result.get(k) for k in ("exit_code", "signal", "stderr")})[:400]
        )
        soak.record.anomaly(kind, what, start)
        return
    if program.verdict == "ok" and not result["stdout_truncated"]:
        soak.record.count("output_bytes_checked", len(program.stdout))
        if result["stdout"] != program.stdout:
            got = result["stdout"]
            soak.record.anomaly(
                kind,
                f"stdout differs: {len(got)} bytes, expected "
                f"{len(program.stdout)}; ends {got[-80:]!r}",
                start,
                lost=True,
            )


async def exec_in(
    soak: Soak,
    client: Client,
    sid: str,
    kind: str,
    program: programs.Program,
    timeout_ms: int = EXEC_TIMEOUT_MS,
) -> bool:
    """One exec with wait; False when the sandbox can no longer be used."""
    body = {"timeout": timeout_ms, **program.body}
    start = time.monotonic()
    response = await client.request(
        kind, "POST", f"/v1/sandboxes/{sid}/exec", json_body=body, budget=timeout_ms / 1000 + 1
    )
    if response is None:
        await soak.wait_up()
        return True
    if response.status_code != 201:
        soak.record.anomaly(
            kind, f"exec answered {response.status_code}: {response.text[:300]}", start
        )
        return response.status_code < 400 or response.status_code == 429
    check_result(soak, kind, response.json()["result"], program, start)
    return True


async def destroy(soak: Soak, client: Client, sid: str, kind: str = "delete") -> None:
    start = time.monotonic()
    for _ in range(3):  # again after a gateway restart: DELETE is idempotent
        response = await client.request(kind, "DELETE", f"/v1/sandboxes/{sid}", budget=30)
        if response is None:
            await soak.wait_up()
            continue
        if response.status_code != 200:
            soak.record.anomaly(
                kind, f"delete answered {response.status_code}: {response.text[:300]}", start
            )
        return


async def one_run(soak: Soak, client: Client, runtime: str) -> None:
    program = soak.rng.choice([programs.python_sequence(200), programs.bash_sequence(100)])
    await create(soak, client, runtime, f"run.{runtime}", program)


async def session(soak: Soak, client: Client, runtime: str) -> None:
    """A kept sandbox: execs back to back and with pauses, stdin, then DELETE."""
    answer = await create(
        soak, client, runtime, f"session.{runtime}", programs.echo("ready"), keep_alive=120
    )
    if answer is None:
        return
    sid = answer["id"]
    for _ in range(soak.rng.randint(2, 6)):
        program = soak.rng.choice(
            [
                programs.python_sequence(soak.rng.randint(1, 3000)),
                programs.bash_sequence(soak.rng.randint(1, 300)),
                programs.stdin_echo(soak.rng.randint(0, 200_000)),
                programs.echo("x" * soak.rng.randint(0, 5000)),
            ]
        )
        timeout = exec_timeout_ms(runtime)
        if not await exec_in(soak, client, sid, f"exec.{runtime}", program, timeout):
            break
        if soak.rng.random() < 0.4:
            await trio.sleep(soak.rng.uniform(0.1, 3.0))
    await destroy(soak, client, sid)


async def stream(soak: Soak, client: Client, runtime: str) -> None:
    """An exec read on the WebSocket by a fast, a slow or a vanishing reader; its output is
    then also read back from the exec's record."""
    program = programs.python_sequence(soak.rng.randint(500, 20_000), pause_every=500)
    answer = await create(
        soak, client, runtime, f"stream.{runtime}", program, wait=False, keep_alive=60
    )
    if answer is None:
        return
    sid, exec_id = answer["id"], answer["exec_id"]
    reader = soak.rng.choice(["fast", "slow", "vanishing"])
    soak.record.count(f"stream.{reader}")
    start = time.monotonic()
    got = None
    if reader == "vanishing":
        await vanish(client.url(f"/v1/sandboxes/{sid}/stream?since=0"))
    else:
        got = await read_stream(
            client.url(f"/v1/sandboxes/{sid}/stream?since=0"),
            exec_id,
            0.02 if reader == "slow" else 0.0,
            run_budget(VM_EXEC_TIMEOUT_MS),
        )
    result = await await_exec(soak, client, sid, exec_id, program, f"stream.result.{runtime}")
    # The stream must carry what the program wrote when it ran to its end (an exec that
    # failed is already reported, with the output it did write).
    if got is not None and result is not None and result["verdict"] == program.verdict:
        if got != program.stdout:
            soak.record.anomaly(
                f"stream.{reader}",
                f"stream of {sid} carried {len(got)} bytes, expected {len(program.stdout)}",
                start,
                lost=True,
            )
        else:
            soak.record.count("output_bytes_checked", len(got))
    await destroy(soak, client, sid)


async def await_exec(
    soak: Soak, client: Client, sid: str, exec_id: str, program: programs.Program, kind: str
) -> dict[str, Any] | None:
    """Polls the exec's record until it is finished, checks its result and returns it (None
    when there was none to check)."""
    start = time.monotonic()
    path = f"/v1/sandboxes/{sid}/execs/{exec_id}"
    while time.monotonic() - start < run_budget(VM_EXEC_TIMEOUT_MS):
        response = await client.request(kind, "GET", path, budget=10)
        if response is None:
            await soak.wait_up()
            continue
        if response.status_code != 200:
            soak.record.anomaly(
                kind, f"exec record answered {response.status_code}: {response.text[:300]}", start
            )
            return None
        body = response.json()
        if body["state"] == "finished":
            result: dict[str, Any] = body["result"]
            check_result(soak, kind, result, program, start)
            return result
        await trio.sleep(0.2)
    soak.record.anomaly(kind, f"exec not finished after {run_budget(VM_EXEC_TIMEOUT_MS)} s", start)
    return None


async def read_stream(url: str, exec_id: str, pause: float, limit: float) -> str | None:
    """The stdout an exec's stream carried up to its exit event; None when the stream ended
    early (a slow reader may be lagged and closed with 1013, which is the contract)."""
    parts: list[str] = []
    with trio.move_on_after(limit):
        try:
            async with trio_websocket.open_websocket_url(url.replace("http", "ws", 1)) as ws:
                while True:
                    event = json.loads(await ws.get_message())
                    if event["type"] == "lagged":
                        return None
                    if event.get("exec_id") != exec_id:
                        continue
                    if event["type"] == "stdout":
                        parts.append(event.get("data", ""))
                    elif event["type"] == "exit":
                        return "".join(parts)
                    if pause:
                        await trio.sleep(pause)
        except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, OSError):
            return None
    return None


async def vanish(url: str) -> None:
    """A stream reader that upgrades, takes a few bytes and drops its TCP connection without
    a close frame."""
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.partition(":")
    with trio.move_on_after(10):
        try:
            stream = await trio.open_tcp_stream(name, int(port))
            async with stream:
                await stream.send_all(
                    f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: c29hay1zb2FrLXNvYWsxMg==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n".encode()
                )
                await stream.receive_some(4096)
        except OSError:
            pass


async def snapshot(soak: Soak, client: Client, runtime: str) -> None:
    """Write a file, snapshot, resume, read the file in the resumed sandbox, clean up."""
    token = secrets.token_hex(8)
    answer = await create(
        soak,
        client,
        runtime,
        f"snapshot.{runtime}",
        programs.Program(programs.state_file(token), ""),
        keep_alive=120,
    )
    if answer is None:
        return
    sid = answer["id"]
    start = time.monotonic()
    response = await client.request(
        "snapshot",
        "POST",
        f"/v1/sandboxes/{sid}/snapshot",
        json_body={"leave_running": True},
        budget=60,
    )
    if response is not None and response.status_code == 201:
        snap = response.json()["snapshot_id"]
        soak.snapshots.add(snap)
        resumed = await client.request(
            "resume",
            "POST",
            "/v1/sandboxes/resume",
            budget=BOOT_S,
            json_body={"snapshot_id": snap, "keep_alive": 60},
        )
        if resumed is not None and resumed.status_code == 201:
            rid = resumed.json()["id"]
            soak.sandboxes.add(rid)
            read = programs.Program(programs.CAT_STATE, token + "\n")
            await exec_in(soak, client, rid, "exec.resumed", read)
            await destroy(soak, client, rid)
        elif resumed is not None:
            soak.record.anomaly(
                "resume", f"resume answered {resumed.status_code}: {resumed.text[:300]}", start
            )
        await client.request("snapshot.delete", "DELETE", f"/v1/snapshots/{snap}", budget=30)
    elif response is not None:
        soak.record.anomaly(
            "snapshot", f"snapshot answered {response.status_code}: {response.text[:300]}", start
        )
    await destroy(soak, client, sid)


async def timeout(soak: Soak, client: Client, runtime: str) -> None:
    await create(soak, client, runtime, f"timeout.{runtime}", programs.sleeper(30), timeout=1500)


async def oom(soak: Soak, client: Client, runtime: str) -> None:
    await create(
        soak, client, runtime, f"oom.{runtime}", programs.memory_hog(300), memory_limit=64 << 20
    )


async def fork_bomb(soak: Soak, client: Client, runtime: str) -> None:
    """A fork bomb in a kept sandbox, and the sandbox must serve the next exec."""
    answer = await create(
        soak, client, runtime, f"forkbomb.{runtime}", programs.echo("ready"), keep_alive=60
    )
    if answer is None:
        return
    sid = answer["id"]
    start = time.monotonic()
    body = {"timeout": 3000, **programs.FORK_BOMB}
    response = await client.request(
        "forkbomb.exec", "POST", f"/v1/sandboxes/{sid}/exec", json_body=body, budget=4
    )
    if response is not None and response.status_code != 201:
        soak.record.anomaly(
            "forkbomb.exec",
            f"fork bomb exec answered {response.status_code}: {response.text[:300]}",
            start,
        )
    await exec_in(soak, client, sid, "forkbomb.after", programs.echo("alive"))
    await destroy(soak, client, sid)


async def delete_busy(soak: Soak, client: Client, runtime: str) -> None:
    """DELETE while an exec runs: the exec ends ``killed`` and the sandbox is freed."""
    answer = await create(
        soak,
        client,
        runtime,
        f"deletebusy.{runtime}",
        programs.sleeper(30),
        wait=False,
        keep_alive=60,
    )
    if answer is None:
        return
    await trio.sleep(soak.rng.uniform(0.0, 1.0))
    await destroy(soak, client, answer["id"], "delete.busy")


async def bad(soak: Soak, client: Client, runtime: str) -> None:
    await bad_request(soak.record, client, soak.rng)


GVISOR_MIX: list[tuple[Scenario, int]] = [
    (one_run, 3),
    (session, 3),
    (stream, 2),
    (snapshot, 1),
    (timeout, 1),
    (oom, 1),
    (fork_bomb, 1),
    (delete_busy, 1),
    (bad, 4),
]
VM_MIX: list[tuple[Scenario, int]] = [(one_run, 3), (session, 2), (stream, 1)]


async def worker(soak: Soak, runtime: str) -> None:
    """Scenarios one after another until ``stop_at``."""
    mix = VM_MIX if runtime == "qemu" else GVISOR_MIX
    scenarios, weights = zip(*mix, strict=True)
    client = soak.client()
    try:
        while time.monotonic() < soak.stop_at:
            scenario = soak.rng.choices(scenarios, weights)[0]
            soak.record.count(f"scenario.{scenario.__name__}.{runtime}")
            await scenario(soak, client, runtime)
    finally:
        await client.aclose()
