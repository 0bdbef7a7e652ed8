"""What every call shares: the gateway's URL and key, the HTTP pool, and error answers."""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

import httpx
import msgspec

DEFAULT_URL = "http://localhost:3000"
T = TypeVar("T")
#: Connections to the gateway. httpx keeps only 20 idle by default: with more requests in flight
#: than that, answers would close their connections and the next requests open new ones.
POOL_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)


def default_url() -> str:
    return os.environ.get("SANDSTORM_URL") or DEFAULT_URL


def default_api_key() -> str | None:
    return os.environ.get("SANDSTORM_API_KEY") or None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class SandstormError(Exception):
    """An error answer from the gateway (or a stream ``error`` frame)."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def error_from_body(status: int, body: bytes) -> SandstormError:
    """The SPEC's ``{"error": {"code", "message", "details"}}``; any other body as
    ``http_error`` with its text."""
    try:
        error = json.loads(body)["error"]
        return SandstormError(status, error["code"], error["message"], error.get("details", {}))
    except (ValueError, KeyError, TypeError):
        return SandstormError(status, "http_error", body.decode(errors="replace"), {})


def raise_for(response: httpx.Response) -> None:
    """Raise the answer's error; the body must have been read (``read``/``aread`` when
    streamed)."""
    if response.status_code >= 400:
        raise error_from_body(response.status_code, response.content) from None


def decode(response: httpx.Response, kind: type[T]) -> T:
    raise_for(response)
    return msgspec.json.decode(response.content, type=kind)


def non_null(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}
