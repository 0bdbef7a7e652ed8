"""The web console at ``/``, driven in a real headless Chromium against a real gateway.

Debian's ``chromium`` package is driven by Playwright for Python (its sync API, in a worker
thread: Playwright's async API needs asyncio, and these tests run under Trio). Playwright's own
browser download is never used. The finished page of the main test is saved to
``test-artifacts/console.png``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import trio

from sandstorm.config import DEFAULT_RUNTIME_PATHS
from sandstorm.web.console import CONTENT_SECURITY_POLICY
from tests.conftest import require
from tests.harness import RunningGateway

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Page

# The console is a page over the same API: which runtime serves its runs plays no part here.
pytestmark = pytest.mark.runtimes("gvisor")

CHROMIUM = Path(os.environ.get("SANDSTORM_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# Sandbox start-up under gVisor plus the page's own work; generous for a loaded CI machine.
TIMEOUT_MS = 30_000
T = TypeVar("T")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (scripts/install.sh installs Debian's chromium package)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is missing (pip install -e '.[dev]')"
    return None


@pytest.fixture
def browser_required() -> None:
    require(browser_missing())


def _with_page(url: str, scenario: Callable[[Page], T]) -> T:
    """Open ``url`` in a fresh headless Chromium and run ``scenario`` on it (blocking)."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="sandstorm-chromium-") as profile,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 760},
            device_scale_factor=1,
        )
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            # A script error or a CSP refusal shows up here; either fails the test. (Predicates
            # below are functions, not expressions: the page's CSP forbids eval, even Playwright's.)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: _console_problem(problems, msg))
            page.goto(url)
            page.wait_for_function(
                "() => document.querySelectorAll('#language option[value]').length"
            )
            page.wait_for_selector("#run:not([disabled])")
            result = scenario(page)
        finally:
            context.close()
    assert not problems, problems
    return result


def _console_problem(problems: list[str], msg: ConsoleMessage) -> None:
    # An HTTP error status the page handles itself (the 503 test) is logged too; not a problem.
    if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
        problems.append(f"console {msg.type}: {msg.text}")


async def in_browser(gw: RunningGateway, scenario: Callable[[Page], T]) -> T:
    return await trio.to_thread.run_sync(_with_page, gw.url + "/", scenario)


def write_code(page: Page, code: str, language: str = "python") -> None:
    page.select_option("#language", language)
    page.fill("#code", code)


def output_text(page: Page, kind: str | None = None) -> str:
    selector = f"#output span.{kind}" if kind else "#output"
    texts: list[str] = page.locator(selector).all_text_contents()
    return "".join(texts)


def wait_output(page: Page, text: str, kind: str = "stdout") -> None:
    page.wait_for_function(
        """([kind, text]) => [...document.querySelectorAll(`#output span.${kind}`)]
            .map((s) => s.textContent).join("").includes(text)""",
        arg=[kind, text],
    )


def wait_verdict(page: Page, verdict: str) -> None:
    page.wait_for_function(
        "(v) => document.getElementById('verdict').classList.contains(`badge-${v}`)", arg=verdict
    )


async def test_page_and_assets_are_served_with_a_strict_policy(gw: RunningGateway) -> None:
    expected = {
        "/": "text/html",
        "/static/console.js": "text/javascript",
        "/static/files.js": "text/javascript",
        "/static/console.css": "text/css",
        "/static/favicon.svg": "image/svg+xml",
    }
    for path, content_type in expected.items():
        response = await gw.client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(content_type)
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    page = (await gw.client.get("/")).text
    assert '<script type="module" src="/static/console.js"></script>' in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    for path in ("/static/nope.js", "/static/..%2Fconsole.py", "/static/"):
        response = await gw.client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


STREAMING_PROGRAM = """\
import sys, time
print("first line", flush=True)
print("a note on stderr", file=sys.stderr, flush=True)
time.sleep(1.5)
print("second line", flush=True)
line = sys.stdin.readline()
print("echo:", line.strip(), flush=True)
"""


