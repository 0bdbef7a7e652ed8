"""An EXEC's request (``request.c``, over ``json.c``): payloads parsed as strictly as Python's
json, and every malformed one finishes its channel with a reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from sandstorm.agent import (
    FrameKind,
)
from tests.unit.agent.running import (
    PATH,
    TIMEOUT,
    Result,
    running_agent,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")


async def test_exec_payloads_are_parsed_as_strictly_as_python_json(tmp_path: Path) -> None:
    """The agent's own JSON parser: escapes, surrogate pairs, repeated names (the last wins, as
    in a Python dict), and every malformed payload finishes its channel with a reason."""
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:

            async def exec_raw(payload: bytes) -> Result:
                number = agent.new_channel()
                await agent.channel.send_frame(FrameKind.EXEC, number, payload)
                await agent.channel.send_stdin_close(number)
                return await agent.finish(number)

            argv = '["printf", "%s|%s", "\\u00fc\\ud83d\\ude00\\/\\t", "\\udc80"]'
            result = await exec_raw(
                b'{"argv": %s, "env": {"PATH": "%s", "A": "1", "A": "2"}, "cwd": "/"}'
                % (argv.encode(), PATH.encode())
            )
            assert result.errors == []
            assert result.stdout == "ü😀/\t|".encode() + b"\x80"

            result = await exec_raw(
                b'{"argv": ["env"], "env": {"PATH": "%s", "A": "1", "A": "2"}, "cwd": "/"}'
                % PATH.encode()
            )
            assert sorted(result.stdout.split()) == [b"A=2", b"PATH=" + PATH.encode()]

            nested = b"[" * 100 + b"]" * 100
            cases = {
                b'{"argv": ["a\\u0000b"], "env": {}, "cwd": "/"}': "NUL character",
                b'{"argv": ["\\ud800"], "env": {}, "cwd": "/"}': "must be encodable",
                b'{"argv": ["\xff"], "env": {}, "cwd": "/"}': "not UTF-8",
                b'{"argv": ["true"], "env": {}, "cwd": "/"} x': "Extra data",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "x": %s}' % nested: "nested",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "last": 1}': "last must be",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "background": "y"}': "background must",
                b'{"argv": ["true"], "env": [], "cwd": "/"}': "env must be an object",
                b'{"argv": ["true"], "env": {"A=B": "1"}, "cwd": "/"}': "variable name",
                b'{"argv": ["true"], "env": {"A": 1}, "cwd": "/"}': "env values",
                b'{"argv": ["true"], "env": {}, "cwd": ""}': "cwd must be",
                b'{"argv": [1], "env": {}, "cwd": "/"}': "argv must be a list",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "x": "\x01"}': "control character",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "x": 01}': "delimiter",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "x": NaN}': "Expecting value",
                b"[]": "must be a JSON object",
                b"": "Expecting value",
            }
            for payload, reason in cases.items():
                result = await exec_raw(payload)
                assert FrameKind.STARTED not in result.kinds, payload
                assert len(result.errors) == 1 and reason in result.errors[0], (payload, result)
                assert result.exit is not None and result.exit.exit_code == 126
            assert (await agent.run(["echo", "fine"])).stdout == b"fine\n"
