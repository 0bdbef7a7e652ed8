"""The HTTP client of the upload and download scenarios, in a process of its own.

``python -m bench.files_client URL SANDBOX_ID upload PATH MIB TIMEOUT_S``
``python -m bench.files_client URL SANDBOX_ID download PATH MIB TIMEOUT_S``

``upload`` streams MIB MiB (one random MiB, repeated) as the body of
``PUT /v1/sandboxes/{id}/files/content?path=PATH`` with its ``Content-Length``; ``download``
streams ``GET /v1/sandboxes/{id}/files/content?path=PATH`` and counts its bytes. Both with
httpx (the key from ``$SANDSTORM_API_KEY``, which the scenario passes on). Prints one JSON line,
``{"bytes": n, "elapsed_s": seconds}``, from sending the request to the answer's last byte. Any
other ending (an error status, a wrong size, nothing within TIMEOUT_S) exits 1 with the reason
on stderr.

A deployment's client is another process: run in the bench's own process and event loop, the
client's HTTP work would take CPU from the gateway it measures.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from bench.stream_client import run_client
from sandstorm.sdk import default_api_key

MIB = 1 << 20


class TransferFailed(Exception):
    """The gateway answered otherwise than with the whole file."""


def _client(url: str) -> httpx.AsyncClient:
    key = default_api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=None)


def _route(sandbox_id: str) -> str:
    return f"/v1/sandboxes/{sandbox_id}/files/content"


async def upload(url: str, sandbox_id: str, path: str, mib: int) -> dict[str, Any]:
    block = os.urandom(MIB)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(mib):
            yield block

    size = mib * MIB
    # An explicit Content-Length: httpx then sends the stream as is, not chunked.
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    async with _client(url) as client:
        start = time.perf_counter()
        response = await client.put(
            _route(sandbox_id), params={"path": path}, content=body(), headers=headers
        )
        elapsed = time.perf_counter() - start
    if response.status_code != 201:
        raise TransferFailed(f"PUT answered {response.status_code}: {response.text[:500]}")
    entry = response.json()
    if entry.get("size") != size or entry.get("type") != "file":
        raise TransferFailed(f"PUT of {size} bytes answered the entry {entry}")
    return {"bytes": size, "elapsed_s": elapsed}


async def download(url: str, sandbox_id: str, path: str, mib: int) -> dict[str, Any]:
    received = 0
    async with _client(url) as client:
        start = time.perf_counter()
        async with client.stream("GET", _route(sandbox_id), params={"path": path}) as response:
            if response.status_code != 200:
                await response.aread()
                raise TransferFailed(f"GET answered {response.status_code}: {response.text[:500]}")
            async for chunk in response.aiter_raw():
                received += len(chunk)
        elapsed = time.perf_counter() - start
    if received != mib * MIB or response.headers.get("content-length") != str(received):
        length = response.headers.get("content-length")
        raise TransferFailed(f"GET gave {received} bytes (Content-Length {length}), not {mib} MiB")
    return {"bytes": received, "elapsed_s": elapsed}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.files_client", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("url")
    parser.add_argument("sandbox_id")
    parser.add_argument("mode", choices=["upload", "download"])
    parser.add_argument("path")
    parser.add_argument("mib", type=int)
    parser.add_argument("timeout_s", type=float)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 on a bad command line
    transfer = upload if args.mode == "upload" else download
    work = functools.partial(transfer, args.url, args.sandbox_id, args.path, args.mib)
    return run_client("bench.files_client", work, args.timeout_s, "no whole answer")


if __name__ == "__main__":
    sys.exit(main())
