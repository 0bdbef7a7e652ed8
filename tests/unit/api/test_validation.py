"""api/validation.py and msgspec decoding of request bodies, without a server (the checks
that resolve host paths, mounts and whole run requests, are in tests/unit/actors/test_planning.py).

Every refusal must be an ``InvalidRequest`` (400) or ``MountNotAllowed`` (403) naming the field;
anything else (a bare ``UnicodeDecodeError``, a ``ValueError``) would become a 500 on the wire.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from sandstorm.api.decoding import decode_json
from sandstorm.api.types import MIB, ExecRequest, RunRequest
from sandstorm.api.validation import (
    INLINE_CODE_LIMIT,
    check_code_or_command,
    check_environment,
    check_exec,
    check_sandbox_path,
    code_argv,
)
from sandstorm.config import Config
from sandstorm.errors import InvalidRequest

RUN = msgspec.json.Decoder(RunRequest)
EXEC = msgspec.json.Decoder(ExecRequest)


def decode_error(decoder: msgspec.json.Decoder[Any], raw: bytes) -> InvalidRequest:
    """Decode as the web layer does; every failure must be a 400 naming a field."""
    try:
        decode_json(decoder, raw)
    except InvalidRequest as exc:
        assert exc.field, f"no field for {raw!r}: {exc}"
        return exc
    raise AssertionError(f"{raw!r} decoded without error")


def run(**fields: Any) -> RunRequest:
    fields.setdefault("command", ["true"])
    return RunRequest(**fields)


# ------------------------------------------------------------------ msgspec decoding


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(b'{"timeout": "5"}', "timeout", id="timeout-string"),
        pytest.param(b'{"timeout": 5.0}', "timeout", id="timeout-float"),
        pytest.param(b'{"timeout": 1e308}', "timeout", id="timeout-1e308"),
        pytest.param(b'{"timeout": 0}', "timeout", id="timeout-zero"),
        pytest.param(b'{"timeout": -1}', "timeout", id="timeout-negative"),
        pytest.param(b'{"memory_limit": true}', "memory_limit", id="memory-bool"),
        pytest.param(b'{"memory_limit": 1}', "memory_limit", id="memory-tiny"),
        pytest.param(b'{"memory_limit": 33554431}', "memory_limit", id="memory-32MiB-minus-1"),
        pytest.param(b'{"memory_limit": 17592186044417}', "memory_limit", id="memory-huge"),
        pytest.param(b'{"cpu_limit": 0}', "cpu_limit", id="cpu-zero"),
        pytest.param(b'{"cpu_limit": 0.01}', "cpu_limit", id="cpu-tiny"),
        pytest.param(b'{"cpu_limit": "1"}', "cpu_limit", id="cpu-string"),
        pytest.param(b'{"keep_alive": -1}', "keep_alive", id="keep-alive-negative"),
        pytest.param(b'{"environment": []}', "environment", id="environment-list"),
        pytest.param(b'{"environment": "A=1"}', "environment", id="environment-string"),
        pytest.param(b'{"language": "cobol"}', "language", id="unknown-language"),
        pytest.param(b'{"runtime_preference": "docker"}', "runtime_preference", id="unknown-rt"),
        pytest.param(b'{"isolation_level": "max"}', "isolation_level", id="unknown-level"),
        pytest.param(b'{"wait": "yes"}', "wait", id="wait-string"),
        pytest.param(b'{"command": []}', "command", id="command-empty"),
        pytest.param(b'{"command": "ls"}', "command", id="command-string"),
        pytest.param(b'{"command": ["ls", 1]}', "command[1]", id="command-int-arg"),
        pytest.param(b'{"timout": 5}', "timout", id="typo-timout"),
        pytest.param(b'{"mounts": {}}', "mounts", id="mounts-object"),
        pytest.param(
            b'{"mounts": [{"source": 1, "destination": "/a"}]}', "mounts[0].source", id="src-int"
        ),
        pytest.param(
            b'{"mounts": [{"source": "", "destination": "/a"}]}', "mounts[0].source", id="src-empty"
        ),
        pytest.param(
            b'{"mounts": [{"source": "/a"}]}', "mounts[0].destination", id="destination-missing"
        ),
        pytest.param(
            b'{"mounts": [{"source": "/a", "destination": "/b", "read_only": "no"}]}',
            "mounts[0].read_only",
            id="read-only-string",
        ),
        pytest.param(
            b'{"mounts": [{"source": "/a", "destination": "/b", "sourc": "/c"}]}',
            "mounts[0].sourc",
            id="mount-typo",
        ),
        pytest.param(b"", "body", id="empty-body"),
        pytest.param(b"{", "body", id="truncated"),
        pytest.param(b'{"code": "x",}', "body", id="trailing-comma"),
        pytest.param(b'{"cpu_limit": NaN}', "body", id="nan-literal"),
        pytest.param(b'{"code": "x"} x', "body", id="trailing-garbage"),
    ],
)
def test_run_request_decode_errors_name_the_field(raw: bytes, field: str) -> None:
    err = decode_error(RUN, raw)
    assert err.status == 400 and err.code == "invalid_request"
    assert err.field == field, str(err)
    assert err.details["field"] == field
    assert err.message


@pytest.mark.parametrize(
    ("raw", "prefix"),
    [
        pytest.param(b'{"environment": {"A": 1}}', "environment", id="env-value-int"),
        pytest.param(b'{"files": {"/a": 1}}', "files", id="file-content-int"),
        pytest.param(b'{"environment": {"A": null}}', "environment", id="env-value-null"),
    ],
)
def test_errors_inside_a_mapping_name_the_mapping(raw: bytes, prefix: str) -> None:
    err = decode_error(RUN, raw)
    assert err.field is not None and err.field.startswith(prefix), err.field


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[]", id="array"),
        pytest.param(b"null", id="null"),
        pytest.param(b'"run"', id="string"),
        pytest.param(b"42", id="number"),
    ],
)
def test_a_body_that_is_not_an_object_names_a_field(raw: bytes) -> None:
    """SPEC §5: bad input gets 400 "with the field named in details.field" — never null."""
    err = decode_error(RUN, raw)
    assert err.field, f"details.field is {err.field!r} for {raw!r}: {err}"


def test_an_empty_files_path_names_the_files_field() -> None:
    err = decode_error(RUN, b'{"command": ["true"], "files": {"": "x"}}')
    assert err.field is not None and err.field.startswith("files"), (err.field, str(err))


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"code": "\\ud800", "language": "python"}', id="escaped-lone-surrogate"),
        pytest.param(b'{"code": "\\udc00x", "language": "python"}', id="escaped-low-surrogate"),
        pytest.param(b'{"code": "\xff", "language": "python"}', id="raw-invalid-utf8"),
        pytest.param(b'{"code": "\xed\xa0\x80", "language": "python"}', id="raw-utf8-surrogate"),
        pytest.param(b'{"code": "a\xc3", "language": "python"}', id="raw-truncated-utf8"),
    ],
)
def test_text_that_is_not_unicode_is_a_400(raw: bytes) -> None:
    """A bare UnicodeDecodeError out of msgspec would be a 500 on the wire."""
    try:
        decode_json(RUN, raw)
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.field in ("code", "body"), exc.field
    except Exception as exc:
        pytest.fail(f"decoding {raw!r} raised {type(exc).__name__}: {exc} (would be a 500)")
    else:
        pytest.fail(f"{raw!r} decoded")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(b'{"cwd": ""}', "cwd", id="cwd-empty"),
        pytest.param(b'{"timeout": 0}', "timeout", id="timeout-zero"),
        pytest.param(b'{"timeout": "1"}', "timeout", id="timeout-string"),
        pytest.param(b'{"files": {}}', "files", id="files-not-an-exec-field"),
        pytest.param(b'{"keep_alive": 1}', "keep_alive", id="keep-alive-not-an-exec-field"),
        pytest.param(b'{"environment": [["A", "1"]]}', "environment", id="env-list"),
    ],
)
def test_exec_request_decode_errors_name_the_field(raw: bytes, field: str) -> None:
    err = decode_error(EXEC, raw)
    assert err.field == field, str(err)


def test_valid_bodies_decode_with_spec_defaults() -> None:
    req = RUN.decode(b'{"code": "print(1)", "language": "python"}')
    assert req.isolation_level == "standard"
    assert req.runtime_preference is None
    assert req.cpu_limit == 1.0
    assert req.memory_limit == 512 * MIB
    assert req.timeout == 30_000
    assert req.keep_alive == 300
    assert req.wait is True
    assert req.environment == {} and req.mounts == [] and req.files == {}
    mount = RUN.decode(
        b'{"command": ["ls"], "mounts": [{"source": "/a", "destination": "/b"}]}'
    ).mounts[0]
    assert mount.read_only is True
    assert RUN.decode(b'{"command": ["ls"], "memory_limit": 33554432}').memory_limit == 32 * MIB
    assert RUN.decode(b'{"command": ["ls"], "cpu_limit": 1}').cpu_limit == 1.0
    assert RUN.decode(b'{"command": ["ls"], "keep_alive": 0}').keep_alive == 0


def test_nul_escapes_decode_and_are_left_to_validation() -> None:
    req = RUN.decode(b'{"code": "a\\u0000b", "language": "python"}')
    with pytest.raises(InvalidRequest) as info:
        check_code_or_command(req)
    assert info.value.field == "code"


# ------------------------------------------------------------------ code / command


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param({"code": "x", "language": "python", "command": ["ls"]}, "command", id="both"),
        pytest.param({}, "code", id="neither"),
        pytest.param({"code": "print(1)"}, "language", id="code-without-language"),
        pytest.param({"command": ["ls"], "language": "python"}, "language", id="command-language"),
        pytest.param({"code": "a\x00b", "language": "sh"}, "code", id="nul-in-code"),
        pytest.param({"command": ["echo", "a\x00b"]}, "command[1]", id="nul-in-arg-1"),
        pytest.param({"command": ["\x00"]}, "command[0]", id="nul-in-arg-0"),
        pytest.param({"command": [""]}, "command[0]", id="empty-program"),
        pytest.param({"command": ["cat"], "stdin": "x" * (8 * MIB + 1)}, "stdin", id="big-stdin"),
    ],
)
def test_code_or_command(fields: dict[str, Any], field: str) -> None:
    for kind in (RunRequest, ExecRequest):
        with pytest.raises(InvalidRequest) as info:
            check_code_or_command(kind(**fields))
        assert info.value.field == field
        assert info.value.status == 400


def test_code_or_command_accepts_good_requests() -> None:
    check_code_or_command(RunRequest(code="print(1)", language="python"))
    check_code_or_command(RunRequest(command=["sh", "-c", "echo hi"], stdin="a\x00b"))
    check_code_or_command(ExecRequest(command=["ls", ""]))


# ------------------------------------------------------------------ environment


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"1BAD": "x"}, id="leading-digit"),
        pytest.param({"A-B": "x"}, id="dash"),
        pytest.param({"": "x"}, id="empty"),
        pytest.param({"A B": "x"}, id="space"),
        pytest.param({"A=B": "x"}, id="equals"),
        pytest.param({"A\x00": "x"}, id="nul-in-name"),
        pytest.param({"É": "x"}, id="non-ascii"),
        pytest.param({"A\n": "x"}, id="trailing-newline"),
    ],
)
def test_environment_names(env: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_environment(env)
    assert info.value.field is not None and info.value.field.startswith("environment")


def test_environment_value_with_nul() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_environment({"GOOD": "a\x00b"})
    assert info.value.field in ("environment", "environment.GOOD")


def test_environment_entry_count() -> None:
    check_environment({f"V{i}": "x" for i in range(128)})
    with pytest.raises(InvalidRequest) as info:
        check_environment({f"V{i}": "x" for i in range(129)})
    assert info.value.field == "environment"


def test_environment_total_size() -> None:
    check_environment({"A": "x" * (60 * 1024)})
    with pytest.raises(InvalidRequest) as info:
        check_environment({"A": "x" * (64 * 1024)})
    assert info.value.field == "environment"
    with pytest.raises(InvalidRequest):
        check_environment({f"V{i}": "é" * 300 for i in range(120)})  # 72 KB in UTF-8


def test_environment_accepts_identifiers() -> None:
    check_environment({"_": "", "a": "1", "A_1": "=", "PYTHONPATH": "/workspace", "x9": "é"})


# ------------------------------------------------------------------ sandbox paths


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("relative/path", id="relative"),
        pytest.param("", id="empty"),
        pytest.param("/", id="root"),
        pytest.param("/workspace/../etc", id="dotdot"),
        pytest.param("/..", id="slash-dotdot"),
        pytest.param("/workspace/.", id="dot"),
        pytest.param("/workspace/./x", id="inner-dot"),
        pytest.param("/workspace/", id="trailing-slash"),
        pytest.param("//workspace", id="double-leading-slash"),
        pytest.param("/workspace//x", id="double-slash"),
        pytest.param("/proc", id="proc"),
        pytest.param("/proc/x", id="proc-child"),
        pytest.param("/sys/fs", id="sys"),
        pytest.param("/dev/null", id="dev"),
        pytest.param("/.sandstorm", id="agent-dir"),
        pytest.param("/.sandstorm/agent", id="agent-file"),
        pytest.param("/a\x00b", id="nul"),
        pytest.param("/a\nb", id="newline"),
    ],
)
def test_bad_sandbox_paths(path: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_sandbox_path(path, "mounts[3].destination")
    assert info.value.field == "mounts[3].destination"


@pytest.mark.parametrize(
    "path", ["/workspace", "/workspace/data", "/procfs", "/devices", "/.sandstormx", "/a/b/c"]
)
def test_good_sandbox_paths(path: str) -> None:
    assert check_sandbox_path(path, "f") == path


def test_root_is_allowed_only_where_asked() -> None:
    assert check_sandbox_path("/", "cwd", allow_root=True) == "/"
    with pytest.raises(InvalidRequest):
        check_sandbox_path("/proc", "cwd", allow_root=True)


def test_check_exec(config: Config) -> None:
    check_exec(ExecRequest(command=["ls"], cwd="/"), max_timeout_ms=config.max_timeout_ms)
    check_exec(
        ExecRequest(command=["ls"], timeout=config.max_timeout_ms),
        max_timeout_ms=config.max_timeout_ms,
    )
    for req, field in [
        (ExecRequest(command=["ls"], cwd="tmp"), "cwd"),
        (ExecRequest(command=["ls"], cwd="/proc/1"), "cwd"),
        (ExecRequest(command=["ls"], timeout=config.max_timeout_ms + 1), "timeout"),
        (ExecRequest(command=["ls"], environment={"A-B": "1"}), "environment"),
        (ExecRequest(), "code"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            check_exec(req, max_timeout_ms=config.max_timeout_ms)
        assert info.value.field == field, req


def test_code_argv() -> None:
    assert code_argv("python", "print(1)", is_file=False) == ["python3", "-c", "print(1)"]
    assert code_argv("javascript", "/tmp/c", is_file=True) == ["node", "/tmp/c"]
    assert code_argv("bash", "echo", is_file=False) == ["bash", "-c", "echo"]
    assert code_argv("sh", "/tmp/c", is_file=True) == ["sh", "/tmp/c"]
    assert INLINE_CODE_LIMIT < 128 * 1024  # one argv string's kernel limit
