"""protocol/ is generated from the code: a stale file fails here."""

from __future__ import annotations

import json

from sandstorm.api.schema import PROTOCOL_DIR, generated


def test_generated_protocol_files_are_current() -> None:
    for name, text in generated().items():
        path = PROTOCOL_DIR / name
        assert path.exists(), f"{name} missing: run python -m sandstorm.api.schema"
        assert path.read_text() == text, f"{name} is stale: run python -m sandstorm.api.schema"


def test_openapi_names_every_route_of_the_spec() -> None:
    doc = json.loads((PROTOCOL_DIR / "openapi.json").read_text())
    expected = {
        ("post", "/v1/sandboxes/run"),
        ("post", "/v1/sandboxes/{sandbox_id}/exec"),
        ("get", "/v1/sandboxes/{sandbox_id}/status"),
        ("get", "/v1/sandboxes/{sandbox_id}/execs/{exec_id}"),
        ("delete", "/v1/sandboxes/{sandbox_id}"),
        ("get", "/v1/sandboxes"),
        ("post", "/v1/sandboxes/{sandbox_id}/snapshot"),
        ("post", "/v1/sandboxes/resume"),
        ("get", "/v1/snapshots"),
        ("get", "/v1/snapshots/{snapshot_id}"),
        ("delete", "/v1/snapshots/{snapshot_id}"),
        ("get", "/v1/runtimes"),
        ("get", "/v1/languages"),
        ("get", "/health"),
        ("get", "/ready"),
        ("get", "/v1/sandboxes/{sandbox_id}/files/content"),
        ("put", "/v1/sandboxes/{sandbox_id}/files/content"),
        ("get", "/v1/sandboxes/{sandbox_id}/files/list"),
        ("get", "/v1/sandboxes/{sandbox_id}/files/stat"),
        ("post", "/v1/sandboxes/{sandbox_id}/files/mkdir"),
        ("post", "/v1/sandboxes/{sandbox_id}/files/move"),
        ("delete", "/v1/sandboxes/{sandbox_id}/files"),
        ("get", "/v1/sandboxes/{sandbox_id}/files/archive"),
        ("put", "/v1/sandboxes/{sandbox_id}/files/archive"),
    }
    found = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert found == expected


def test_stream_schema_covers_every_frame_type() -> None:
    schema = json.loads((PROTOCOL_DIR / "stream.schema.json").read_text())
    text = json.dumps(schema)
    for tag in (
        "status", "exec_started", "stdout", "stderr", "exit", "lagged", "error", "fs",
        "watch_accepted",
    ):  # fmt: skip
        assert f'"{tag}"' in text
