"""The root supervisor: configuration, runtime registry, store, snapshot catalog, router and
reaper. ``sandstorm.main`` runs Hypercorn beside it.

The actor tree lives here, not in the ASGI app: Hypercorn runs in a sibling task and the web layer
only translates HTTP to actor calls, so shutdown drains sandboxes deliberately (the router's
teardown is shielded) instead of losing them with the app.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from sandstorm import __version__
from sandstorm.actors.recorder import Recorder
from sandstorm.actors.router import Router
from sandstorm.agent import prepare_agent
from sandstorm.api.types import LanguageInfo, Ready
from sandstorm.api.validation import LANGUAGE_COMMANDS
from sandstorm.config import Config
from sandstorm.images import ImageManifest, image_rootfs, load_manifest
from sandstorm.metrics import Metrics
from sandstorm.runtimes.cgroups import SandboxCgroups
from sandstorm.runtimes.registry import RuntimeRegistry, build_registry
from sandstorm.shim import prepare_shim
from sandstorm.store import AsyncStore
from sandstorm.store.snapshots import SnapshotCatalog
from sandstorm.supervisor.lock import hold_data_dir
from sandstorm.supervisor.reaper import reap, reap_forever
from sandstorm.supervisor.takeover import take_over

log = logging.getLogger(__name__)


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
        # What happens to the sandboxes when this gateway stops: on_shutdown, or on_interrupt
        # once interrupted() was called.
        self.on_shutdown = config.on_shutdown
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
        """Start the supervisor tree; on exit every sandbox is destroyed (shielded). Raises
        :exc:`~sandstorm.supervisor.lock.DataDirInUse` before touching anything when another
        gateway holds the data directory."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with hold_data_dir(self.data_dir):
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
                # The sandboxes are gone (or kept, and then their groups keep it): the
                # gateway's own cgroup goes too, rather than one per data directory piling up.
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
            await take_over(self.store, self.registry, router)
            await reap(self.registry, router.live_ids)
            await router.start_pool()
            self.store_open = True
            self.router = router
            nursery.start_soon(reap_forever, self.registry, router.live_ids)
            try:
                yield self
            finally:
                self.router = None
                if self.on_shutdown == "keep":
                    router.detach_all()  # the next gateway takes them over
                nursery.cancel_scope.cancel()

    async def drain(self) -> None:
        """Shut down gently (SIGTERM): refuse new sandboxes and execs (503), give running execs
        ``shutdown_grace_s`` to finish (less if :meth:`cut_grace` is called), then destroy every
        sandbox when ``on_shutdown`` (see :meth:`interrupted`) is "destroy", while clients can
        still read the results. With "keep" the sandboxes are left as they are; the actors
        detach when ``running()`` exits."""
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
        if self.on_shutdown == "destroy":
            await router.destroy_all()

    def interrupted(self) -> None:
        """The stop is an interrupt (SIGINT): the sandboxes follow ``on_interrupt``, not
        ``on_shutdown``. Call before :meth:`drain`."""
        self.on_shutdown = self.config.on_interrupt

    def cut_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
