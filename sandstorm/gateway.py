"""The root supervisor: configuration, runtime registry, snapshot catalog, router, reaper, and
Hypercorn beside them.

The actor tree lives here, not in the ASGI app: Hypercorn runs in a sibling task and the web layer
only translates HTTP to actor calls, so shutdown drains sandboxes deliberately (the router's
teardown is shielded) instead of losing them with the app.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig

from sandstorm import __version__
from sandstorm.actors.router import Router
from sandstorm.config import Config
from sandstorm.images.builder import ImageManifest, image_rootfs, load_manifest
from sandstorm.protocol import LanguageInfo, Ready
from sandstorm.runtimes.registry import RuntimeRegistry, build_registry
from sandstorm.snapshots import SnapshotCatalog
from sandstorm.validation import LANGUAGE_COMMANDS

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 30.0


class Gateway:
    def __init__(self, config: Config, registry: RuntimeRegistry | None = None) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.registry = registry or build_registry(config)
        self.catalog = SnapshotCatalog(self.data_dir / "snapshots")
        self.manifest: ImageManifest | None = None
        self.router: Router | None = None
        self.store_open = False
        self.version = __version__

    def languages(self) -> list[LanguageInfo]:
        if self.manifest is None:
            return []
        return [
            LanguageInfo(
                name=lang.name,  # type: ignore[arg-type]
                version=lang.version,
                command=list(LANGUAGE_COMMANDS[lang.name]),  # type: ignore[index]
            )
            for lang in self.manifest.languages
            if lang.name in LANGUAGE_COMMANDS
        ]

    def ready(self) -> Ready:
        available = [i.name for i in self.registry.infos() if i.available]
        ok = (
            self.store_open
            and self.registry.detected
            and self.manifest is not None
            and bool(available)
        )
        return Ready(
            ready=ok and self.router is not None,
            store=self.store_open,
            runtimes_detected=self.registry.detected,
            image=self.manifest is not None,
            available_runtimes=available,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """Start the supervisor tree; on exit every sandbox is destroyed (shielded)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.catalog.open()
        self.store_open = True
        self.manifest = load_manifest(self.data_dir, self.config.image)
        if self.manifest is None:
            log.warning("image %r is not built: run `sandstorm image build`", self.config.image)
        await self.registry.detect_all()
        for info in self.registry.infos():
            log.info("runtime %s: %s", info.name, "available" if info.available else info.reason)
        router = Router(
            self.config,
            self.registry,
            self.catalog,
            image_rootfs(self.data_dir, self.config.image),
            {lang.name for lang in self.languages()},
        )
        async with trio.open_nursery() as nursery:
            # Orphans from an earlier run go first, before any new sandbox exists.
            await self.reap(router)
            await nursery.start(router.run)
            self.router = router
            nursery.start_soon(self._reap_forever, router)
            try:
                yield self
            finally:
                self.router = None
                nursery.cancel_scope.cancel()

    async def reap(self, router: Router) -> list[str]:
        """Free every resource held for a sandbox the router does not know."""
        released: list[str] = []
        for name, driver in self.registry.drivers.items():
            detection = self.registry.detections.get(name)
            if detection is None or not detection.available:
                continue
            for orphan in await driver.list_orphans(router.live_ids):
                with trio.CancelScope(shield=True):
                    try:
                        released += await driver.destroy(orphan)
                    except Exception:
                        log.exception("reaper: could not free %s", orphan)
        if released:
            log.info("reaper released %s", released)
        return released

    async def _reap_forever(self, router: Router) -> None:
        while True:
            await trio.sleep(REAP_INTERVAL_S)
            await self.reap(router)


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
    """Run the gateway until SIGINT/SIGTERM (or cancellation); reports the bound URLs."""
    from sandstorm.web.app import create_app
    from sandstorm.web.server import serve_http

    gateway = Gateway(config)
    async with gateway.running(), trio.open_nursery() as nursery:
        app = create_app(gateway)
        shutdown = trio.Event()
        if handle_signals:
            nursery.start_soon(_wait_for_signal, shutdown)
        binds = await nursery.start(
            serve_http,
            app,
            hypercorn_config(config.host, config.port, config.max_client_frame_bytes),
            shutdown,
            config.write_timeout_s,
        )
        log.info("sandstorm %s serving on %s", __version__, ", ".join(binds))
        task_status.started(binds)
        await shutdown.wait()
        nursery.cancel_scope.cancel()


async def _wait_for_signal(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, draining", signal.Signals(signum).name)
            shutdown.set()
            return
