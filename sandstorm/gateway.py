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
from sandstorm.agent import prepare_agent
from sandstorm.config import Config
from sandstorm.images.builder import ImageManifest, image_rootfs, load_manifest
from sandstorm.metrics import Metrics
from sandstorm.protocol import LanguageInfo, Ready
from sandstorm.recorder import Recorder
from sandstorm.runtimes.cgroups import SandboxCgroups
from sandstorm.runtimes.registry import RuntimeRegistry, build_registry
from sandstorm.shim import prepare_shim
from sandstorm.snapshots import SnapshotCatalog
from sandstorm.store import AsyncStore, SandboxRecord, Store
from sandstorm.validation import LANGUAGE_COMMANDS

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 30.0


class Gateway:
    def __init__(self, config: Config, registry: RuntimeRegistry | None = None) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.registry = registry or build_registry(config)
        self.store = AsyncStore(self.data_dir)
        self.recorder = Recorder(self.store)
        self.catalog = SnapshotCatalog(self.data_dir / "snapshots", self.store)
        self.manifest: ImageManifest | None = None
        self.router: Router | None = None
        self.store_open = False
        self.version = __version__
        self.metrics = Metrics()
        # Set on SIGTERM/SIGINT: not ready any more, new work refused (see drain()).
        self.draining = False
        self._grace: trio.CancelScope | None = None

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
            ready=ok and self.router is not None and not self.draining,
            store=self.store_open,
            runtimes_detected=self.registry.detected,
            image=self.manifest is not None,
            available_runtimes=available,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """Start the supervisor tree; on exit every sandbox is destroyed (shielded)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        try:
            async with self._supervised():
                yield self
        finally:
            # The actors are gone and reported their last states: write them, then close.
            with trio.CancelScope(shield=True):
                await self.recorder.flush()
            self.store_open = False
            await self.store.close()
            # The sandboxes are gone (or kept, and then their groups keep it): the gateway's
            # own cgroup goes too, rather than one per data directory piling up on the host.
            SandboxCgroups(self.config.cgroup_parent or "sandstorm").remove_parent()

    @asynccontextmanager
    async def _supervised(self) -> AsyncIterator[Gateway]:
        await self.catalog.open()
        self.manifest = load_manifest(self.data_dir, self.config.image)
        if self.manifest is None:
            log.warning("image %r is not built: run `sandstorm image build`", self.config.image)
        # The agent's and the shim's binaries, compiled once per source (sandstorm.native).
        await trio.to_thread.run_sync(prepare_agent)
        await trio.to_thread.run_sync(prepare_shim)
        await self.registry.detect_all()
        for info in self.registry.infos():
            log.info("runtime %s: %s", info.name, "available" if info.available else info.reason)
        router = Router(
            self.config,
            self.registry,
            self.catalog,
            image_rootfs(self.data_dir, self.config.image),
            {lang.name for lang in self.languages()},
            store=self.store,
            recorder=self.recorder,
            metrics=self.metrics,
        )
        self.metrics.watch(
            lambda: ((a.state, a.params.runtime_name) for a in router.sandboxes.values()),
            lambda: router.open_streams,
            lambda: self.draining,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self.recorder.run)
            await nursery.start(router.run)
            # Sandboxes an earlier gateway left (crash, or kept at shutdown) are taken over;
            # the rest of its records are failed, and everything it held that no live sandbox
            # owns is reaped — all before the first request is served.
            await self._take_over(router)
            await self.reap(router)
            await router.start_pool()
            self.store_open = True
            self.router = router
            nursery.start_soon(self._reap_forever, router)
            try:
                yield self
            finally:
                self.router = None
                if self.config.on_shutdown == "keep":
                    router.detach_all()  # the next gateway takes them over
                nursery.cancel_scope.cancel()

    async def _take_over(self, router: Router) -> list[str]:
        started = trio.current_time()
        records = await self.store.call(Store.unfinished_sandboxes)
        surviving: set[tuple[str, str]] = set()
        for name, driver in self.registry.drivers.items():
            detection = self.registry.detections.get(name)
            if records and detection is not None and detection.available:
                surviving |= {(name, sid) for sid in await driver.surviving()}
        taken: list[str] = []

        async def take(record: SandboxRecord) -> None:
            try:
                await router.take_over(record)
            except Exception as exc:
                log.warning("sandbox %s could not be taken over: %s", record.id, exc)
            else:
                taken.append(record.id)

        async with trio.open_nursery() as nursery:
            for record in records:
                if (record.runtime, record.id) in surviving:
                    nursery.start_soon(take, record)
        lost = await self.store.call(
            Store.fail_unfinished,
            "the gateway restarted and the sandbox was no longer running",
            keep=taken,
        )
        if records:
            log.info(
                "took over %d sandboxes of an earlier gateway in %.0f ms; %d were gone",
                len(taken),
                (trio.current_time() - started) * 1000,
                len(lost),
            )
        return taken

    async def drain(self) -> None:
        """Shut down gently (SIGTERM): refuse new sandboxes and execs (503), give running execs
        ``shutdown_grace_s`` to finish (less if :meth:`cut_grace` is called), then destroy every
        sandbox (``on_shutdown = "destroy"``) while clients can still read the results. With
        "keep" the sandboxes are left as they are; the actors detach when ``running()`` exits."""
        self.draining = True
        router = self.router
        if router is None:
            return
        router.draining = True
        grace = self.config.shutdown_grace_s
        log.info("draining: new work is refused, running execs get %.1fs", grace)
        with trio.move_on_after(grace) as self._grace:
            await router.wait_execs()
        self._grace = None
        running = sum(r.running for a in router.sandboxes.values() for r in a.execs.values())
        if running:
            log.warning("grace period over with %d execs still running", running)
        if self.config.on_shutdown == "destroy":
            await router.destroy_all()

    def cut_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()

    async def reap(self, router: Router) -> list[str]:
        """Free every resource held for a sandbox the router does not know."""
        released: list[str] = []
        for name, driver in self.registry.drivers.items():
            detection = self.registry.detections.get(name)
            if detection is None or not detection.available:
                continue
            try:
                orphans = await driver.list_orphans(router.live_ids)
            except Exception as exc:
                # A runtime too slow or broken to list its sandboxes must not stop the gateway
                # (nor the other runtimes' reaping): the next pass tries again.
                log.warning("reaper: cannot list %s's sandboxes: %s", name, exc)
                continue
            for orphan in orphans:
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
    hc = hypercorn_config(config.host, config.port, config.max_client_frame_bytes)
    async with gateway.running(), trio.open_nursery() as nursery:
        app = create_app(gateway)
        drain, stop_http, http_stopped = trio.Event(), trio.Event(), trio.Event()
        if handle_signals:
            nursery.start_soon(_wait_for_signals, gateway, drain)

        async def http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve_http(
                    app, hc, stop_http, config.write_timeout_s, task_status=task_status
                )
            finally:
                http_stopped.set()

        binds = await nursery.start(http)
        log.info("sandstorm %s serving on %s", __version__, ", ".join(binds))
        task_status.started(binds)
        await drain.wait()
        # HTTP stays up through the drain: waiting clients get their results, and new work
        # gets a clear 503 instead of a refused connection.
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
                log.info("received %s: draining (send it again to skip the grace period)", name)
                drain.set()
            else:
                log.warning("received %s again: ending the grace period now", name)
                gateway.cut_grace()
