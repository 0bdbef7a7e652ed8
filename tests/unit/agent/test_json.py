"""The agent's JSON parser (``sandstorm/agent/src/json.c``), through a harness built from it
and ``util.c`` (``json_harness.c``, with the address and undefined-behaviour sanitizers
where gcc has them): it accepts exactly what Python's json module accepts (NaN and Infinity
aside, and nesting past ``MAX_JSON_DEPTH``), decodes it to the same values, and refuses the rest
with Python's messages. Random and mutated payloads never crash or hang it; the real agent
answers every mutated payload and keeps serving.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from sandstorm.agent import FrameKind, decode_error
from sandstorm.agent.build import AGENT_SOURCE_DIR
from tests.harness import c_number_defines
from tests.unit.agent.running import TIMEOUT, running_agent

HARNESS_SOURCE = Path(__file__).with_name("json_harness.c")
_DEFINES = c_number_defines((AGENT_SOURCE_DIR / "agent.h").read_text())
MAX_JSON_DEPTH = int(_DEFINES["MAX_JSON_DEPTH"])
LLONG_MAX = 2**63 - 1

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")


def _compile(target: Path, *flags: str) -> bool:
    sources = [HARNESS_SOURCE, AGENT_SOURCE_DIR / "json.c", AGENT_SOURCE_DIR / "util.c"]
    argv = ["gcc", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *flags, f"-I{AGENT_SOURCE_DIR}"]
    done = subprocess.run(
        [*argv, "-o", str(target), *map(str, sources)], capture_output=True, timeout=120
    )
    if done.returncode != 0:
        return False
    # A sanitizer that cannot set itself up here fails on the empty input too.
    probe = subprocess.run([str(target)], input=b"", capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("json") / "harness"
    sanitizers = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all")
    if not _compile(target, *sanitizers):
        assert _compile(target), "the JSON harness does not build"
    return target


async def parse_all(harness: Path, payloads: list[bytes]) -> list[str]:
    """The harness's line for each payload, all in one run."""
    records = b"".join(struct.pack("!I", len(p)) + p for p in payloads)
    with trio.fail_after(TIMEOUT * 6):  # a bound on a hang; a sanitized run is slower
        done = await trio.run_process(
            [str(harness)], stdin=records, capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    lines = done.stdout.decode().split("\n")
    assert lines[-1] == "" and len(lines) == len(payloads) + 1
    return lines[:-1]


# -- Python's json, as the agent's bounds apply it ---------------------------------------------


class _Object(list[tuple[str, Any]]):
    """An object's members in order, repeated names included."""


class _Int(str):
    """An integer's text."""


class _Float:
    pass


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _string(text: str) -> str:
    """A string as the agent decodes it: lone surrogates U+DC80..U+DCFF become the byte they
    escape (as os.fsencode does); any other lone one, U+FFFD and the string unencodable."""
    data = bytearray()
    unencodable = False
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            data.append(code - 0xDC00)
        elif 0xD800 <= code <= 0xDFFF:
            data += "\ufffd".encode()
            unencodable = True
        else:
            data += char.encode()
    return "s" + data.hex() + ("!" if unencodable else "")


def _tree(value: Any) -> str:
    if value is None:
        return "n"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, _Int):
        digits = value.lstrip("-")
        if len(digits) > 19 or int(digits) > LLONG_MAX:
            return "I"
        return f"i{int(value)}"
    if isinstance(value, _Float):
        return "d"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, _Object):
        return "{" + ",".join(f"{_string(k)}:{_tree(v)}" for k, v in value) + "}"
    assert isinstance(value, list)
    return "[" + ",".join(_tree(item) for item in value) + "]"


