"""Python client for the Sandstorm gateway: REST on httpx, the live stream on trio-websocket.

Async (Trio)::

    async with AsyncClient("http://localhost:3000") as client:
        result = await client.run(code="print('hi')", language="python")
        print(result.result.stdout)

        created = await client.run(command=["python3", "-i"], wait=False, stdin_open=True)
        async with client.stream(created.id) as stream:
            await stream.send_stdin(created.exec_id, "print(6 * 7)\\n")
            async for event in stream:
                ...

        files = client.files(created.id)
        await files.write("/workspace/data.csv", b"a,b\\n1,2\\n")
        print(await files.list("/workspace"))

Sync::

    with Client() as client:
        print(client.run(code="print('hi')", language="python").result.stdout)
        for event in client.iter_events(sandbox_id):
            ...
        client.files(sandbox_id).upload_dir("./data", "/workspace/data")

The gateway URL defaults to ``$SANDSTORM_URL`` or http://localhost:3000. Every error answer
raises :class:`SandstormError` with the SPEC's code, message and details.
"""

from sandstorm.api.files import ArchiveExtracted, FileEntry, FileList
from sandstorm.api.types import FsEvent
from sandstorm.sdk._archive import ArchiveError
from sandstorm.sdk._async_client import AsyncClient
from sandstorm.sdk._async_files import AsyncFiles
from sandstorm.sdk._client import Client
from sandstorm.sdk._files import Files
from sandstorm.sdk._http import (
    DEFAULT_URL,
    POOL_LIMITS,
    SandstormError,
    default_api_key,
    default_url,
)
from sandstorm.sdk._stream import (
    CLOSE_TIMEOUT_S,
    MAX_FRAME_BYTES,
    RECEIVE_BUFFER_BYTES,
    Stream,
    is_accepted,
)
from sandstorm.sdk._watch import FsEvents

__all__ = [
    "CLOSE_TIMEOUT_S",
    "DEFAULT_URL",
    "MAX_FRAME_BYTES",
    "POOL_LIMITS",
    "RECEIVE_BUFFER_BYTES",
    "ArchiveError",
    "ArchiveExtracted",
    "AsyncClient",
    "AsyncFiles",
    "Client",
    "FileEntry",
    "FileList",
    "Files",
    "FsEvent",
    "FsEvents",
    "SandstormError",
    "Stream",
    "default_api_key",
    "default_url",
    "is_accepted",
]
