"""The web console on a gateway with keys: the key typed in the page stays in the tab's
sessionStorage and goes with every REST call and the stream (as the WebSocket subprotocol)."""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

import pytest
import trio

from tests.harness import RunningGateway
from tests.tenancy.helpers import make_key
from tests.web.test_console import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TIMEOUT_MS,
    browser_required,  # noqa: F401 - a fixture
    wait_output,
    wait_verdict,
    write_code,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.usefixtures("browser_required")


def _scenario(url: str, key: str) -> tuple[str, str]:
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="sandstorm-chromium-") as profile,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page: Page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            # Without the key the page loads, but the API refuses it: no languages.
            assert page.locator("#language option[value]").count() == 0
            page.fill("#api-key", key)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function(
                "() => document.querySelectorAll('#language option[value]').length"
            )
            page.wait_for_selector("#run:not([disabled])")
            write_code(page, "print('keyed ' + 'hello')")
            page.click("#run")
            wait_output(page, "keyed hello")
            wait_verdict(page, "ok")
            stored = page.evaluate("() => sessionStorage.getItem('sandstorm.apiKey')")
            page.reload()
            kept = page.input_value("#api-key")
        finally:
            context.close()
    assert not errors, errors
    return stored, kept


async def test_console_sends_the_key(gw: RunningGateway) -> None:
    with trio.fail_after(120):
        _, key = await make_key(gw.data_dir, "browser")
        stored, kept = await trio.to_thread.run_sync(_scenario, gw.url + "/", key)
        assert stored == key and kept == key
        assert (await gw.client.get("/v1/sandboxes")).status_code == 401