def _depth(value: Any) -> int:
    if isinstance(value, _Object):
        return 1 + max((_depth(v) for _, v in value), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def python_verdict(payload: bytes) -> str:
    """What the harness must say: "ok <tree>" from Python's json, or "error"."""
    try:
        value = json.loads(
            payload.decode("utf-8"),
            object_pairs_hook=_Object,
            parse_int=_Int,
            parse_float=lambda _: _Float(),
            parse_constant=_refuse,
        )
    except (ValueError, RecursionError):
        return "error"
    if _depth(value) > MAX_JSON_DEPTH:
        return "error"
    return "ok " + _tree(value)


def python_error(payload: bytes) -> str:
    """Python's json message for a payload it refuses, in the agent's words."""
    with pytest.raises(json.JSONDecodeError) as refused:
        json.loads(payload.decode("utf-8"))
    return f"{refused.value.msg} at char {refused.value.pos}"


# -- what it accepts and how it decodes it -----------------------------------------------------


async def test_values_decode_as_python_json_decodes_them(harness: Path) -> None:
    cases = {
        b'["\\udc80", "\\ud800", "\\ud83d\\ude00", "\\ud83d\\u0041"]': (
            "ok [s80,sefbfbd!,sf09f9880,sefbfbd41!]"
        ),
        b'{"a": 1, "b": [], "a": 2}': "ok {s61:i1,s62:[],s61:i2}",
        b'"\\u0000\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9"': "ok s00225c2f080c0a0d09c3a9",
        b' \t\r\n{"\\udcff": null} ': "ok {sff:n}",
        b"[true, false, null, -0, 1.5, 1E400, 2e-3]": "ok [t,f,n,i0,d,d,d]",
        b"[9223372036854775807, -9223372036854775807]": (
            "ok [i9223372036854775807,i-9223372036854775807]"
        ),
        b"[9223372036854775808, -9223372036854775808, 1" + b"0" * 400 + b"]": "ok [I,I,I]",
        '"é😀\x7f"'.encode(): "ok sc3a9f09f98807f",
        b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH: (
            "ok " + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
        ),
    }
    payloads = list(cases)
    with trio.fail_after(TIMEOUT * 6):
        lines = await parse_all(harness, payloads)
    for payload, line in zip(payloads, lines, strict=True):
        assert line == cases[payload] == python_verdict(payload), payload


async def test_what_python_json_refuses_is_refused_with_its_message(harness: Path) -> None:
    python_words = [
        b"",
        b"nul",
        b"-",
        b"[",
        b"[1,]",
        b"[1 2]",
        b"[01]",
        b"[1e5, 1.]",
        b"01",
        b"1 2",
        b"{",
        b"{1: 2}",
        b'{"a": 1,}',
        b'{"a" 1}',
    ]
    agent_words = {
        b'"abc': "Unterminated string at char 4",
        b'["\x01"]': "Invalid control character at char 2",
        b'"\\x"': "Invalid \\escape at char 2",
        b'"\\u12"': "Invalid \\uXXXX escape at char 3",
        b'"\\u12G4"': "Invalid \\uXXXX escape at char 3",
        b"NaN": "Expecting value at char 0",
        b"[-Infinity]": "Expecting value at char 1",
        b"\xef\xbb\xbf1": "Expecting value at char 0",  # a byte order mark
        b'["\xff"]': "payload is not UTF-8 (byte 2)",
        b'"\xed\xa0\x80"': "payload is not UTF-8 (byte 1)",  # a surrogate's own bytes
        b'"\xc0\xaf"': "payload is not UTF-8 (byte 1)",  # overlong
        b"[" * (MAX_JSON_DEPTH + 1): f"Too deeply nested at char {MAX_JSON_DEPTH}",
        b"[" * 1_000_000: f"Too deeply nested at char {MAX_JSON_DEPTH}",
    }
    payloads = python_words + list(agent_words)
    with trio.fail_after(TIMEOUT * 6):
        lines = await parse_all(harness, payloads)
    for payload, line in zip(payloads, lines, strict=True):
        expected = agent_words.get(payload) or python_error(payload)
        assert line == f"error {expected}", payload
        assert python_verdict(payload) == "error", payload


# -- fuzz --------------------------------------------------------------------------------------

_TOKENS = [
    b'"', b"\\", b"\\u", b"\\ud800", b"\\udc80", b"\\udfff", b"\\u0000", b"[", b"]", b"{", b"}",
    b",", b":", b"-", b"0", b"9", b".", b"e", b"E+", b"true", b"fals", b"null", b"NaN", b" ",
    b"\n", b"\x00", b"\x01", b"\x7f", b"\xc3", b"\xa9", b"\xed\xa0\x80", b"\xf0\x9f\x98\x80",
    b"\xff", b"[" * 70, b"]" * 70, b"9" * 25,
]  # fmt: skip


def _random_string(rng: random.Random) -> str:
    pools = [
        "abcxyz =/\"\\'",
        "".join(map(chr, range(0x20))),
        "é€\x7f\u2028\ufffd",
        "😀\U0010ffff",
        "\ud800\udbff\udc00\udc80\udcff\udfff",
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randrange(8)))


