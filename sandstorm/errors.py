"""The gateway's error hierarchy; each class maps to one SPEC §3 code and HTTP status.

Actors and runtimes raise these; the web layer turns them into
``{"error": {"code", "message", "details"}}`` without knowing where they came from.
"""

from __future__ import annotations

import re

import msgspec


class GatewayError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(GatewayError):
    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, field: str | None, **details: object) -> None:
        super().__init__(message, field=field, **details)
        self.field = field


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"


class MountNotAllowed(GatewayError):
    status = 403
    code = "mount_not_allowed"


class OriginNotAllowed(GatewayError):
    """A browser request sent from another site's page (cross-site request forgery)."""

    status = 403
    code = "origin_not_allowed"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class SandboxNotRunning(GatewayError):
    status = 409
    code = "sandbox_not_running"


class ExecNotRunning(GatewayError):
    """Stdin or a signal for an exec that has finished (or whose stdin is already closed)."""

    status = 409
    code = "exec_not_running"


class PermissionDenied(GatewayError):
    """A file operation the sandbox's own user may not do (``EACCES``, ``EPERM``, ``EROFS``)."""

    status = 403
    code = "permission_denied"


class FileNotFound(GatewayError):
    status = 404
    code = "file_not_found"


class WrongFileType(GatewayError):
    """A directory where a file is needed or the reverse, or a non-empty directory removed
    without ``recursive``."""

    status = 409
    code = "wrong_file_type"


class FileExists(GatewayError):
    """The destination of a move (without ``overwrite``) or a mkdir (without ``parents``)
    already exists."""

    status = 409
    code = "file_exists"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class RangeNotSatisfiable(GatewayError):
    status = 416
    code = "range_not_satisfiable"


class SnapshotUnsupported(GatewayError):
    status = 422
    code = "snapshot_unsupported"


class QuotaExceeded(GatewayError):
    status = 429
    code = "quota_exceeded"

    def __init__(self, message: str, *, retry_after: int, **details: object) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


class RuntimeUnavailable(GatewayError):
    status = 503
    code = "runtime_unavailable"


class AtCapacity(GatewayError):
    status = 503
    code = "at_capacity"

    def __init__(self, message: str, *, retry_after: int = 1, **details: object) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


class InsufficientStorage(GatewayError):
    """The sandbox ran out of room (memory for its filesystem, or its disk) mid-write."""

    status = 507
    code = "insufficient_storage"


class UnsafeArchive(GatewayError):
    """A tar member that would land outside the target directory or make a device node."""

    status = 400
    code = "unsafe_archive"


class SandboxFailed(GatewayError):
    """The sandbox died under the request (runtime crash, hostile agent, OOM of the whole VM)."""

    status = 409
    code = "sandbox_not_running"


# "... - at `$.mounts[0].source`", or for a bad mapping key "... - at `key` in `$.files`".
_PATH_RE = re.compile(r"(?:at|in) `\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[[^\]]*\])+)`")


def field_from_validation(err: msgspec.ValidationError | msgspec.DecodeError) -> str | None:
    """Extract the JSON path msgspec names (``at `$.mounts[0].source``` → ``mounts[0].source``)."""
    match = _PATH_RE.search(str(err))
    if match is None:
        return None
    # A value inside a mapping is reported as "environment[...]": the mapping is the field.
    return match.group(1).lstrip(".").replace("[...]", "")


def invalid_from_msgspec(err: msgspec.ValidationError | msgspec.DecodeError) -> InvalidRequest:
    field = field_from_validation(err)
    message = str(err)
    if isinstance(err, msgspec.ValidationError):
        # An unknown or missing key names itself in the message, not in the path.
        named = re.search(r"Object (?:contains unknown|missing required) field `([^`]*)`", message)
        if named is not None:
            name = named.group(1)
            field = f"{field}.{name}" if field else name
    return InvalidRequest(message, field=field or "body")
