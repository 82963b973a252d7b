"""corral.scheduler: pure scheduling decisions (stdlib + msgspec only).

No asyncio, I/O, clock reads, environment or logging here: the daemon's supervisor feeds events
with the current time and executes the returned effects. See ``events`` (the protocol),
``types`` (the data), ``estimate`` (memory from GGUF facts), ``placement`` (GPU/CPU choice) and
``core`` (the :class:`Scheduler`).
"""

from .core import Scheduler
from .events import (
    QUEUE_FULL_MESSAGE,
    SHUTTING_DOWN_MESSAGE,
    Abort,
    Effect,
    Event,
    Fail,
    Grant,
    InventoryUpdated,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    RunnerExited,
    RunnerLoadFailed,
    RunnerOutOfMemory,
    RunnerReady,
    RunnerStopped,
    Shutdown,
    StartRunner,
    StopRunner,
    Tick,
    UnloadRequested,
)
from .types import (
    FOREVER,
    Estimate,
    Gpu,
    GpuView,
    HostMemory,
    Inventory,
    Limits,
    ModelFacts,
    NoFit,
    Placement,
    RunnerOptions,
    RunnerView,
    SchedulerSnapshot,
)

__all__ = [
    "FOREVER", "QUEUE_FULL_MESSAGE", "SHUTTING_DOWN_MESSAGE",
    "Abort", "Effect", "Estimate", "Event", "Fail", "Gpu", "GpuView", "Grant", "HostMemory",
    "Inventory", "InventoryUpdated", "Limits", "ModelFacts", "NoFit", "Placement", "Reject",
    "RequestArrived", "RequestCancelled", "RequestFinished", "RunnerExited", "RunnerLoadFailed",
    "RunnerOptions", "RunnerOutOfMemory", "RunnerReady", "RunnerStopped", "RunnerView",
    "Scheduler", "SchedulerSnapshot", "Shutdown", "StartRunner", "StopRunner", "Tick",
    "UnloadRequested",
]
