"""The console's file panel, in a real headless Chromium against a real gateway and sandbox.

What the page shows and does is checked against the sandbox itself: bytes a run wrote come back
through the panel's download, and files dropped or picked in the panel are read back by an exec.
The finished page is saved to ``test-artifacts/console-files.png``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.conftest import require
from tests.harness import RunningGateway
from tests.web.test_console import (
    ARTIFACTS,
    browser_missing,
    in_browser,
    wait_output,
    wait_verdict,
    write_code,
)

if TYPE_CHECKING:
    from playwright.sync_api import Dialog, FilePayload, Locator, Page

pytestmark = pytest.mark.runtimes("gvisor")

REPORT = bytes(range(256)) * 4 + b"\x00tail\xff"
WRITER = f"""\
import os
os.makedirs("/workspace/charts", exist_ok=True)
with open("/workspace/report.bin", "wb") as f:
    f.write({REPORT!r})
print("written", flush=True)
"""
DROPPED_TEXT = b"dropped into the panel\n"
DROPPED_BINARY = bytes(reversed(range(256))) * 16
PICKED_TEXT = b"picked with the file chooser\n"
EXEC_TIMEOUT_S = 60


async def _exec(gw: RunningGateway, sandbox_id: str, argv: list[str]) -> dict[str, Any]:
    with trio.fail_after(EXEC_TIMEOUT_S):
        response = await gw.client.post(
            f"/v1/sandboxes/{sandbox_id}/exec", json={"command": argv, "wait": True}
        )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()["result"]
    return result


def in_sandbox(gw: RunningGateway, sandbox_id: str, *argv: str) -> dict[str, Any]:
    """Run ``argv`` in the sandbox from the browser's thread, through the gateway's REST API."""
    return trio.from_thread.run(_exec, gw, sandbox_id, list(argv))


def file_row(page: Page, name: str) -> Locator:
    return page.locator(f'#files-list tr[data-name="{name}"]')


def payload(name: str, data: bytes) -> FilePayload:
    return {"name": name, "mimeType": "application/octet-stream", "buffer": data}


def drop_files(page: Page, files: dict[str, bytes]) -> None:
    """Drop ``files`` on the panel as a browser does: a DataTransfer of File objects."""
    transfer = page.evaluate_handle(
        """(files) => {
            const transfer = new DataTransfer();
            for (const [name, bytes] of files) {
                transfer.items.add(new File([new Uint8Array(bytes)], name));
            }
            return transfer;
        }""",
        [[name, list(data)] for name, data in files.items()],
    )
    page.dispatch_event("#files", "dragover", {"dataTransfer": transfer})
    assert "files-dropping" in (page.get_attribute("#files", "class") or "")
    page.dispatch_event("#files", "drop", {"dataTransfer": transfer})


async def test_file_panel_browses_downloads_uploads_makes_and_deletes(
    gw: RunningGateway,
) -> None:
    require(browser_missing())

    def scenario(page: Page) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        assert page.locator("#files-refresh").is_disabled()  # no sandbox before the first run
        write_code(page, WRITER)
        page.click("#run")
        wait_verdict(page, "ok")
        # The run's files are listed once it ends, directories first.
        file_row(page, "report.bin").wait_for()
        assert page.locator("#files-path").text_content() == "/workspace"
        seen["rows"] = page.locator("#files-list tr").evaluate_all(
            "(rows) => rows.map((r) => [r.dataset.type, r.dataset.name])"
        )
        seen["report_cells"] = file_row(page, "report.bin").locator("td").all_text_contents()
        sandbox_id = page.locator("#s-sandbox").text_content() or ""

        with page.expect_download() as download_info:
            page.click('button[aria-label="Download report.bin"]')
        download = download_info.value
        seen["download_name"] = download.suggested_filename
        seen["downloaded"] = Path(download.path()).read_bytes()

        drop_files(page, {"dropped.txt": DROPPED_TEXT, "dropped.bin": DROPPED_BINARY})
        file_row(page, "dropped.bin").wait_for()
        file_row(page, "dropped.txt").wait_for()
        seen["dropped_cat"] = in_sandbox(gw, sandbox_id, "cat", "/workspace/dropped.txt")
        seen["dropped_sum"] = in_sandbox(gw, sandbox_id, "sha256sum", "/workspace/dropped.bin")

        page.fill("#files-mkdir-name", "plots")
        page.click("#files-mkdir")
        file_row(page, "plots").wait_for()
        seen["plots_type"] = file_row(page, "plots").get_attribute("data-type")
        page.click('button[aria-label="Open plots"]')
        page.wait_for_function(
            "() => document.getElementById('files-path').textContent === '/workspace/plots'"
        )
        page.set_input_files("#files-picker", files=[payload("picked.txt", PICKED_TEXT)])
        file_row(page, "picked.txt").wait_for()
        seen["picked_cat"] = in_sandbox(gw, sandbox_id, "cat", "/workspace/plots/picked.txt")
        page.click("#files-up")
        page.wait_for_function(
            "() => document.getElementById('files-path').textContent === '/workspace'"
        )

        # A refused upload (a directory stands at that path) shows the gateway's error.
        page.set_input_files("#files-picker", files=[payload("charts", b"x")])
        page.wait_for_selector("#error:not([hidden])")
        seen["upload_error"] = page.locator("#error").text_content()

        # Deleting asks first: a dismissed question deletes nothing.
        questions: list[str] = []
        answers = [False, True, True]

        def on_dialog(dialog: Dialog) -> None:
            questions.append(dialog.message)
            if answers.pop(0):
                dialog.accept()
            else:
                dialog.dismiss()

        page.on("dialog", on_dialog)
        page.click('button[aria-label="Delete report.bin"]')
        page.click('button[aria-label="Delete plots"]')
        file_row(page, "plots").wait_for(state="detached")
        seen["kept_after_dismiss"] = file_row(page, "report.bin").count()
        page.click('button[aria-label="Delete report.bin"]')
        file_row(page, "report.bin").wait_for(state="detached")
        seen["questions"] = questions
        seen["left"] = in_sandbox(gw, sandbox_id, "ls", "-A", "/workspace")

        # The next run is an exec in the same sandbox; the panel refreshes when it ends.
        write_code(page, "echo from the next run > /workspace/next.txt; echo done", "bash")
        page.click("#run")
        wait_output(page, "done")
        file_row(page, "next.txt").wait_for()
        seen["same_sandbox"] = page.locator("#s-sandbox").text_content() == sandbox_id
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console-files.png"), full_page=True)

        page.click("#end-sandbox")
        page.wait_for_function(
            "() => document.getElementById('s-state').textContent === 'destroyed'"
        )
        seen["panel_off"] = page.locator("#files-refresh").is_disabled()
        seen["rows_after_end"] = page.locator("#files-list tr").count()
        seen["sandbox"] = sandbox_id
        return seen

    seen = await in_browser(gw, scenario)
    rows = [tuple(row) for row in seen["rows"]]
    assert ("dir", "charts") in rows and ("file", "report.bin") in rows, rows
    types = [kind for kind, _ in rows]
    assert types == sorted(types, key=lambda kind: kind != "dir"), rows  # directories first
    name, kind, size, modified, actions = seen["report_cells"]
    assert (name, kind, size) == ("report.bin", "file", "1.0 KiB")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", modified), modified
    assert actions == "DownloadDelete"
    assert seen["download_name"] == "report.bin"
    assert seen["downloaded"] == REPORT
    assert seen["dropped_cat"]["stdout"] == DROPPED_TEXT.decode()
    assert seen["dropped_sum"]["stdout"].split()[0] == hashlib.sha256(DROPPED_BINARY).hexdigest()
    assert seen["plots_type"] == "dir"
    assert seen["picked_cat"]["stdout"] == PICKED_TEXT.decode()
    assert "could not upload /workspace/charts" in seen["upload_error"]
    assert "wrong_file_type, HTTP 409" in seen["upload_error"]
    assert seen["kept_after_dismiss"] == 1
    assert seen["questions"] == [
        "Delete /workspace/report.bin?",
        "Delete /workspace/plots and everything in it?",
        "Delete /workspace/report.bin?",
    ]
    left = set(seen["left"]["stdout"].split())
    assert {"charts", "dropped.bin", "dropped.txt"} <= left, left
    assert not {"report.bin", "plots"} & left, left
    assert seen["same_sandbox"]
    assert seen["panel_off"] and seen["rows_after_end"] == 0
    assert (await gw.status(seen["sandbox"]))["state"] == "destroyed"
