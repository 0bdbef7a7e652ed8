"""Admission control: every sandbox, warm pool ones included, reserves a slot of
``max_sandboxes`` and its host memory from ``memory_budget`` before it boots, and gives them back
when its actor ends.

Each check and its reservation happen with no await in between, so concurrent creates can never
overshoot either bound. A request that finds no room first lets what can give way make some
(:attr:`Admission.make_room`: the warm pool's idle sandboxes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from sandstorm.config import Config
from sandstorm.errors import AtCapacity
from sandstorm.metrics import Metrics


class Admission:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        # What each admitted sandbox reserved (host memory, bytes), by id.
        self._reservations: dict[str, int] = {}
        self._reserved_memory = 0
        # Called with (sandboxes, bytes) a request lacks: frees what it can of that room, at
        # once (None: nothing gives way).
        self.make_room: Callable[[int, int], None] | None = None

    def admit(self, sandbox_id: str, memory: int, *, evict: bool = True) -> None:
        """Reserve room for one sandbox, or raise AtCapacity. What gives way is freed first
        (``evict``) when that is enough."""
        if evict and self.make_room is not None and not self.room_for(1, memory):
            self.make_room(1, memory)
        if len(self._reservations) >= self.config.max_sandboxes:
            self.metrics.refused("at_capacity", "sandbox")
            raise AtCapacity(
                f"the gateway already runs {len(self._reservations)} sandboxes (max_sandboxes)",
                retry_after=1,
            )
        if self._reserved_memory + memory > self.config.memory_budget:
            self._refuse_memory()
        self._reservations[sandbox_id] = memory
        self._reserved_memory += memory

    def take_over(self, sandbox_id: str, memory: int) -> None:
        """Count a sandbox an earlier gateway left running: it exists, so it is never refused."""
        self._reservations[sandbox_id] = memory
        self._reserved_memory += memory

    def room_for(self, count: int, memory: int) -> bool:
        return (
            len(self._reservations) + count <= self.config.max_sandboxes
            and self._reserved_memory + memory <= self.config.memory_budget
        )

    def shortfall(self, count: int, memory: int) -> tuple[int, int]:
        """How many sandboxes and bytes over the bounds ``count`` more sandboxes of ``memory``
        bytes in all would be (zero or less: they fit)."""
        return (
            len(self._reservations) + count - self.config.max_sandboxes,
            self._reserved_memory + memory - self.config.memory_budget,
        )

    def resize(self, sandbox_id: str, memory: int) -> None:
        """Change an admitted sandbox's reservation (a pool sandbox claimed with another
        memory limit); AtCapacity when the budget cannot take the difference."""
        delta = memory - self._reservations[sandbox_id]
        if delta > 0 and self._reserved_memory + delta > self.config.memory_budget:
            if self.make_room is not None:
                self.make_room(0, delta)
            if self._reserved_memory + delta > self.config.memory_budget:
                self._refuse_memory()
        self._reservations[sandbox_id] = memory
        self._reserved_memory += delta

    def release(self, sandbox_id: str) -> None:
        """Give a sandbox's reservation back (idempotent: an evicted pool sandbox gave it back
        when it was evicted, before its teardown ended)."""
        self._reserved_memory -= self._reservations.pop(sandbox_id, 0)

    def _refuse_memory(self) -> NoReturn:
        self.metrics.refused("at_capacity", "sandbox")
        raise AtCapacity(
            "the gateway's memory budget is fully reserved", retry_after=1,
            reserved=self._reserved_memory, budget=self.config.memory_budget,
        )  # fmt: skip
