"""Checks that msgspec's types cannot express: cross-field rules, configured maxima, paths.

Everything here runs before anything is created, so a refused request leaves nothing behind.
A whole run request, whose mounts resolve to host paths, is checked by ``check_run`` in
``sandstorm.actors.planning``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping

from sandstorm.api.types import ExecRequest, Language, RunRequest
from sandstorm.errors import InvalidRequest

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV_ENTRIES = 128
MAX_ENV_BYTES = 64 * 1024
# Paths inside the sandbox that belong to the kernel or the gateway, never to a request.
RESERVED_PREFIXES = ("/proc", "/sys", "/dev", "/.sandstorm")


def check_code_or_command(req: RunRequest | ExecRequest) -> None:
    if req.code is not None and req.command is not None:
        raise InvalidRequest(
            "give either code (with language) or command, not both", field="command"
        )
    if req.code is None and req.command is None:
        raise InvalidRequest("give code (with language) or command", field="code")
    if req.code is not None:
        if req.language is None:
            raise InvalidRequest("language is required with code", field="language")
        if "\x00" in req.code:
            raise InvalidRequest("code must not contain NUL", field="code")
    if req.command is not None:
        if req.language is not None:
            raise InvalidRequest("language goes with code, not with command", field="language")
        for i, arg in enumerate(req.command):
            if "\x00" in arg:
                raise InvalidRequest(
                    "command arguments must not contain NUL", field=f"command[{i}]"
                )
        if not req.command[0]:
            raise InvalidRequest("command[0] must not be empty", field="command[0]")
    if req.stdin is not None and len(req.stdin.encode()) > 8 * 1024 * 1024:
        raise InvalidRequest("stdin is larger than 8 MiB", field="stdin")


def check_environment(env: Mapping[str, str]) -> None:
    if len(env) > MAX_ENV_ENTRIES:
        raise InvalidRequest(f"at most {MAX_ENV_ENTRIES} variables", field="environment")
    total = 0
    for name, value in env.items():
        field = f"environment.{name}" if ENV_NAME.fullmatch(name) else "environment"
        if not ENV_NAME.fullmatch(name):
            raise InvalidRequest(
                f"variable name {name!r} is not an identifier ([A-Za-z_][A-Za-z0-9_]*)", field=field
            )
        if "\x00" in value:
            raise InvalidRequest(f"value of {name} contains NUL", field=field)
        total += len(name.encode()) + len(value.encode()) + 2
    if total > MAX_ENV_BYTES:
        raise InvalidRequest("environment is larger than 64 KiB", field="environment")


def check_sandbox_path(path: str, field: str, *, allow_root: bool = False) -> str:
    """An absolute, normalised path inside the sandbox, outside the reserved trees."""
    if "\x00" in path or "\n" in path or "\r" in path:
        raise InvalidRequest("path must not contain NUL or newlines", field=field)
    if not path.startswith("/"):
        raise InvalidRequest(f"{path!r} is not an absolute path", field=field)
    if posixpath.normpath(path) != path or "//" in path or "/../" in path + "/":
        raise InvalidRequest(f"{path!r} is not normalised (no '..', '.', '//')", field=field)
    if path == "/" and not allow_root:
        raise InvalidRequest("'/' cannot be used here", field=field)
    for prefix in RESERVED_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            raise InvalidRequest(f"{path!r} is under reserved {prefix}", field=field)
    return path


def check_exec(req: ExecRequest, *, max_timeout_ms: int) -> None:
    """Refuse an exec request that msgspec's types accept but the rules do not; the configured
    ``max_timeout_ms`` bounds its timeout."""
    check_code_or_command(req)
    check_environment(req.environment)
    if req.cwd is not None:
        check_sandbox_path(req.cwd, "cwd", allow_root=True)
    if req.timeout is not None and req.timeout > max_timeout_ms:
        raise InvalidRequest(f"timeout is above the maximum {max_timeout_ms}", field="timeout")


# Code up to this size travels in argv (one round trip); larger code is written to a file first,
# because Linux caps one argument at 128 KiB.
INLINE_CODE_LIMIT = 64 * 1024


# How each language runs a program given as text: the interpreter and its "run this" flag.
LANGUAGE_COMMANDS: dict[Language, tuple[str, str]] = {
    "python": ("python3", "-c"),
    "javascript": ("node", "-e"),
    "bash": ("bash", "-c"),
    "sh": ("sh", "-c"),
}


def code_argv(language: Language, code_or_path: str, *, is_file: bool) -> list[str]:
    interpreter, flag = LANGUAGE_COMMANDS[language]
    return [interpreter, code_or_path] if is_file else [interpreter, flag, code_or_path]
