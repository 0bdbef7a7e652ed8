"""POST /v1/sandboxes/run and exec on real sandboxes (gVisor and QEMU): results, verdicts,
languages."""

from __future__ import annotations

import trio

from tests.harness import RunningGateway


async def test_python_hello_world(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        response = await gw.run(code="print('Hello, World!')", language="python")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("sbx_") and len(body["id"]) == 30
    assert body["runtime"] == gw.runtime
    assert body["selection"] == gw.selection
    assert body["isolation_level"] == gw.isolation_level
    assert body["state"] in ("idle", "running")
    assert body["created_at"].endswith("Z") and body["expires_at"].endswith("Z")
    result = body["result"]
    assert result["exec_id"] == body["exec_id"]
    assert result["stdout"] == "Hello, World!\n"
    assert result["stderr"] == ""
    assert result["exit_code"] == 0 and result["signal"] is None
    assert result["verdict"] == "ok"
    assert result["stdout_truncated"] is False and result["stderr_truncated"] is False
    assert result["duration_ms"] > 0
    assert result["max_rss_bytes"] > 1_000_000


async def test_every_language_runs_with_its_version(gw: RunningGateway) -> None:
    programs = {
        "python": "import sys; print(sys.version.split()[0])",
        "javascript": "console.log(process.version.slice(1))",
        "bash": "echo ${BASH_VERSION%%(*}",
        "sh": "echo sh-ok",
    }
    with trio.fail_after(gw.seconds(60)):
        languages = (await gw.client.get("/v1/languages")).json()
        versions = {lang["name"]: lang["version"] for lang in languages}
        assert set(versions) == set(programs)
        for name, code in programs.items():
            body = await gw.run_ok(language=name, code=code, keep_alive=0)
            out = body["result"]["stdout"].strip()
            assert body["result"]["verdict"] == "ok", body
            if name != "sh":
                assert out == versions[name]
            else:
                assert out == "sh-ok" and versions["sh"]


async def test_command_env_cwd_stdin_and_files(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(
            command=["sh", "-c", 'cat input.txt; echo "$GREETING $HOME $(id -u)"; pwd; cat'],
            environment={"GREETING": "hi there"},
            files={"/workspace/input.txt": "from a file\n"},
            stdin="from stdin\n",
        )
    result = body["result"]
    assert result["stdout"] == "from a file\nhi there /workspace 1000\n/workspace\nfrom stdin\n"
    assert result["verdict"] == "ok"


async def test_exec_keeps_state_between_calls(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(command=["sh", "-c", "echo 42 > /workspace/answer"])
        sid = body["id"]
        response = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"code": "print(open('answer').read().strip())", "language": "python"},
        )
        assert response.status_code == 201, response.text
        exec_body = response.json()
        assert exec_body["id"] == sid
        assert exec_body["result"]["stdout"] == "42\n"
        response = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec", json={"command": ["pwd"], "cwd": "/tmp"}
        )
        assert response.json()["result"]["stdout"] == "/tmp\n"


async def test_wait_false_returns_202_and_the_result_is_polled(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        response = await gw.run(command=["sh", "-c", "sleep 0.5; echo done"], wait=False)
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["result"] is None
        sid, eid = body["id"], body["exec_id"]
        first = (await gw.client.get(f"/v1/sandboxes/{sid}/execs/{eid}")).json()
        assert first["state"] == "running" and first["result"] is None
        while True:
            polled = (await gw.client.get(f"/v1/sandboxes/{sid}/execs/{eid}")).json()
            if polled["state"] == "finished":
                break
            await trio.sleep(0.05)
        assert polled["result"]["stdout"] == "done\n"
        response = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec", json={"command": ["true"], "wait": False}
        )
        assert response.status_code == 202
        assert response.json()["exec_id"].startswith("exe_")


async def test_concurrent_execs_in_one_sandbox(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        results: dict[int, str] = {}

        async def one(i: int) -> None:
            r = await gw.client.post(
                f"/v1/sandboxes/{sid}/exec",
                json={"command": ["sh", "-c", f"sleep {nap}; echo {i}"]},
            )
            results[i] = r.json()["result"]["stdout"]

        # One after another, the four execs take at least four naps whatever each start-up
        # costs; side by side, one nap plus the start-ups (seconds under TCG).
        nap = gw.seconds(0.5)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
        assert trio.current_time() - start < 3 * nap
        assert results == {i: f"{i}\n" for i in range(4)}


async def test_large_code_is_passed_through_a_file(gw: RunningGateway) -> None:
    code = "x = 1\n" * 30_000 + "print('big', x)\n"  # 180 KB: above one argv string's limit
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(code=code, language="python")
    assert body["result"]["stdout"] == "big 1\n"


async def test_invalid_utf8_output_is_replaced(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(command=["sh", "-c", "printf 'a\\377b'"])
    assert body["result"]["stdout"] == "a\ufffdb"


async def test_large_files_and_stdin_arrive_whole(gw: RunningGateway) -> None:
    blob = "0123456789abcdef" * (3 * 1024 * 1024 // 16)  # 3 MiB: several WRITE_FILE chunks
    with trio.fail_after(gw.seconds(60)):
        body = await gw.run_ok(
            command=["sh", "-c", "wc -c < /workspace/blob; md5sum < /workspace/blob; wc -c"],
            files={"/workspace/blob": blob},
            stdin=blob + "tail",
        )
    import hashlib

    lines = body["result"]["stdout"].split("\n")
    assert lines[0] == str(len(blob))
    assert lines[1].split()[0] == hashlib.md5(blob.encode()).hexdigest()
    assert lines[2] == str(len(blob) + 4)