async def test_run_streams_output_live_takes_stdin_and_shows_the_verdict(
    gw: RunningGateway, browser_required: None
) -> None:
    languages = (await gw.client.get("/v1/languages")).json()
    assert languages, "the gateway lists no languages"

    def scenario(page: Page) -> dict[str, Any]:
        options = page.locator("#language option").all_text_contents()
        assert options == [f"{lang['name']} {lang['version']}" for lang in languages]
        assert page.input_value("#language") == "python"
        assert "print(" in page.input_value("#code")  # the default snippet
        write_code(page, STREAMING_PROGRAM)
        page.click("#run")
        wait_output(page, "first line")
        # Live: the first line is on the page while the program still sleeps before the second.
        seen_first = output_text(page)
        assert "second line" not in seen_first, seen_first
        assert page.locator("#verdict").text_content() == "running"
        wait_output(page, "second line")
        page.fill("#stdin", "hello sandbox")
        page.press("#stdin", "Enter")
        wait_output(page, "echo: hello sandbox")
        wait_verdict(page, "ok")
        # The sandbox outlives the run (for the file panel and the next run) until ended.
        page.wait_for_function("() => document.getElementById('s-state').textContent === 'idle'")
        page.click("#end-sandbox")
        page.wait_for_function(
            "() => document.getElementById('s-state').textContent === 'destroyed'"
        )
        assert "hello sandbox\n" in output_text(page, "stdin")
        assert "a note on stderr" in output_text(page, "stderr")
        page.locator("#code").evaluate("(el) => { el.scrollTop = 0; }")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
        return {
            "verdict": page.locator("#verdict").text_content(),
            "exit": page.locator("#m-exit").text_content(),
            "duration": page.locator("#m-duration").text_content(),
            "cpu": page.locator("#m-cpu").text_content(),
            "rss": page.locator("#m-rss").text_content(),
            "runtime": page.locator("#m-runtime").text_content(),
            "sandbox": page.locator("#s-sandbox").text_content(),
            "stdout": output_text(page, "stdout"),
        }

    seen = await in_browser(gw, scenario)
    assert seen["verdict"] == "ok" and seen["exit"] == "0"
    assert seen["stdout"] == "first line\nsecond line\necho: hello sandbox\n"
    assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", seen["duration"]), seen
    assert (
        float(seen["duration"].split()[0]) * (1000 if seen["duration"].endswith(" s") else 1) > 1500
    )
    assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", seen["cpu"]), seen
    assert re.fullmatch(r"\d+(\.\d+)? (B|KiB|MiB)", seen["rss"]), seen
    assert seen["runtime"] == "gvisor (standard, default)"
    # "End sandbox" freed it.
    assert (await gw.status(seen["sandbox"]))["state"] == "destroyed"


async def test_every_default_snippet_runs_and_reads_stdin(
    gw: RunningGateway, browser_required: None
) -> None:
    def scenario(page: Page) -> dict[str, str]:
        outputs = {}
        for language in page.locator("#language option").evaluate_all(
            "(options) => options.map((o) => o.value)"
        ):
            page.select_option("#language", language)
            assert page.input_value("#code"), language
            page.click("#run")
            wait_output(page, "What's your name? ")
            page.fill("#stdin", "Ada")
            page.press("#stdin", "Enter")
            wait_verdict(page, "ok")
            outputs[language] = output_text(page, "stdout") + output_text(page, "stderr")
        return outputs

    outputs = await in_browser(gw, scenario)
    assert set(outputs) == {"python", "javascript", "bash", "sh"}
    for language, text in outputs.items():
        assert "Hello from a sandbox!" in text, (language, text)
        assert "a warning on stderr" in text, (language, text)
        assert "Nice to meet you, Ada." in text, (language, text)


async def test_stop_interrupts_a_busy_program(gw: RunningGateway, browser_required: None) -> None:
    def scenario(page: Page) -> tuple[str | None, str | None]:
        write_code(page, 'print("spinning", flush=True)\nwhile True:\n    pass\n')
        page.keyboard.press("Control+Enter")  # the shortcut runs too
        wait_output(page, "spinning")
        page.click("#stop")
        wait_verdict(page, "killed")
        return page.locator("#verdict").text_content(), page.locator("#m-exit").text_content()

    verdict, exit_ = await in_browser(gw, scenario)
    assert verdict == "killed"
    assert exit_ == "signal 2"  # SIGINT


