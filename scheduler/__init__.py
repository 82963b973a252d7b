"""corral.scheduler: pure scheduling decisions (stdlib + msgspec only).

No asyncio, I/O, clock reads, environment or logging here: the daemon's supervisor feeds events
with the current time and executes the returned effects. See ``events`` (the protocol),
``types`` (the data), ``estimate`` (memory from GGUF facts), ``placement`` (GPU/CPU choice) and
``core`` (the :class:`Scheduler`).

Public API (stable; the daemon's supervisor is written against it):

* ``Scheduler(limits: Limits, inventory: Inventory)``
  - ``dispatch(event: Event, now: float) -> list[Effect]`` - execute the effects in order;
  - ``next_deadline() -> float | None`` - send a ``Tick`` then;
  - ``snapshot() -> SchedulerSnapshot`` - immutable view for /api/ps and metrics;
  - ``max_loaded`` - effective OLLAMA_MAX_LOADED_MODELS (auto resolved at construction).
* events: RequestArrived, RequestCancelled, RequestFinished, RunnerReady, RunnerLoadFailed,
  RunnerExited, RunnerStopped, RunnerOutOfMemory, InventoryUpdated, UnloadRequested,
  PolicyChanged, Tick, Shutdown; effects: StartRunner, StopRunner, Grant, Reject, Fail, Abort;
  their vocabularies StopReason and Refusal (``events`` module).
* data: Gpu, HostMemory, Inventory, ModelFacts, RunnerOptions, Estimate, Placement, NoFit,
  Limits, RunnerState, RunnerView, GpuView, SchedulerSnapshot, ModelPolicy, Priority and PRIORITIES
  (``types`` module).
* helpers: estimate(), place(), usable_memory(), needs_reload(), default_num_ctx(),
  effective_num_ctx(), parallel_for(), is_out_of_memory(), minimum_memory().
"""

from .core import Scheduler, needs_reload
from .estimate import (
    default_num_ctx,
    effective_num_ctx,
    estimate,
    is_out_of_memory,
    minimum_memory,
    parallel_for,
)
from .events import (
    QUEUE_FULL_MESSAGE,
    SHUTTING_DOWN_MESSAGE,
    Abort,
    Effect,
    Event,
    Fail,
    Grant,
    InventoryUpdated,
    PolicyChanged,
    Refusal,
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
    StopReason,
    StopRunner,
    Tick,
    UnloadRequested,
)
from .placement import place, usable_memory
from .types import (
    DEFAULT_POLICY,
    FOREVER,
    PRIORITIES,
    Estimate,
    Gpu,
    GpuView,
    HostMemory,
    Inventory,
    Limits,
    ModelFacts,
    ModelPolicy,
    NoFit,
    Placement,
    Priority,
    RequestState,
    RequestView,
    RunnerOptions,
    RunnerState,
    RunnerView,
    SchedulerSnapshot,
)

__all__ = [
    "FOREVER",
    "QUEUE_FULL_MESSAGE",
    "SHUTTING_DOWN_MESSAGE",
    "Abort",
    "Effect",
    "Estimate",
    "Event",
    "Fail",
    "Gpu",
    "GpuView",
    "Grant",
    "HostMemory",
    "Inventory",
    "InventoryUpdated",
    "Limits",
    "ModelFacts",
    "NoFit",
    "Placement",
    "Refusal",
    "Reject",
    "RequestArrived",
    "RequestCancelled",
    "RequestFinished",
    "RunnerExited",
    "RunnerLoadFailed",
    "RunnerOptions",
    "RunnerOutOfMemory",
    "RunnerReady",
    "RunnerStopped",
    "RunnerState",
    "RunnerView",
    "StopReason",
    "Scheduler",
    "SchedulerSnapshot",
    "Shutdown",
    "StartRunner",
    "StopRunner",
    "Tick",
    "UnloadRequested",
    "PolicyChanged",
    "ModelPolicy",
    "Priority",
    "PRIORITIES",
    "RequestState",
    "RequestView",
    "DEFAULT_POLICY",
    "default_num_ctx",
    "effective_num_ctx",
    "estimate",
    "is_out_of_memory",
    "minimum_memory",
    "needs_reload",
    "parallel_for",
    "place",
    "usable_memory",
]
