"""The Scheduler: pure decisions, events in, effects out (implementation in progress)."""

from __future__ import annotations

from .events import Effect, Event
from .types import Inventory, Limits, SchedulerSnapshot


class Scheduler:
    """Owns the queue, in-flight counts, runner states, the memory ledger and idle deadlines.

    ``dispatch(event, now) -> list[Effect]``; ``next_deadline() -> float | None``;
    ``snapshot() -> SchedulerSnapshot``. Not thread-safe: one task owns it.
    """

    def __init__(self, limits: Limits, inventory: Inventory) -> None:
        self.limits = limits
        self.inventory = inventory

    def dispatch(self, event: Event, now: float) -> list[Effect]:
        raise NotImplementedError

    def next_deadline(self) -> float | None:
        raise NotImplementedError

    def snapshot(self) -> SchedulerSnapshot:
        raise NotImplementedError
