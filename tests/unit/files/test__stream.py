"""An upload's body read as tar: truncated, corrupt and foreign bodies are refused as bad
requests about ``body`` with nothing extracted; limits hold on the body and on what it unpacks
to; members stream to their writes in bounded pieces as the body arrives; a cancelled or failed
extraction takes back what it made."""

from __future__ import annotations

import gzip as gz
import io
import random
import tarfile
from pathlib import Path

import pytest
import trio

from sandstorm.errors import InsufficientStorage, InvalidRequest, PayloadTooLarge
from sandstorm.files import extract_archive
from sandstorm.files._stream import IN_PIECE
from tests.unit.files.fakefs import TARGET, FakeFiles, body_of, member, tar_of, with_target
from tests.unit.files.trees import staging_left

TIMEOUT = 30
MIB = 1024 * 1024
DATA = random.Random(3).randbytes(700_000)
TWO_FILES = tar_of([(member("one.bin"), DATA), (member("two.txt"), b"two")])


def second_member_offset() -> int:
    with tarfile.open(fileobj=io.BytesIO(TWO_FILES)) as tar:
        return tar.getmembers()[1].offset


async def refused_as(error: type[Exception], archive: bytes, **limits: int) -> Exception:
    fake = with_target()
    before = fake.snapshot()
    with trio.fail_after(TIMEOUT), pytest.raises(error) as caught:
        await extract_archive(fake, body_of(archive), TARGET, **limits)
    assert fake.snapshot() == before, "something was extracted"
    return caught.value


BAD_BODIES = {
    "empty": b"",
    "garbage": random.Random(5).randbytes(100_000),
    "text": b"hello, not a tar\n" * 100,
    "cut in file data": TWO_FILES[:300_000],
    "cut in a header": TWO_FILES[: second_member_offset() + 100],
    "cut before the end blocks": TWO_FILES[: second_member_offset() + 1024],
    "gzip cut short": gz.compress(TWO_FILES)[:200_000],
    "gzip without its trailer": gz.compress(TWO_FILES)[:-6],
    "gzip corrupt": (lambda z: z[:1000] + bytes(500) + z[1500:])(gz.compress(TWO_FILES)),
    "gzip magic then garbage": b"\x1f\x8b" + random.Random(6).randbytes(5000),
    "bad pax record": tar_of([(member("x", tarfile.XHDTYPE), b"nonsense"), (member("y"), b"")]),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_body_is_an_invalid_request_with_nothing_extracted(case: str) -> None:
    error = await refused_as(InvalidRequest, BAD_BODIES[case])
    assert isinstance(error, InvalidRequest) and error.field == "body"


async def test_sparse_files_are_refused(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.bin"
    with sparse.open("wb") as f:
        f.truncate(8 * 1024 * 1024)
        f.write(b"start")
    for fmt in ["gnu", "pax"]:
        with trio.fail_after(TIMEOUT):
            command = ["tar", f"--format={fmt}", "--sparse", "-C", str(tmp_path), "-cf", "-"]
            archive = (await trio.run_process([*command, "sparse.bin"], capture_stdout=True)).stdout
        error = await refused_as(InvalidRequest, archive)
        assert "sparse" in str(error)


async def test_limits_on_the_body_and_on_what_it_unpacks_to() -> None:
    await refused_as(PayloadTooLarge, TWO_FILES, max_bytes=len(TWO_FILES) - 1)
    bomb = gz.compress(tar_of([(member("zeros"), bytes(50 * 1024 * 1024))]))
    assert len(bomb) < 100_000
    await refused_as(PayloadTooLarge, bomb, max_bytes=len(bomb), max_unpacked_bytes=10_000_000)
    fake = FakeFiles()
    with trio.fail_after(TIMEOUT):
        done = await extract_archive(fake, body_of(TWO_FILES), "/t", max_bytes=len(TWO_FILES))
    assert done == (2, len(DATA) + 3)


@pytest.mark.parametrize("gzip", [False, True], ids=["tar", "tar.gz"])
async def test_members_stream_to_their_writes_as_the_body_arrives(gzip: bool) -> None:
    data = random.Random(9).randbytes(5 * 1024 * 1024)
    archive = tar_of([(member("big.bin"), data), (member("after.txt"), b"after")], gzip=gzip)
    body = body_of(archive, 64 * 1024)
    fake = FakeFiles()
    written = 0
    lags: list[int] = []

    def took(size: int) -> None:
        nonlocal written
        written += size
        lags.append(body.taken - written)

    fake.on_chunk.append(took)
    with trio.fail_after(TIMEOUT):
        assert await extract_archive(fake, body, "/t") == (2, len(data) + 5)
    assert fake.node("/t/big.bin").data == data
    assert max(fake.written) <= IN_PIECE <= MIB
    # Bytes read from the body but not yet written stay within a piece or two, never a file.
    assert max(lags) <= 2 * IN_PIECE + 64 * 1024


async def test_a_gzip_bomb_unpacks_no_faster_than_it_is_written() -> None:
    bomb = gz.compress(tar_of([(member("zeros"), bytes(64 * MIB))]), compresslevel=9)
    fake = FakeFiles()
    with trio.fail_after(TIMEOUT):
        assert await extract_archive(fake, body_of(bomb, len(bomb)), "/t") == (1, 64 * MIB)
    assert max(fake.written) <= MIB


async def test_cancelled_extraction_takes_back_what_it_made() -> None:
    archive = TWO_FILES[:400_000]
    fake = with_target()
    before = fake.snapshot()
    release = trio.Event()

    class StalledBody(body_of):
        async def __anext__(self) -> bytes:
            if self.taken >= len(archive):
                await release.wait()
            return await super().__anext__()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(extract_archive, fake, StalledBody(archive), TARGET)
            while sum(fake.written) < 300_000 or not staging_left(fake):
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert fake.snapshot() == before


async def test_out_of_room_in_the_sandbox_takes_back_what_it_made() -> None:
    fake = with_target()
    before = fake.snapshot()
    fake.room = len(DATA) // 2
    with trio.fail_after(TIMEOUT), pytest.raises(InsufficientStorage):
        await extract_archive(fake, body_of(TWO_FILES), TARGET)
    assert fake.snapshot() == before
