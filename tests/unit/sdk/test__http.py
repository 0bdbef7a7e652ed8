"""Error answers as SandstormError: the SPEC's body, or any other."""

from __future__ import annotations

import json

import httpx
import pytest

from sandstorm.sdk._http import SandstormError, error_from_body, raise_for


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (404, "file_not_found"),
        (409, "wrong_file_type"),
        (409, "file_exists"),
        (403, "permission_denied"),
        (507, "insufficient_storage"),
        (400, "unsafe_archive"),
    ],
)
def test_a_spec_error_body_keeps_its_code_and_details(status: int, code: str) -> None:
    body = {"error": {"code": code, "message": "no", "details": {"path": "/workspace/x"}}}
    response = httpx.Response(status, content=json.dumps(body).encode())
    with pytest.raises(SandstormError) as info:
        raise_for(response)
    error = info.value
    assert (error.status, error.code, error.message) == (status, code, "no")
    assert error.details == {"path": "/workspace/x"}


def test_any_other_body_is_an_http_error() -> None:
    error = error_from_body(502, b"<html>bad gateway</html>")
    assert (error.status, error.code, error.message) == (
        502,
        "http_error",
        "<html>bad gateway</html>",
    )


def test_a_success_raises_nothing() -> None:
    raise_for(httpx.Response(204))