def _write_string(text: str, rng: random.Random) -> str:
    out = ['"']
    short = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b"}
    for char in text:
        code = ord(char)
        if char in short and rng.random() < 0.5:
            out.append(short[char])
        elif char == "/" and rng.random() < 0.5:
            out.append("\\/")
        elif code > 0xFFFF:
            v = code - 0x10000
            out.append(f"\\u{0xD800 + (v >> 10):04x}\\u{0xDC00 + (v & 0x3FF):04X}")
        elif code < 0x20 or char in '"\\' or 0xD800 <= code <= 0xDFFF or rng.random() < 0.2:
            out.append(f"\\u{code:04x}" if rng.random() < 0.5 else f"\\u{code:04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _space(rng: random.Random) -> str:
    return "".join(rng.choice(" \t\r\n") for _ in range(rng.choice((0, 0, 0, 1, 3))))


def _random_document(rng: random.Random, depth: int = 0) -> str:
    """Valid JSON of every kind, repeated names, escapes and number forms included."""
    kind = rng.randrange(10 if depth < 6 else 6)
    if kind == 0:
        return rng.choice(["null", "true", "false"])
    if kind == 1:
        sign = rng.choice(["", "-"])
        return sign + rng.choice(["0", str(rng.randrange(10 ** rng.randrange(1, 22)) + 1)])
    if kind == 2:
        number = rng.choice(["0", "7", "123"]) + rng.choice(["", ".5", ".000"])
        return rng.choice(["", "-"]) + number + rng.choice(["", "e5", "E-3", "e+400"])
    if kind == 3:
        return str(rng.choice([LLONG_MAX, -LLONG_MAX, LLONG_MAX + 1, -LLONG_MAX - 1]))
    if kind in (4, 5):
        return _write_string(_random_string(rng), rng)
    if kind == 9 and depth < 3:
        deep = rng.randrange(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 3)
        return "[" * deep + "]" * deep
    items = [_random_document(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind in (6, 7):
        keys = [_write_string(_random_string(rng), rng) for _ in items]
        if keys and rng.random() < 0.3:
            keys[-1] = keys[0]  # a repeated name
        members = [f"{_space(rng)}{k}{_space(rng)}:{v}" for k, v in zip(keys, items, strict=True)]
        return "{" + ",".join(members) + _space(rng) + "}"
    return "[" + ",".join(_space(rng) + item + _space(rng) for item in items) + "]"


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        at = rng.randrange(len(buffer) + 1)
        action = rng.randrange(5)
        if action == 0 and buffer:
            buffer[min(at, len(buffer) - 1)] = rng.randrange(256)
        elif action == 1:
            buffer[at:at] = rng.choice(_TOKENS)
        elif action == 2:
            del buffer[at : at + rng.randrange(1, 8)]
        elif action == 3:
            del buffer[at:]
        else:
            buffer[at:at] = buffer[rng.randrange(len(buffer) + 1) :][: rng.randrange(16)]
    return bytes(buffer)


def fuzz_payloads(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    valid = [_random_document(rng).encode() for _ in range(count // 4)]  # surrogates escaped
    mutated = [_mutate(rng.choice(valid), rng) for _ in range(count // 2)]
    noise = [os.urandom(rng.randrange(64)) for _ in range(count // 8)]
    tokens = [b"".join(rng.choices(_TOKENS, k=rng.randrange(12))) for _ in range(count // 8)]
    return valid + mutated + noise + tokens


async def test_fuzz_agrees_with_python_json_and_never_crashes(harness: Path) -> None:
    payloads = fuzz_payloads(seed=1, count=40_000)
    with trio.fail_after(TIMEOUT * 6):
        lines = await parse_all(harness, payloads)
    accepted = 0
    for payload, line in zip(payloads, lines, strict=True):
        verdict = python_verdict(payload)
        if verdict == "error":
            assert line.startswith("error "), (payload, line)
        else:
            accepted += 1
            assert line == verdict, payload
    assert 0.2 < accepted / len(payloads) < 0.8  # both verdicts well exercised


async def test_the_agent_answers_every_mutated_payload_and_keeps_serving(tmp_path: Path) -> None:
    rng = random.Random(2)
    exec_seed = b'{"argv": ["/nonexistent-sandstorm/x"], "env": {"A": "\\u00e9"}, "cwd": "/"}'
    signal_seed = b'{"signal": 15}'
    with trio.fail_after(TIMEOUT * 3):
        async with running_agent(tmp_path) as agent:
            for _ in range(400):
                # Every EXEC on a fresh channel ends with exactly one EXIT (checked on exit).
                number = agent.new_channel()
                await agent.channel.send_frame(FrameKind.EXEC, number, _mutate(exec_seed, rng))
                await agent.channel.send_stdin_close(number)
                result = await agent.finish(number)
                assert result.exit is not None
                # A SIGNAL for no exec: an ERROR on channel 0 when malformed, else nothing.
                await agent.channel.send_frame(FrameKind.SIGNAL, 99_999, _mutate(signal_seed, rng))
                await agent.channel.send_ping(b"sync")
                while (frame := await agent.next(0)).kind is not FrameKind.PONG:
                    assert frame.kind is FrameKind.ERROR, frame
                    assert decode_error(frame.payload).message
            done = await agent.run(["echo", "still serving"])
            assert done.stdout == b"still serving\n"
            assert done.exit is not None and done.exit.exit_code == 0
