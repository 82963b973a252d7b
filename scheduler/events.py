"""Events into the scheduler and effects out of it (frozen msgspec Structs).

The supervisor is the only caller: it turns what happens (an HTTP request, a runner process
becoming ready, exiting, a probe reading, the clock) into an :data:`Event`, calls
``Scheduler.dispatch(event, now)`` and executes the returned :data:`Effect` list **in order**.

Identifiers: ``req_id`` is chosen by the supervisor (unique, hashable: an int); ``runner_id`` is
chosen by the scheduler (``"r1"``, ``"r2"``, ... never reused) and first appears in
:class:`StartRunner`; ``model_key`` is the GGUF blob path (two names sharing a blob share a runner).

Events
------
* :class:`RequestArrived` - a request wants a runner slot.
* :class:`RequestCancelled` - the client went away; queued -> removed at once, counted nowhere,
  no effect. Granted -> same as :class:`RequestFinished`.
* :class:`RequestFinished` - the slot of a granted request is released (send exactly once, in a
  ``finally``). Unknown / already finished ids are ignored.
* :class:`RunnerReady` - the runner finished loading (``n_ctx`` per slot as the runner reports it,
  actual memory per GPU id / CPU when known - it replaces the estimate in the ledger).
* :class:`RunnerLoadFailed` - the load failed; ``reason`` is the runner's last error line;
  ``oom`` (or an out-of-memory text in ``reason``) allows one retry.
* :class:`RunnerExited` - the process ended without being asked (crash). Also valid while loading.
* :class:`RunnerStopped` - the process ended after :class:`StopRunner` (reaped). Its memory stays
  reserved until an :class:`InventoryUpdated` shows it came back or ``Limits.reclaim_timeout``.
* :class:`RunnerOutOfMemory` - a granted request failed with an out-of-memory error at run time:
  every runner unloads as soon as it is idle (Ollama's runtime-OOM rule; StopRunner reason
  ``out of memory``, unless a later request sets a keep-alive again).
* :class:`InventoryUpdated` - new probe readings (GPU free memory, host memory).
* :class:`UnloadRequested` - ``keep_alive: 0`` with an empty prompt / ``corral stop`` (a pinned
  model stays).
* :class:`PolicyChanged` - the policy file was reloaded (pins, keep-alive of loaded runners).
* :class:`Tick` - nothing happened but time passed (call at ``next_deadline()``).
* :class:`Shutdown` - fail every queued request, stop idle runners, grant nothing more.

Effects
-------
* :class:`StartRunner` - spawn a runner with these effective options and placement; answer later
  with RunnerReady / RunnerLoadFailed / RunnerExited.
* :class:`StopRunner` - stop it (SIGTERM, bounded wait, SIGKILL); answer with RunnerStopped.
  ``reason``: a :class:`StopReason`.
  Never emitted for a runner with requests in flight.
* :class:`Grant` - the request may use the runner (one slot, in flight until RequestFinished).
* :class:`Reject` - the request never waited: queue full (or shutting down) (:class:`Refusal`);
  a full queue says in ``retry_after`` when it will have drained at the rate requests recently
  left it.
* :class:`Fail` - the request waited and cannot be served (load failure, model too big,
  shutting down) (:class:`Refusal`).
* :class:`Abort` - a *granted* request lost its runner (crash); end its response with ``message``.
  Not an outcome: the request already had its Grant; it needs no RequestFinished afterwards.

Every request gets exactly one of Grant / Reject / Fail, unless cancelled while queued.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from .types import Inventory, ModelFacts, ModelPolicy, Placement, Priority, RunnerOptions

QUEUE_FULL_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
SHUTTING_DOWN_MESSAGE = "server shutting down"


class StopReason(StrEnum):
    """Why the scheduler stops a runner (:class:`StopRunner`); the supervisor logs each as a
    decision and counts it (``corral_runner_unloads``)."""

    EXPIRED = "expired"  # idle past its keep-alive
    EVICTED = "evicted"  # its memory or loaded-model slot is needed (decision 2d)
    RELOAD = "reload"  # its model is wanted with other launch options (decision 2b)
    UNLOAD = "unload"  # keep_alive 0 with an empty prompt / `corral stop`
    OUT_OF_MEMORY = "out of memory"  # idle after a request ran out of memory (RunnerOutOfMemory)
    SHUTDOWN = "shutdown"


class Refusal(StrEnum):
    """Why a request is not served (:class:`Reject`, :class:`Fail`). No HTTP here: the daemon
    turns each into a domain error and its API gives that a status."""

    QUEUE_FULL = "queue full"  # max_queue requests already wait: try later
    SHUTTING_DOWN = "shutting down"  # try later (another replica)
    LOAD_FAILED = "load failed"  # the model's load failed, or is backing off after failures
    TOO_LARGE = "too large"  # the model does not fit this machine even alone


# -- events ----------------------------------------------------------------------------------


class RequestArrived(msgspec.Struct, frozen=True):
    req_id: int
    model_key: str
    facts: ModelFacts
    options: RunnerOptions
    keep_alive: float | None = None  # seconds; None = sticky runner value / default; inf = never
    embedding: bool = False  # an embedding request (informational; parallel follows the model)
    policy: ModelPolicy | None = None  # the operator's policy for the model; None = defaults
    priority: Priority | None = None  # its class; None = the policy's


class RequestCancelled(msgspec.Struct, frozen=True):
    req_id: int


class RequestFinished(msgspec.Struct, frozen=True):
    req_id: int


class RunnerReady(msgspec.Struct, frozen=True):
    runner_id: str
    pid: int | None = None
    n_ctx: int = 0  # per slot, as the runner reports it; 0 = as launched
    gpu_bytes: dict[str, int] | None = None  # actual use by Gpu.id; None = keep the estimate
    cpu_bytes: int | None = None


class RunnerLoadFailed(msgspec.Struct, frozen=True):
    runner_id: str
    reason: str
    oom: bool = False


class RunnerExited(msgspec.Struct, frozen=True):
    runner_id: str
    reason: str


class RunnerStopped(msgspec.Struct, frozen=True):
    runner_id: str


class RunnerOutOfMemory(msgspec.Struct, frozen=True):
    runner_id: str


class InventoryUpdated(msgspec.Struct, frozen=True):
    inventory: Inventory


class UnloadRequested(msgspec.Struct, frozen=True):
    model_key: str


class PolicyChanged(msgspec.Struct, frozen=True):
    """The policy file was reloaded: the new policy of every model key the daemon knows."""

    policies: dict[str, ModelPolicy]


class Tick(msgspec.Struct, frozen=True):
    pass


class Shutdown(msgspec.Struct, frozen=True):
    pass


Event = (
    RequestArrived
    | RequestCancelled
    | RequestFinished
    | RunnerReady
    | RunnerLoadFailed
    | RunnerExited
    | RunnerStopped
    | RunnerOutOfMemory
    | InventoryUpdated
    | UnloadRequested
    | PolicyChanged
    | Tick
    | Shutdown
)


# -- effects ---------------------------------------------------------------------------------


class StartRunner(msgspec.Struct, frozen=True):
    runner_id: str
    model_key: str
    options: RunnerOptions
    placement: Placement
    parallel: int
    replica: bool = False  # another runner of a model that has one (its policy's replicas)


class StopRunner(msgspec.Struct, frozen=True):
    runner_id: str
    reason: StopReason


class Grant(msgspec.Struct, frozen=True):
    req_id: int
    runner_id: str


class Reject(msgspec.Struct, frozen=True):
    req_id: int
    reason: Refusal
    message: str
    retry_after: float | None = None  # s until the queue has drained at its recent rate


class Fail(msgspec.Struct, frozen=True):
    req_id: int
    reason: Refusal
    message: str


class Abort(msgspec.Struct, frozen=True):
    req_id: int
    runner_id: str
    message: str


Effect = StartRunner | StopRunner | Grant | Reject | Fail | Abort