async def test_second_stop_kills_a_program_that_ignores_sigint(
    gw: RunningGateway, browser_required: None
) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        'print("ignoring SIGINT", flush=True)\n'
        "time.sleep(60)\n"
    )

    def scenario(page: Page) -> tuple[str | None, str | None]:
        write_code(page, code)
        page.click("#run")
        wait_output(page, "ignoring SIGINT")
        page.click("#stop")
        page.wait_for_function("() => document.getElementById('stop-label').textContent === 'Kill'")
        page.wait_for_timeout(500)
        assert page.locator("#verdict").text_content() == "running"
        page.click("#stop")
        wait_verdict(page, "killed")
        assert "sent SIGKILL" in output_text(page, "note")
        return page.locator("#verdict").text_content(), page.locator("#m-exit").text_content()

    verdict, exit_ = await in_browser(gw, scenario)
    assert (verdict, exit_) == ("killed", "signal 9")


async def test_stderr_is_shown_in_its_own_style(gw: RunningGateway, browser_required: None) -> None:
    code = (
        "import sys\n"
        'print("to stdout", flush=True)\n'
        'print("to stderr <b>not bold</b>", file=sys.stderr, flush=True)\n'
        "sys.stdout.buffer.write(b'bad byte: \\xff\\n')\n"
        "sys.exit(3)\n"
    )

    def scenario(page: Page) -> dict[str, Any]:
        write_code(page, code)
        page.click("#run")
        wait_verdict(page, "error")
        color = "(el) => getComputedStyle(el).color"
        return {
            "stdout": output_text(page, "stdout"),
            "stderr": output_text(page, "stderr"),
            "bold": page.locator("#output b").count(),
            "stdout_color": page.locator("#output span.stdout").first.evaluate(color),
            "stderr_color": page.locator("#output span.stderr").first.evaluate(color),
            "exit": page.locator("#m-exit").text_content(),
        }

    seen = await in_browser(gw, scenario)
    assert seen["stderr"] == "to stderr <b>not bold</b>\n"
    assert seen["bold"] == 0  # program output is text, never markup
    # Invalid UTF-8 arrives as data_b64 and is shown with the replacement character.
    assert seen["stdout"] == "to stdout\nbad byte: \ufffd\n"
    assert seen["stderr_color"] != seen["stdout_color"]
    assert seen["stderr_color"] == "rgb(255, 123, 114)"
    assert seen["exit"] == "3"


async def test_unavailable_isolation_level_shows_the_gateway_error(
    start_gateway: Callable[..., Any], browser_required: None
) -> None:
    # Only gVisor is found, so "maximum" has no runtime whatever this machine has installed.
    paths = {name: list(p) for name, p in DEFAULT_RUNTIME_PATHS.items()}
    for name in ("kata", "firecracker", "qemu"):
        paths[name] = [f"/nonexistent/{name}"]
    async with start_gateway(runtime_paths=paths) as gw:
        refused = await gw.run(code="print(1)", language="python", isolation_level="maximum")
        assert refused.status_code == 503
        message = refused.json()["error"]["message"]

        def scenario(page: Page) -> dict[str, Any]:
            option = page.locator("#isolation option[value=maximum]").text_content()
            write_code(page, 'print("never runs")')
            page.select_option("#isolation", "maximum")
            page.click("#run")
            page.wait_for_selector("#error:not([hidden])")
            page.wait_for_selector("#run:not([disabled])")
            return {
                "option": option,
                "error": page.locator("#error").text_content(),
                "verdict": page.locator("#verdict").text_content(),
                "output": output_text(page),
            }

        seen = await in_browser(gw, scenario)
    assert seen["option"] == "maximum · no runtime here"
    assert seen["error"] == f"{message} (runtime_unavailable, HTTP 503)"
    assert seen["verdict"] == "not started"
    assert "never runs" not in seen["output"]
