"""``sandstorm serve``: the gateway's supervisor tree with Hypercorn beside it, and the signals
that drain them (SIGTERM or SIGINT drains; the same signal again ends the grace period)."""

from __future__ import annotations

import logging
import signal

import trio
from hypercorn.config import Config as HypercornConfig

from sandstorm import __version__
from sandstorm.config import Config
from sandstorm.supervisor.gateway import Gateway
from sandstorm.web.app import create_app
from sandstorm.web.server import serve_http

log = logging.getLogger(__name__)


def hypercorn_config(host: str, port: int, max_frame: int = 1 << 20) -> HypercornConfig:
    hc = HypercornConfig()
    # A client frame is held whole before the gateway sees it: frames up to twice the cap get
    # an error frame, larger ones close the socket (1009) without being buffered.
    hc.websocket_max_message_size = 2 * max_frame
    bind_host = f"[{host}]" if ":" in host else host
    hc.bind = [f"{bind_host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 5.0
    # Bursts of clients (hundreds of simultaneous runs) must queue, not be refused by the kernel.
    hc.backlog = 2048
    return hc


async def serve(
    config: Config,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
) -> None:
    """Run the gateway until SIGINT/SIGTERM (or cancellation); reports the bound URLs.

    On a signal HTTP stays up through the drain, so waiting clients get their results and new
    work gets a clear 503 instead of a refused connection; then Hypercorn stops."""
    gateway = Gateway(config)
    hc = hypercorn_config(config.host, config.port, config.max_client_frame_bytes)
    async with gateway.running(), trio.open_nursery() as nursery:
        app = create_app(gateway)
        drain, stop_http, http_stopped = trio.Event(), trio.Event(), trio.Event()
        if handle_signals:
            nursery.start_soon(_wait_for_signals, gateway, drain)

        async def http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve_http(
                    app,
                    hc,
                    stop_http,
                    config.write_timeout_s,
                    config.max_body_bytes,
                    task_status=task_status,
                )
            finally:
                http_stopped.set()

        binds = await nursery.start(http)
        log.info("sandstorm %s serving on %s", __version__, ", ".join(binds))
        task_status.started(binds)
        await drain.wait()
        await gateway.drain()
        stop_http.set()
        with trio.move_on_after(hc.graceful_timeout + 1):
            await http_stopped.wait()
        nursery.cancel_scope.cancel()


async def _wait_for_signals(gateway: Gateway, drain: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not drain.is_set():
                if signum == signal.SIGINT:
                    gateway.interrupted()
                log.info(
                    "received %s: draining, then the sandboxes are %s (send it again to skip "
                    "the grace period)",
                    name,
                    "destroyed"
                    if gateway.on_shutdown == "destroy"
                    else "kept for the next gateway",
                )
                drain.set()
            else:
                log.warning("received %s again: ending the grace period now", name)
                gateway.cut_grace()
