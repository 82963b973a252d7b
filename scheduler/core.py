"""The Scheduler: pure decisions, events in, effects out.

``Scheduler(limits, inventory)``; ``dispatch(event, now) -> list[Effect]``;
``next_deadline() -> float | None``; ``snapshot() -> SchedulerSnapshot``. One task owns it (no
locks); ``now`` is the supervisor's monotonic clock in seconds. The protocol (events, effects,
ordering duties of the caller) is described in ``scheduler/events.py``.

State the scheduler owns: the waiting requests (FIFO per model, ``max_queue`` counts them all,
also those waiting for a slot on a loaded model), the granted requests per runner, each runner's
state (loading -> ready -> [expiring] -> stopping -> gone), the memory ledger (what every runner
holds per GPU and on the host, plus stopped runners whose memory has not been seen to come back)
and the idle deadlines.

Decisions on every event (``_pump``):

1. Reservations of stopped runners not seen back expire after ``Limits.reclaim_timeout``.
2. Models with waiting requests are served in the order of their next requests' ranks; a
   model never waits for another model's load (no head-of-line blocking across models). A
   request's rank is (its class - one per ``Limits.priority_aging`` seconds waited, arrival):
   by class, FIFO within a class, and a low request never starves. For each model, its
   requests in rank order:
   2a. its current runner is compatible (``needs_reload`` false): grant free slots in order;
       wait while it loads or while all slots are busy;
   2b. its runner is ready but incompatible (options changed): the runner becomes ``expiring``
       (no new grants; stops once idle) and a new runner is loaded for the head request;
   2c. no runner: place a new one (``placement.place``) if a loaded-model slot and memory are
       free; two requests for one model share a load; loads of different models run at once;
   2d. otherwise choose eviction victims (idle first: those of a lower class than the head,
       then soonest deadline, then least recently used; then busy ones by shortest
       keep-alive; extra replicas before all others) until the model would fit once they are
       gone; busy victims become ``expiring``, nobody is killed with requests in flight.
       When nothing else is loaded, partial offload is allowed; when even that cannot fit the
       host, the waiting requests fail with Ollama's system-memory message.
       A model waiting for evictions *claims* what it will take: models after it in the pass
       may still use loaded runners but may not start loads that take that memory or slot,
       nor evict on top of it (so a big model is not starved by a stream of small ones).
       Pinned runners (``ModelPolicy.pinned``) are never victims: "alone" means beside the
       pins only, and a load that cannot fit beside them fails with a message naming them.
3. Idle runners past their keep-alive deadline, and idle ``expiring`` runners, are stopped
   (after step 2, so a request that arrives at the deadline still uses the runner).
4. Load failures: out of memory -> one retry (lower an automatic num_ctx tier and/or evict all
   other runners first, then load alone); otherwise the requests waiting for that load fail
   with its reason. Requests with other options keep waiting and load anew.
5. Crash-loop backoff: a model whose load failed (step 4's final failure) is not loaded again
   with compatible options before ``retry_at`` = start of the failed load + ``load_backoff *
   2**(n-1)`` (capped at ``load_backoff_max``; n = failures in a row). Requests for it that
   would need that load fail at once with the failure's reason (no retry storm; a client
   retrying in a loop costs one load per backoff period). A successful load resets it; a
   failure long after the last one (past ``retry_at + load_backoff_max``) counts from 1 again.
   A load that took longer than its backoff (a hung load killed at the stall timeout) may
   be retried by the next request at once.

6. Replicas: a model waiting with every slot of its runners busy, whose next request has
   waited ``Limits.replica_after`` and whose policy allows more runners, gets another one
   (``StartRunner.replica``) on free memory only - a GPU its runners do not use first, never by
   eviction, never on what an earlier model claimed. Grants go to the least busy of its runners
   with a free slot. Extra replicas expire after ``Limits.replica_keep_alive`` idle and are the
   first eviction victims; when the primary goes, the oldest replica takes its place.

Memory accounting ("trust the smaller number"): usable on a GPU for a new runner is
``min(measured free, total - reserved) - OLLAMA_GPU_OVERHEAD - backend minimum`` where
``reserved`` sums our runners' placements there (actual figures once RunnerReady reports them)
and stopped runners still reclaiming. Host RAM uses the same rule: ``min(host.free, host.total -
our CPU reservations)``. MemAvailable may or may not already exclude what our runners hold (mmap'd
weights are page cache and look available), so neither number alone is right and the smaller one
never double-counts in our favour.

Length: over 900 lines: the whole decision procedure of one pure object (numbered decisions,
its invariants and snapshot) reads best in one file.
"""

from __future__ import annotations

import collections
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from .estimate import (
    auto_batch,
    effective_num_ctx,
    estimate,
    is_out_of_memory,
    lower_ctx_tier,
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
from .placement import Room, place, usable_memory
from .types import (
    DEFAULT_POLICY,
    Estimate,
    GpuView,
    Inventory,
    Limits,
    ModelFacts,
    ModelPolicy,
    Placement,
    Priority,
    RequestState,
    RequestView,
    RunnerOptions,
    RunnerState,
    RunnerView,
    SchedulerSnapshot,
)

_OLDEST = operator.attrgetter("oldest")  # a waiting model's oldest request's seq

_MMAP_HOST_MARGIN = 8_000_000_000  # Ollama's host-pressure margin: max(8 GB, total / 10)
_ALL: Literal["all"] = "all"  # a claim on everything: the model must load alone
Claim = Placement | Literal["all"] | None  # what a blocked model waits for (None: nothing fits)
_DRAIN_SAMPLES = 32  # grants remembered for the drain rate
RETRY_AFTER_UNKNOWN = 5.0  # s: Retry-After when nothing has drained yet
RETRY_AFTER_MAX = 600.0


@dataclass(slots=True, eq=False)
class _Req:
    req_id: int
    model_key: str
    facts: ModelFacts
    options: RunnerOptions
    keep_alive: float | None
    policy: ModelPolicy
    priority: int  # its class (Priority): 0 high, 1 normal, 2 low
    seq: int  # arrival order
    arrived: float
    runner_id: str | None = None  # set once granted
    granted_at: float = 0.0


@dataclass(slots=True, eq=False)
class _Waiting:
    """The requests waiting for one model, FIFO, and the retry state of its next load."""

    key: str
    policy: ModelPolicy  # of its latest request
    reqs: dict[int, _Req] = field(default_factory=dict)  # all of them, in arrival order
    oldest: int = 0  # the seq of the first of ``reqs`` (kept as they come and go)
    # the same requests by class (Priority): FIFO within each
    classes: tuple[dict[int, _Req], ...] = field(default_factory=lambda: ({}, {}, {}))
    oom_retried: bool = False
    ctx_override: int | None = None
    evict_all: bool = False
    blocked_at: int = -1  # ledger version at which the head could not be placed
    claim: Claim = None  # what it waits for then: a Placement, or _ALL
    compat: tuple[_Runner, _Req, bool] | None = None  # (runner, head, compatible): _serve's cache


@dataclass(slots=True, eq=False)
class _Runner:
    id: str
    model_key: str
    facts: ModelFacts
    options: RunnerOptions  # effective launch options
    placement: Placement
    parallel: int
    keep_alive: float
    started_at: float
    state: RunnerState = RunnerState.LOADING  # never EXPIRING: that is ``expiring``
    expiring: bool = False
    in_flight: set[int] = field(default_factory=set)
    deadline: float | None = None
    pid: int | None = None
    ready_at: float | None = None
    last_used: float = 0.0
    oom_retried: bool = False  # this runner is the one retry after an out-of-memory load
    stop_reason: StopReason = StopReason.EXPIRED  # of a retired runner, once idle
    idle_reason: StopReason = StopReason.EXPIRED  # of a stop at its idle deadline
    n_ctx: int = 0  # per slot as the runner reported it (0 = not reported)
    policy: ModelPolicy = DEFAULT_POLICY
    replica: bool = False  # an extra runner of its model (decision 6)

    @property
    def pinned(self) -> bool:
        """Its policy pins the model: its primary runner (not the extra replicas) stays."""
        return self.policy.pinned and not self.replica


@dataclass(slots=True, eq=False)
class _Backoff:
    """The recent load failures of one model (decision 5)."""

    options: RunnerOptions  # launch options of the failed load
    facts: ModelFacts
    failures: int  # in a row
    retry_at: float  # no compatible load starts before this
    reason: str


@dataclass(slots=True, eq=False)
class _Reclaim:
    """A stopped runner's GPU memory, reserved until seen back or ``deadline``."""

    runner_id: str
    gpu_bytes: dict[str, int]
    baseline: dict[str, int]  # measured free per GPU when it stopped
    deadline: float


def _kv_type(s: str) -> str:
    s = s.lower()
    return "f16" if s == "" else s


def _allowed(rooms: list[Room], policy: ModelPolicy) -> list[Room]:
    """The GPU rooms a model's policy lets it use (all when it names none)."""
    if not policy.gpus:
        return rooms
    return [(g, u) for g, u in rooms if g.id in policy.gpus]


def _served_by(options: RunnerOptions, facts: ModelFacts) -> Callable[[_Req], bool]:
    """Whether a waiting request would be served by a runner launched with ``options``."""
    return lambda req: not needs_reload(options, facts, req.options)


def needs_reload(runner_opts: RunnerOptions, facts: ModelFacts, req: RunnerOptions) -> bool:
    """Whether a runner launched with ``runner_opts`` cannot serve a request with ``req``.

    Ollama's rules (§2.5): the request's num_ctx is clamped to n_ctx_train; automatic num_ctx on
    both sides is never a difference, nor automatic num_batch on both sides, nor an unset use_mmap
    against an automatically resolved one, nor ``num_gpu < 0`` (automatic).
    """
    if not (runner_opts.num_ctx_auto and req.num_ctx_auto):
        if effective_num_ctx(facts, req.num_ctx) != runner_opts.num_ctx:
            return True
    if not (runner_opts.num_batch_auto and req.num_batch_auto):
        if req.num_batch != runner_opts.num_batch:
            return True
    if not (req.use_mmap is None and runner_opts.use_mmap_auto):
        if req.use_mmap != runner_opts.use_mmap:
            return True
    if req.num_gpu >= 0 and req.num_gpu != runner_opts.num_gpu:
        return True
    if req.main_gpu != runner_opts.main_gpu:
        return True
    if req.num_thread != runner_opts.num_thread:
        return True
    if _kv_type(req.kv_cache_type) != _kv_type(runner_opts.kv_cache_type):
        return True
    return req.flash_attention != runner_opts.flash_attention


class Scheduler:
    """Owns the queue, in-flight counts, runner states, the memory ledger and idle deadlines.

    Pure and synchronous: no I/O, no clock. Not thread-safe: one task owns it.
    """

    def __init__(self, limits: Limits, inventory: Inventory) -> None:
        self.limits = limits
        self.inventory = inventory
        self.max_loaded = limits.max_loaded or 3 * max(len(inventory.gpus), 1)
        self._runners: dict[str, _Runner] = {}
        self._current: dict[str, _Runner] = {}  # model_key -> runner taking new grants
        self._extra: dict[str, list[_Runner]] = {}  # model_key -> its replicas taking grants
        self._replica_due: dict[str, float] = {}  # model_key -> when a replica may start
        self._reclaims: dict[str, _Reclaim] = {}
        self._waiting: dict[str, _Waiting] = {}  # models with waiting requests
        self._requests: dict[int, _Req] = {}  # waiting and granted
        self._backoff: dict[str, _Backoff] = {}  # model_key -> its recent load failures
        self._n_waiting = 0
        self._n_class = [0, 0, 0]  # waiting requests per class (Priority)
        self._seq = 0
        # Grant times, for the queue's drain rate (Reject.retry_after): all and per model.
        self._drained: collections.deque[float] = collections.deque(maxlen=_DRAIN_SAMPLES)
        self._drained_by: dict[str, collections.deque[float]] = {}
        self._next_id = 0
        self._version = 0  # bumps on any change to runners, memory or inventory
        self._rooms_cache: tuple[int, list[Room], int] | None = None
        self._closing = False
        # Claims of the current decision pass (see _add_claim).
        self._claimed = False
        self._claim_all = False
        self._claim_slots = 0
        self._claim_gpu: dict[str, int] = {}
        self._claim_host = 0

    # -- public API --------------------------------------------------------------------------

    def dispatch(self, event: Event, now: float) -> list[Effect]:
        """Apply ``event`` at time ``now``; return the effects to execute, in order."""
        out: list[Effect] = []
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"not a scheduler event: {event!r}")
        handler(self, event, now, out)
        self._pump(now, out)
        return out

    def next_deadline(self) -> float | None:
        """Earliest time at which a ``Tick`` would change something (None = nothing pending)."""
        best = math.inf
        for r in self._runners.values():
            if r.deadline is not None and r.deadline < best:
                best = r.deadline
        for c in self._reclaims.values():
            if c.deadline < best:
                best = c.deadline
        for t in self._replica_due.values():
            if t < best:
                best = t
        return None if best == math.inf else best

    @property
    def _metal(self) -> bool:
        """Every GPU of the inventory is Apple's (Metal): the estimator's unified-memory rule."""
        gpus = self.inventory.gpus
        return bool(gpus) and all(g.library == "metal" for g in gpus)

    def snapshot(self) -> SchedulerSnapshot:
        """An immutable view of the current state (for /api/ps, metrics and logs)."""
        waiting = {k: len(w.reqs) for k, w in self._waiting.items()}
        classes = {
            k: (len(w.classes[0]), len(w.classes[1]), len(w.classes[2]))
            for k, w in self._waiting.items()
        }
        runners = []
        for r in self._runners.values():
            state = r.state
            if state == RunnerState.READY and r.expiring:
                state = RunnerState.EXPIRING
            runners.append(
                RunnerView(
                    runner_id=r.id,
                    model_key=r.model_key,
                    state=state,
                    options=r.options,
                    placement=r.placement,
                    parallel=r.parallel,
                    in_flight=len(r.in_flight),
                    queued=waiting.get(r.model_key, 0)
                    if self._current.get(r.model_key) is r
                    else 0,
                    keep_alive=r.keep_alive,
                    deadline=r.deadline,
                    pid=r.pid,
                    context_length=r.n_ctx or r.options.num_ctx,
                    started_at=r.started_at,
                    ready_at=r.ready_at,
                    last_used=r.last_used,
                    pinned=r.pinned,
                    replica=r.replica,
                )
            )
        reserved = self._reserved_gpu()
        rooms, _ = self._rooms()
        gpus = tuple(
            GpuView(
                id=g.id,
                name=g.name,
                library=g.library,
                total=g.total,
                free=g.free,
                reserved=reserved.get(g.id, 0),
                usable=usable,
            )
            for g, usable in rooms
        )
        host = self.inventory.host
        return SchedulerSnapshot(
            runners=tuple(runners),
            waiting=waiting,
            waiting_classes=classes,
            queued=self._n_waiting,
            in_flight=sum(len(r.in_flight) for r in self._runners.values()),
            max_loaded=self.max_loaded,
            gpus=gpus,
            host_total=host.total,
            host_free=host.free,
            host_reserved=self._reserved_host(),
            reclaiming=tuple(self._reclaims),
        )

    def requests(self, now: float) -> list[RequestView]:
        """Every request waiting or granted: waiting ones by model in service order, each
        model's in the order they will be served, then the running ones."""
        out: list[RequestView] = []
        waiting = list(self._waiting.values())
        waiting.sort(key=lambda w: self._rank(self._head(w, now), now))
        for w in waiting:
            r = self._current.get(w.key)
            state = (
                RequestState.LOADING
                if r is not None and r.state == RunnerState.LOADING
                else RequestState.WAITING
            )
            for i, q in enumerate(sorted(w.reqs.values(), key=lambda q: self._rank(q, now))):
                out.append(
                    RequestView(
                        req_id=q.req_id,
                        model_key=q.model_key,
                        state=state,
                        priority=Priority(q.priority),
                        position=i + 1,
                        waited=now - q.arrived,
                    )
                )
        for q in self._requests.values():
            if q.runner_id is not None:
                out.append(
                    RequestView(
                        req_id=q.req_id,
                        model_key=q.model_key,
                        state=RequestState.RUNNING,
                        priority=Priority(q.priority),
                        position=0,
                        waited=q.granted_at - q.arrived,
                        runner_id=q.runner_id,
                    )
                )
        return out

    # -- event handlers ----------------------------------------------------------------------

    def _on_arrived(self, ev: RequestArrived, now: float, out: list[Effect]) -> None:
        if ev.req_id in self._requests:
            return  # duplicate id: the first one stands
        if self._closing:
            out.append(Reject(ev.req_id, Refusal.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE))
            return
        policy = ev.policy or DEFAULT_POLICY
        self._seq += 1
        req = _Req(
            ev.req_id,
            ev.model_key,
            ev.facts,
            ev.options,
            ev.keep_alive,
            policy,
            int(policy.priority if ev.priority is None else ev.priority),
            self._seq,
            now,
        )
        # Fast path: nobody waits for this model and its runner has a free compatible slot.
        if ev.model_key not in self._waiting:
            r = self._current.get(ev.model_key)
            if (
                r is not None
                and (r.state == RunnerState.READY or ev.model_key in self._extra)
                and not needs_reload(r.options, r.facts, ev.options)
            ):
                r = self._free_runner(r)
                if r is not None:
                    self._requests[req.req_id] = req
                    self._grant(req, r, now, out)
                    return
        w = self._waiting.get(ev.model_key)
        if self._n_waiting >= self.limits.max_queue:
            retry = self._retry_after(self._drained, self._n_waiting, now)
            out.append(Reject(ev.req_id, Refusal.QUEUE_FULL, QUEUE_FULL_MESSAGE, retry))
            return
        if policy.max_queue and w is not None and len(w.reqs) >= policy.max_queue:
            retry = self._retry_after(self._drained_by.get(w.key), len(w.reqs), now)
            out.append(Reject(ev.req_id, Refusal.QUEUE_FULL, QUEUE_FULL_MESSAGE, retry))
            return
        if w is None:
            w = self._waiting[ev.model_key] = _Waiting(ev.model_key, policy)
        w.policy = policy
        if not w.reqs:
            w.oldest = req.seq
        w.reqs[req.req_id] = req
        w.classes[req.priority][req.req_id] = req
        self._n_class[req.priority] += 1
        self._requests[req.req_id] = req
        self._n_waiting += 1

    def _on_cancelled(self, ev: RequestCancelled, now: float, out: list[Effect]) -> None:
        req = self._requests.get(ev.req_id)
        if req is None:
            return
        if req.runner_id is not None:
            self._release(req, now)
        else:
            self._unqueue(req)

    def _on_finished(self, ev: RequestFinished, now: float, out: list[Effect]) -> None:
        req = self._requests.get(ev.req_id)
        if req is not None and req.runner_id is not None:
            self._release(req, now)

    def _on_ready(self, ev: RunnerReady, now: float, out: list[Effect]) -> None:
        r = self._runners.get(ev.runner_id)
        if r is None or r.state != RunnerState.LOADING:
            return
        r.state = RunnerState.READY
        r.pid = ev.pid
        r.ready_at = now
        r.last_used = now
        # The reported context is shown by /api/ps; reuse decisions keep comparing with the
        # launch value (a runner that pads or clamps its context must not cause reload thrash).
        r.n_ctx = ev.n_ctx
        if ev.gpu_bytes is not None or ev.cpu_bytes is not None:
            p = r.placement
            gpus = list(p.gpus)
            sizes = list(p.gpu_bytes)
            if ev.gpu_bytes is not None:
                sizes = [ev.gpu_bytes.get(g, 0) for g in gpus]
                for g, b in ev.gpu_bytes.items():
                    if g not in gpus and b > 0:
                        gpus.append(g)
                        sizes.append(b)
            r.placement = msgspec.structs.replace(
                p,
                gpus=tuple(gpus),
                gpu_bytes=tuple(sizes),
                cpu_bytes=p.cpu_bytes if ev.cpu_bytes is None else ev.cpu_bytes,
            )
        self._backoff.pop(r.model_key, None)
        w = self._waiting.get(r.model_key)
        if w is not None and self._current.get(r.model_key) is r:
            w.oom_retried = False
            w.ctx_override = None
            w.evict_all = False
        self._set_idle_deadline(r, now)
        self._version += 1

    def _on_load_failed(self, ev: RunnerLoadFailed, now: float, out: list[Effect]) -> None:
        r = self._runners.get(ev.runner_id)
        if r is None:
            return
        if r.state != RunnerState.LOADING:
            self._on_exited(RunnerExited(ev.runner_id, ev.reason), now, out)
            return
        self._load_failed(r, ev.reason, ev.oom or is_out_of_memory(ev.reason), now, out)

    def _on_exited(self, ev: RunnerExited, now: float, out: list[Effect]) -> None:
        r = self._runners.get(ev.runner_id)
        if r is None:
            return
        if r.state == RunnerState.LOADING:
            self._load_failed(r, ev.reason, is_out_of_memory(ev.reason), now, out)
            return
        self._gone(r, now, out, ev.reason)

    def _on_stopped(self, ev: RunnerStopped, now: float, out: list[Effect]) -> None:
        r = self._runners.get(ev.runner_id)
        if r is None:
            return
        if r.state == RunnerState.LOADING:
            self._load_failed(r, "runner stopped while loading", False, now, out, backoff=False)
            return
        self._gone(r, now, out, "runner stopped")

    def _on_runtime_oom(self, ev: RunnerOutOfMemory, now: float, out: list[Effect]) -> None:
        for r in self._runners.values():
            if r.pinned:
                continue
            r.keep_alive = 0.0
            r.idle_reason = StopReason.OUT_OF_MEMORY
            if r.state == RunnerState.READY and not r.in_flight:
                r.deadline = now

    def _on_inventory(self, ev: InventoryUpdated, now: float, out: list[Effect]) -> None:
        self.inventory = ev.inventory
        free = {g.id: g.free for g in ev.inventory.gpus}
        total = {g.id: g.total for g in ev.inventory.gpus}
        for rid in list(self._reclaims):
            c = self._reclaims.pop(rid)
            held = self._reserved_gpu()  # everything else we hold
            # Back when free rose by 3/4 of what it held (Ollama's rule), or when free already
            # covers all but our other reservations (the probe never saw the memory in use).
            back = all(
                g not in free
                or free[g] - c.baseline.get(g, free[g]) >= 0.75 * b
                or free[g] >= total[g] - held.get(g, 0)
                for g, b in c.gpu_bytes.items()
            )
            if not back:
                self._reclaims[rid] = c
                # The baseline only moves down (memory seen still in use).
                for g in c.gpu_bytes:
                    if g in free:
                        c.baseline[g] = min(c.baseline.get(g, free[g]), free[g])
        self._version += 1

    def _on_unload(self, ev: UnloadRequested, now: float, out: list[Effect]) -> None:
        r = self._current.get(ev.model_key)
        if r is None or r.pinned:
            return
        for x in list(self._extra.get(ev.model_key, ())):
            self._retire(x, StopReason.UNLOAD, now, out)
        if r.state == RunnerState.LOADING:
            r.keep_alive = 0.0  # serve whoever waits for this load, then unload when idle
            r.idle_reason = StopReason.UNLOAD
        else:
            self._retire(r, StopReason.UNLOAD, now, out)

    def _on_policy(self, ev: PolicyChanged, now: float, out: list[Effect]) -> None:
        """A reloaded policy: pins and defaults of runners and waiting models follow it at once
        (a runner's slots and GPUs stay as launched until it is loaded again)."""
        for r in self._runners.values():
            new = ev.policies.get(r.model_key, DEFAULT_POLICY)
            was = r.pinned
            r.policy = new
            if new.pinned and not was:
                r.keep_alive = math.inf
                r.deadline = None
            elif was and not new.pinned:
                r.keep_alive = self.limits.default_keep_alive
                self._set_idle_deadline(r, now)
        for key, w in self._waiting.items():
            w.policy = ev.policies.get(key, DEFAULT_POLICY)
        self._version += 1

    def _on_tick(self, ev: Tick, now: float, out: list[Effect]) -> None:
        pass

    def _on_shutdown(self, ev: Shutdown, now: float, out: list[Effect]) -> None:
        self._closing = True
        for w in list(self._waiting.values()):
            for req in list(w.reqs.values()):
                self._unqueue(req)
                out.append(Fail(req.req_id, Refusal.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE))
        for r in list(self._runners.values()):
            if r.state != RunnerState.STOPPING:
                self._retire(r, StopReason.SHUTDOWN, now, out)

    # -- helpers: requests -------------------------------------------------------------------

    def _unqueue(self, req: _Req) -> None:
        w = self._waiting.get(req.model_key)
        if w is not None and req.req_id in w.reqs:
            w.blocked_at = -1
            self._unqueue_for_grant(w, req)
        self._requests.pop(req.req_id, None)

    def _grant(self, req: _Req, r: _Runner, now: float, out: list[Effect]) -> None:
        req.runner_id = r.id
        req.granted_at = now
        self._drained.append(now)
        d = self._drained_by.get(req.model_key)
        if d is None:
            d = self._drained_by[req.model_key] = collections.deque(maxlen=_DRAIN_SAMPLES)
        d.append(now)
        r.in_flight.add(req.req_id)
        r.deadline = None
        r.last_used = now
        if req.keep_alive is not None and not r.expiring and not r.pinned:
            r.keep_alive = req.keep_alive  # sticky for later requests without keep_alive
            r.idle_reason = StopReason.EXPIRED
        out.append(Grant(req.req_id, r.id))

    def _release(self, req: _Req, now: float) -> None:
        self._requests.pop(req.req_id, None)
        r = self._runners.get(req.runner_id or "")
        if r is None:
            return
        r.in_flight.discard(req.req_id)
        r.last_used = now
        self._set_idle_deadline(r, now)

    def _set_idle_deadline(self, r: _Runner, now: float) -> None:
        if r.state == RunnerState.READY and not r.in_flight:
            keep = r.keep_alive
            if r.replica:  # 6. extra replicas expire first
                keep = min(keep, self.limits.replica_keep_alive)
            r.deadline = None if math.isinf(keep) else now + max(0.0, keep)

    def _fail_waiters(
        self,
        key: str,
        pred: Callable[[_Req], bool],
        reason: Refusal,
        message: str,
        out: list[Effect],
    ) -> None:
        w = self._waiting.get(key)
        if w is None:
            return
        for req in list(w.reqs.values()):
            if pred(req):
                self._unqueue(req)
                out.append(Fail(req.req_id, reason, message))

    # -- helpers: runners --------------------------------------------------------------------

    def _stop(self, r: _Runner, reason: StopReason, out: list[Effect]) -> None:
        assert not r.in_flight, "never stop a runner with requests in flight"
        r.state = RunnerState.STOPPING
        r.expiring = True
        r.deadline = None
        self._unlist(r)
        self._version += 1
        out.append(StopRunner(r.id, reason))

    def _retire(self, r: _Runner, reason: StopReason, now: float, out: list[Effect]) -> None:
        """Take ``r`` out of service: no new grants; stopped now if idle, else once idle."""
        if not r.expiring:
            r.expiring = True
            r.stop_reason = reason
        self._unlist(r)
        self._version += 1
        if r.state == RunnerState.READY and not r.in_flight:
            self._stop(r, reason, out)

    def _unlist(self, r: _Runner) -> None:
        """``r`` takes no new grants any more: off its model's runners (when it was the
        primary, the oldest replica takes its place)."""
        key = r.model_key
        extras = self._extra.get(key)
        if self._current.get(key) is r:
            del self._current[key]
            if extras:
                nxt = extras.pop(0)
                nxt.replica = False
                self._current[key] = nxt
        elif extras and r in extras:
            extras.remove(r)
        if extras is not None and not extras:
            del self._extra[key]

    def _free_runner(self, r: _Runner) -> _Runner | None:
        """A runner of ``r``'s model with a free slot (ready, taking grants): the primary ``r``
        first, else the least busy of its replicas; None when all are full."""
        if r.state == RunnerState.READY and len(r.in_flight) < r.parallel:
            return r
        best = None
        for x in self._extra.get(r.model_key, ()):
            if x.state == RunnerState.READY and len(x.in_flight) < x.parallel:
                if best is None or len(x.in_flight) < len(best.in_flight):
                    best = x
        return best

    def _gone(self, r: _Runner, now: float, out: list[Effect], reason: str) -> None:
        """The process of ``r`` is gone: abort its requests, keep its GPU memory reclaiming."""
        for rid in sorted(r.in_flight):
            self._requests.pop(rid, None)
            out.append(Abort(rid, r.id, reason))
        r.in_flight.clear()
        del self._runners[r.id]
        self._unlist(r)
        used = r.placement.held
        if used:
            free = {g.id: g.free for g in self.inventory.gpus}
            self._reclaims[r.id] = _Reclaim(
                r.id, used, {g: free.get(g, 0) for g in used}, now + self.limits.reclaim_timeout
            )
        self._version += 1

    def _load_failed(
        self,
        r: _Runner,
        reason: str,
        oom: bool,
        now: float,
        out: list[Effect],
        backoff: bool = True,
    ) -> None:
        key = r.model_key
        was_current = self._current.get(key) is r
        self._gone(r, now, out, reason)
        if r.replica:
            return  # the model is served by its other runners; no backoff for it
        w = self._waiting.get(key)
        if w is not None and was_current and oom and not r.oom_retried:
            if self._oom_retry(w, r):
                return
        if backoff:
            self._note_failure(r, reason)
        if w is None or not was_current:
            return
        self._fail_waiters(
            key,
            _served_by(r.options, r.facts),
            Refusal.LOAD_FAILED,
            reason,
            out,
        )

    def _oom_retry(self, w: _Waiting, r: _Runner) -> bool:
        """4. Plan the one retry after an out-of-memory load; False when there is nothing to
        change (no lower context tier, nothing else to evict): then the load has failed."""
        others = any(not o.pinned for o in self._runners.values())
        w.oom_retried = True
        lower = lower_ctx_tier(r.options.num_ctx) if r.options.num_ctx_auto else None
        if lower is not None:
            w.ctx_override = lower
            w.evict_all = others
            return True
        if others:
            w.evict_all = True
            return True
        return False

    def _note_failure(self, r: _Runner, reason: str) -> None:
        """5. Remember a failed load of ``r``'s model: when it may be tried again."""
        lim = self.limits
        if lim.load_backoff <= 0:
            return
        prev = self._backoff.get(r.model_key)
        n = 1
        if prev is not None and r.started_at <= prev.retry_at + lim.load_backoff_max:
            n = prev.failures + 1
        delay = min(lim.load_backoff * 2 ** min(n - 1, 30), lim.load_backoff_max)
        self._backoff[r.model_key] = _Backoff(r.options, r.facts, n, r.started_at + delay, reason)

    # -- memory ------------------------------------------------------------------------------

    def _reserved_gpu(self, exclude_pending: bool = False) -> dict[str, int]:
        res: dict[str, int] = {}
        for r in self._runners.values():
            if exclude_pending and r.expiring:
                continue
            for g, b in zip(r.placement.gpus, r.placement.gpu_bytes, strict=True):
                res[g] = res.get(g, 0) + b
        if not exclude_pending:
            for c in self._reclaims.values():
                for g, b in c.gpu_bytes.items():
                    res[g] = res.get(g, 0) + b
        return res

    def _reserved_host(self, exclude_pending: bool = False) -> int:
        return sum(
            r.placement.cpu_bytes
            for r in self._runners.values()
            if not (exclude_pending and r.expiring)
        )

    def _rooms(self, prospective: bool = False) -> tuple[list[Room], int]:
        """(GPU rooms, host usable) now, or once expiring/stopping/reclaiming memory is back."""
        if (
            not prospective
            and self._rooms_cache is not None
            and self._rooms_cache[0] == self._version
        ):
            return self._rooms_cache[1], self._rooms_cache[2]
        reserved = self._reserved_gpu()
        overhead = self.limits.gpu_overhead
        host = self.inventory.host
        host_res = self._reserved_host()
        if prospective:
            kept = self._reserved_gpu(exclude_pending=True)
            kept_host = self._reserved_host(exclude_pending=True)
            rooms = []
            for g in self.inventory.gpus:
                pend = reserved.get(g.id, 0) - kept.get(g.id, 0)
                free = min(g.total, g.free + pend)
                rooms.append(
                    (g, max(0, min(free, g.total - kept.get(g.id, 0)) - overhead - g.min_overhead))
                )
            host_usable = max(0, min(host.free + host_res - kept_host, host.total - kept_host))
        else:
            rooms = [
                (g, usable_memory(g, reserved.get(g.id, 0), overhead)) for g in self.inventory.gpus
            ]
            host_usable = max(0, min(host.free, host.total - host_res))
        for i, (g, u) in enumerate(rooms):
            if g.integrated:  # shares system RAM: never more than the host has left
                rooms[i] = (g, min(u, host_usable))
        if not prospective:
            self._rooms_cache = (self._version, rooms, host_usable)
        return rooms, host_usable

    # -- the decision pass -------------------------------------------------------------------

    def _pump(self, now: float, out: list[Effect]) -> None:
        self._claimed = False
        self._claim_all = False
        self._claim_slots = 0
        self._claim_gpu = {}
        self._claim_host = 0
        # 1. Reservations that were never seen back.
        for rid in [rid for rid, c in self._reclaims.items() if c.deadline <= now]:
            del self._reclaims[rid]
            self._version += 1
        # 2. Serve waiting models by the rank of their next requests.
        if self._replica_due:
            self._replica_due.clear()
        if self._waiting:
            waiting = list(self._waiting.values())
            # one class waits (the usual case): every model's next request is its oldest
            fifo = not self._mixed()
            if len(waiting) > 1:
                # the model whose next request ranks first goes first; with one class that is
                # the oldest head (not the model that started waiting first: the request that
                # made it wait may be gone, cancelled or granted, while a later one waits)
                if fifo:
                    waiting.sort(key=_OLDEST)
                else:
                    waiting.sort(key=lambda w: self._rank(self._head(w, now), now))
            for w in waiting:
                if w.reqs:
                    self._serve(w, now, out, fifo)
        # 3. Idle runners: expiring ones, and those past their keep-alive deadline.
        for r in list(self._runners.values()):
            if r.state == RunnerState.READY and not r.in_flight:
                if r.expiring:
                    self._stop(r, r.stop_reason, out)
                elif r.deadline is not None and r.deadline <= now:
                    self._stop(r, r.idle_reason, out)

    def _serve(self, w: _Waiting, now: float, out: list[Effect], fifo: bool) -> None:
        """Decision 2 for one model (``fifo``: one class waits, see _pump)."""
        key = w.key
        while w.reqs:
            # what _head would answer; inline, as a call per waiting model per dispatch is a
            # measurable share of one (bench/scheduler: ~7 % of p50 with 12 models waiting)
            head = next(iter(w.reqs.values())) if fifo else self._head(w, now)
            r = self._current.get(key)
            if r is not None:
                if w.compat is None or w.compat[0] is not r or w.compat[1] is not head:
                    w.compat = (r, head, not needs_reload(r.options, r.facts, head.options))
                if w.compat[2]:
                    # 2a. Compatible: grant a free slot (primary or replica, the least busy),
                    # or wait (loading / all slots busy) - and maybe start a replica (6).
                    free = r
                    if r.state != RunnerState.READY or len(r.in_flight) >= r.parallel:
                        if not self._extra and w.policy.replicas == 1:
                            return  # the usual case: one runner, busy or loading
                        other = self._free_runner(r)
                        if other is None:
                            if r.state == RunnerState.READY and w.policy.replicas > 1:
                                self._replica(w, r, head, now, out)
                            return
                        free = other
                    self._unqueue_for_grant(w, head)
                    self._grant(head, free, now, out)
                    continue
                if r.state == RunnerState.LOADING:
                    return  # let the load finish; the head reloads it afterwards
                # 2b. Options changed: retire the loaded runner (and its replicas), load anew.
                for x in list(self._extra.get(key, ())):
                    self._retire(x, StopReason.RELOAD, now, out)
                self._retire(r, StopReason.RELOAD, now, out)
            b = self._backoff.get(key)
            if (
                b is not None
                and now < b.retry_at
                and not needs_reload(b.options, b.facts, head.options)
            ):
                # 5. Backing off: what would need this load fails now with the last reason.
                self._fail_waiters(
                    key,
                    _served_by(b.options, b.facts),
                    Refusal.LOAD_FAILED,
                    b.reason,
                    out,
                )
                continue
            # 2c./2d.
            self._load(w, head, now, out)
            return

    def _rank(self, req: _Req, now: float) -> tuple[int, int]:
        """Service order: (class after aging, arrival). A request moves up one class per
        ``Limits.priority_aging`` seconds waited, so a low one never starves: it ranks with
        the high ones after 2 x aging and then goes before every later arrival."""
        aged = int((now - req.arrived) // self.limits.priority_aging)
        return (max(0, req.priority - aged), req.seq)

    def _mixed(self) -> bool:
        """Requests of more than one class wait."""
        n = self._n_class
        return (n[0] > 0) + (n[1] > 0) + (n[2] > 0) > 1

    def _head(self, w: _Waiting, now: float) -> _Req:
        """The request of ``w`` served next: the best rank among its classes' oldest."""
        high, normal, low = w.classes
        if not high and not low:
            return next(iter(normal.values()))  # one class (the usual case): FIFO
        best: _Req | None = None
        rank: tuple[int, int] | None = None
        for d in w.classes:
            if d:
                q = next(iter(d.values()))
                k = self._rank(q, now)
                if rank is None or k < rank:
                    best, rank = q, k
        assert best is not None, "a waiting model has requests"
        return best

    def _retry_after(
        self, grants: collections.deque[float] | None, queued: int, now: float
    ) -> float:
        """Seconds until ``queued`` waiting requests have drained at the recent grant rate."""
        if not grants:
            return RETRY_AFTER_UNKNOWN
        span = now - grants[0]
        if span <= 0:
            return 1.0
        rate = len(grants) / span
        return float(min(RETRY_AFTER_MAX, max(1.0, math.ceil(queued / rate))))

    def _unqueue_for_grant(self, w: _Waiting, req: _Req) -> None:
        """``req`` leaves ``w``'s queue (granted, or by :meth:`_unqueue`)."""
        del w.reqs[req.req_id]
        del w.classes[req.priority][req.req_id]
        self._n_class[req.priority] -= 1
        self._n_waiting -= 1
        if not w.reqs:
            del self._waiting[w.key]
        elif req.seq == w.oldest:
            w.oldest = next(iter(w.reqs.values())).seq

    def _launch_options(self, w: _Waiting, head: _Req) -> RunnerOptions:
        opts = head.options
        num_ctx = effective_num_ctx(head.facts, opts.num_ctx)
        if w.ctx_override is not None and opts.num_ctx_auto:
            num_ctx = min(num_ctx, w.ctx_override)
        return msgspec.structs.replace(opts, num_ctx=num_ctx)

    def _load(self, w: _Waiting, head: _Req, now: float, out: list[Effect]) -> None:
        if self._closing:
            return
        if w.blocked_at == self._version:
            self._add_claim(w.claim)  # nothing changed since it was last found blocked
            return
        key = w.key
        policy = w.policy
        others = list(self._runners.values())
        if w.evict_all:
            # 4. Retry after an out-of-memory load: alone (beside pins), once everything else
            # is gone.
            if self._reclaims or any(not o.pinned for o in others):
                for o in others:
                    if o.state == RunnerState.READY and not o.expiring and not o.pinned:
                        self._retire(o, StopReason.EVICTED, now, out)
                self._block(w, _ALL)
                return
            w.evict_all = False
        opts = self._launch_options(w, head)
        facts = head.facts
        parallel = parallel_for(facts, self.limits.num_parallel, policy.num_parallel)
        est = estimate(facts, opts, parallel, metal=self._metal)
        # "Alone": nothing else holds memory but pinned runners, which never leave.
        alone = not self._reclaims and all(o.pinned and not o.expiring for o in others)
        if self._claim_all:
            return  # an earlier model waits to load alone: no new loads before it
        slot_free = len(self._runners) + self._claim_slots < self.max_loaded
        reason = "slot"
        if slot_free:
            rooms, host_usable = self._claimed_rooms()
            rooms = _allowed(rooms, policy)
            p = place(
                est, opts, rooms, host_usable, spread=self.limits.sched_spread, allow_partial=alone
            )
            if isinstance(p, Placement):
                self._start(w, head, opts, est, p, parallel, rooms, now, out)
                return
            if alone:
                # Nothing else holds memory (but pins, which stay): it will never fit.
                message = p.message or "model does not fit in available memory"
                if others:
                    names = ", ".join(sorted({o.policy.name or o.model_key for o in others}))
                    message += f" beside the pinned models ({names}), which are never evicted"
                self._fail_waiters(
                    key, lambda q: q.options == head.options, Refusal.TOO_LARGE, message, out
                )
                return
            reason = p.reason
        if self._claimed:
            # An earlier model is already waiting for memory; do not evict on top of it.
            return
        # 2d. Evict until the model would fit once the victims are gone.
        # Victim order: idle before busy; idle by soonest deadline then least recently used,
        # busy by shortest keep-alive then least recently used. Short of GPU memory, runners
        # holding GPU memory go first (a CPU runner only goes so the model can load alone).
        cls = self._rank(head, now)[0]
        victims = sorted(
            (o for o in others if o.state == RunnerState.READY and not o.expiring and not o.pinned),
            key=lambda o: (
                reason == "gpu" and not o.placement.gpus,
                bool(o.in_flight),
                not o.replica,  # extra replicas first
                o.policy.priority <= cls,  # idle models of a lower class than the head first
                o.keep_alive
                if o.in_flight
                else (o.deadline if o.deadline is not None else math.inf),
                o.last_used,
            ),
        )
        prospect = self._prospect(est, opts, policy)
        for v in victims:
            if prospect is not None:
                break
            self._retire(v, StopReason.EVICTED, now, out)
            prospect = self._prospect(est, opts, policy)
        if prospect is None and alone and others:
            # Every loaded-model slot is held by a pin: waiting changes nothing.
            names = ", ".join(sorted({o.policy.name or o.model_key for o in others}))
            message = (
                f"all {self.max_loaded} loaded-model slots are held by pinned models "
                f"({names}), which are never evicted"
            )
            self._fail_waiters(
                key, lambda q: q.options == head.options, Refusal.TOO_LARGE, message, out
            )
            return
        self._block(w, prospect if isinstance(prospect, Placement) else _ALL)

    def _replica(self, w: _Waiting, r: _Runner, head: _Req, now: float, out: list[Effect]) -> None:
        """6. Another runner of a busy model: when its next request has waited
        ``Limits.replica_after`` and its policy allows more runners, one starts where memory
        and a loaded-model slot are free now - on a GPU its other runners do not use first;
        never by evicting anything, never on what an earlier waiting model claimed."""
        key = w.key
        extras = self._extra.get(key, [])
        if 1 + len(extras) >= w.policy.replicas or any(
            x.state != RunnerState.READY for x in extras
        ):
            return
        due = head.arrived + self.limits.replica_after
        if now < due:
            self._replica_due[key] = due
            return
        if self._closing or self._claim_all:
            return
        if len(self._runners) + self._claim_slots >= self.max_loaded:
            return
        est = estimate(r.facts, r.options, r.parallel, metal=self._metal)
        rooms, host_usable = self._claimed_rooms()
        rooms = _allowed(rooms, w.policy)
        used = {g for x in (r, *extras) for g in x.placement.gpus}
        p = None
        other = [(g, u) for g, u in rooms if g.id not in used]
        if other:
            p = place(est, r.options, other, host_usable, spread=self.limits.sched_spread)
        if not isinstance(p, Placement):
            p = place(est, r.options, rooms, host_usable, spread=self.limits.sched_spread)
        if not isinstance(p, Placement) or (r.placement.gpus and not p.gpus):
            return  # no room now (a GPU model's replica on the CPU would only slow it down)
        self._next_id += 1
        x = _Runner(
            id=f"r{self._next_id}",
            model_key=key,
            facts=r.facts,
            options=r.options,
            placement=p,
            parallel=r.parallel,
            keep_alive=r.keep_alive,
            started_at=now,
            last_used=now,
            policy=w.policy,
            replica=True,
        )
        self._runners[x.id] = x
        self._extra.setdefault(key, []).append(x)
        self._version += 1
        out.append(StartRunner(x.id, key, r.options, p, r.parallel, replica=True))

    def _block(self, w: _Waiting, claim: Claim) -> None:
        """``w`` waits for memory or a slot: remember what it will take, and claim it now."""
        w.blocked_at = self._version
        w.claim = claim
        self._add_claim(claim)

    def _add_claim(self, claim: Claim) -> None:
        """Later models in this pass may not start loads that take what ``claim`` waits for."""
        self._claimed = True
        if not isinstance(claim, Placement):  # _ALL, or None (nothing would fit)
            self._claim_all = True
            return
        self._claim_slots += 1
        for g, b in zip(claim.gpus, claim.gpu_bytes, strict=True):
            self._claim_gpu[g] = self._claim_gpu.get(g, 0) + b
        self._claim_host += claim.cpu_bytes

    def _claimed_rooms(self) -> tuple[list[Room], int]:
        """Current rooms minus what earlier blocked models will take beyond pending releases."""
        rooms, host_usable = self._rooms()
        if not self._claimed:
            return rooms, host_usable
        reserved = self._reserved_gpu()
        kept = self._reserved_gpu(exclude_pending=True)
        adjusted = []
        for g, u in rooms:
            pending = reserved.get(g.id, 0) - kept.get(g.id, 0)
            adjusted.append((g, max(0, u - max(0, self._claim_gpu.get(g.id, 0) - pending))))
        pending_host = self._reserved_host() - self._reserved_host(exclude_pending=True)
        return adjusted, max(0, host_usable - max(0, self._claim_host - pending_host))

    def _prospect(self, est: Estimate, opts: RunnerOptions, policy: ModelPolicy) -> Claim:
        """Where the model would go once every expiring runner and reclaim is gone:
        a Placement, ``_ALL`` (only alone, everything else must go) or None (not even then)."""
        pending = sum(1 for r in self._runners.values() if r.expiring)
        if len(self._runners) - pending >= self.max_loaded:
            return None
        rooms, host_usable = self._rooms(prospective=True)
        p = place(est, opts, _allowed(rooms, policy), host_usable, spread=self.limits.sched_spread)
        if isinstance(p, Placement):
            return p
        # Only a partial offload (or nothing) remains: that needs the machine to itself (but
        # for pins), so the claim is on everything - another load in between would break it.
        return _ALL if all(r.expiring or r.pinned for r in self._runners.values()) else None

    def _start(
        self,
        w: _Waiting,
        head: _Req,
        opts: RunnerOptions,
        est: Estimate,
        p: Placement,
        parallel: int,
        rooms: list[Room],
        now: float,
        out: list[Effect],
    ) -> None:
        # Automatic batch (§3.1.2) for completion models; keep the larger one only if it fits.
        if opts.num_batch_auto and not head.facts.is_embedding_model:
            used = {g for g in p.gpus}
            available = sum(u for g, u in rooms if g.id in used)
            predicted = p.vram if p.gpus else 0
            gpus = {g.id: g for g in self.inventory.gpus}
            cuda = [gpus[g] for g in p.gpus if g in gpus and gpus[g].library == "cuda"]
            batch = auto_batch(
                est.ctx_total,
                predicted,
                available,
                flash_attention_off=opts.flash_attention is False and bool(cuda),
                cuda_small_gpu=any((g.free or g.total) <= 8 * (1 << 30) for g in cuda),
            )
            if batch != opts.num_batch:
                other = msgspec.structs.replace(opts, num_batch=batch)
                est2 = estimate(head.facts, other, parallel, metal=p.library == "metal")
                rooms_now, host_usable = self._rooms()
                p2 = place(
                    est2,
                    other,
                    _allowed(rooms_now, w.policy),
                    host_usable,
                    spread=self.limits.sched_spread,
                    allow_partial=not self._reclaims
                    and all(o.pinned and not o.expiring for o in self._runners.values()),
                )
                if isinstance(p2, Placement) and p2.n_gpu_layers >= p.n_gpu_layers:
                    opts, p = other, p2
        opts = self._resolve_mmap(opts, head.facts, p, est)
        self._next_id += 1
        rid = f"r{self._next_id}"
        keep_alive = (
            math.inf
            if w.policy.pinned
            else head.keep_alive
            if head.keep_alive is not None
            else self.limits.default_keep_alive
        )
        r = _Runner(
            id=rid,
            model_key=w.key,
            facts=head.facts,
            options=opts,
            placement=p,
            parallel=parallel,
            keep_alive=keep_alive,
            started_at=now,
            last_used=now,
            oom_retried=w.oom_retried,
            policy=w.policy,
        )
        self._runners[rid] = r
        self._current[w.key] = r
        self._version += 1
        out.append(StartRunner(rid, w.key, opts, p, parallel))

    def _resolve_mmap(
        self, opts: RunnerOptions, facts: ModelFacts, p: Placement, est: Estimate
    ) -> RunnerOptions:
        """Ollama's use_mmap default when unset (§3.1.3); explicit values always win."""
        if opts.use_mmap is not None:
            return opts
        use = True
        if not p.gpus:
            use = False  # "cpu"
        elif p.library == "metal" and p.n_gpu_layers < est.block_count + 1:
            use = False  # "metal_partial_offload"
        else:
            gpus = {g.id: g for g in self.inventory.gpus}
            host = self.inventory.host
            if (
                all(not gpus[g].integrated for g in p.gpus if g in gpus)
                and p.n_gpu_layers >= est.block_count + 1
            ):
                mapped = sum(
                    r.facts.file_size for r in self._runners.values() if r.options.use_mmap
                )
                margin = max(_MMAP_HOST_MARGIN, host.total // 10)
                if host.free < facts.file_size + mapped + margin:
                    use = False  # host pressure
        return msgspec.structs.replace(opts, use_mmap=use, use_mmap_auto=True)


_HANDLERS: dict[type[Event], Callable[[Scheduler, Any, float, list[Effect]], None]] = {
    RequestArrived: Scheduler._on_arrived,
    RequestCancelled: Scheduler._on_cancelled,
    RequestFinished: Scheduler._on_finished,
    RunnerReady: Scheduler._on_ready,
    RunnerLoadFailed: Scheduler._on_load_failed,
    RunnerExited: Scheduler._on_exited,
    RunnerStopped: Scheduler._on_stopped,
    RunnerOutOfMemory: Scheduler._on_runtime_oom,
    InventoryUpdated: Scheduler._on_inventory,
    UnloadRequested: Scheduler._on_unload,
    PolicyChanged: Scheduler._on_policy,
    Tick: Scheduler._on_tick,
    Shutdown: Scheduler._on_shutdown,
}
