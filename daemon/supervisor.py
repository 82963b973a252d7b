"""The Supervisor: the asyncio shell around the pure Scheduler.

One owner task holds the :class:`~corral.scheduler.Scheduler` and an inbox of events (STYLE
rules 1-3). It is the only code that calls ``dispatch``; it executes the returned effects in
order and never blocks doing so: spawning and stopping runner processes happen in tasks that
post completion events (``RunnerReady``, ``RunnerLoadFailed``, ``RunnerStopped``...) back to
the inbox. The only timer is the one armed for ``scheduler.next_deadline()`` (a ``Tick``).

Used by the HTTP layer:

* ``lease = await sup.acquire(model, options, keep_alive, kind)`` (``options``: the request's
  ``params.RequestOptions``, already merged with the model's parameters) waits for a runner slot and
  raises a :class:`~corral.daemon.errors.CorralError` (``Busy``: queue full / shutting down,
  ``Failed``: load failure, ``InvalidRequest``/``NotFound``).
  Cancelling the awaiting task (client gone) withdraws the request: a queued request frees its
  queue place at once.
* ``async with lease:`` - leaving it releases the slot exactly once (also on exceptions and
  cancellation). ``lease.runner`` (a :class:`~corral.daemon.runner_client.RunnerClient`) talks
  to the runner. If the runner dies mid-request, the stream breaks; ``await
  lease.wait_failure()`` (or ``lease.failure_reason()``) gives the client-facing text with the
  runner's last stderr line (the client quotes it).
* ``await sup.unload(model)`` (keep_alive 0 with an empty prompt); ``sup.snapshot()`` with
  ``record``/``facts``/``gpu_name``/``now`` for /api/ps (rendered in ``api/ps.py``).
* ``await sup.start()`` / ``await sup.close()`` (shutdown: stop accepting, fail queued
  requests, let streams drain within ``drain_timeout``, stop runners in parallel, close the
  probe; the total stays under ``drain_timeout + stop_grace + 1`` s).

Test hooks: ``await sup.wait_processed()`` (every posted event dispatched),
``await sup.wait_until(predicate)`` (re-checked after every dispatch), ``sup.snapshot()``,
``sup.runner_process(runner_id)``.

Length: over 900 lines because the owner task, the effects it carries out, the leases and the
runner table are one state machine around one Scheduler (one task owns it, STYLE rule 2);
pure parts live elsewhere (``scheduler``, ``model_inputs``: model key, facts and load options,
``runners``, ``gpu``, ``api/ps``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec
import psutil
import structlog

from corral.daemon import engine_probe, gguf_info
from corral.daemon.config import Config
from corral.daemon.errors import (
    Busy,
    Cancelled,
    CorralError,
    Failed,
    InvalidRequest,
    model_not_found,
)
from corral.daemon.gpu import GpuProbe, SimulatedProbe, engine_verdict, make_probe
from corral.daemon.kvstats import KvCacheStats
from corral.daemon.metrics import Metrics
from corral.daemon.model_inputs import (
    ModelLike,
    facts_from_info,
    key_paths,
    model_key,
    projector_facts,
    runner_options,
)
from corral.daemon.models import default_model
from corral.daemon.params import RequestOptions
from corral.daemon.policy import ModelRule, Policy, PolicyError
from corral.daemon.policy import load as load_policy
from corral.daemon.runner_client import RunnerClient
from corral.daemon.runner_http import RunnerHTTP
from corral.daemon.runners import (
    RUNNER_ARGV,
    RunnerProcess,
    RunnerStartError,
    child_env,
    huge_pages_usable,
    wait_event,
)
from corral.daemon.ticket import CURRENT, Ticket
from corral.runner.protocol import (
    EngineProbe,
    FakeKnobs,
    KvCacheReport,
    KvCacheSpec,
    LaunchSpec,
    Ready,
)
from corral.scheduler import (
    SHUTTING_DOWN_MESSAGE,
    Abort,
    Effect,
    Event,
    Fail,
    Grant,
    Inventory,
    InventoryUpdated,
    Limits,
    ModelFacts,
    ModelPolicy,
    PolicyChanged,
    Priority,
    Refusal,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    RunnerExited,
    RunnerLoadFailed,
    RunnerOptions,
    RunnerOutOfMemory,
    RunnerReady,
    RunnerStopped,
    RunnerView,
    Scheduler,
    SchedulerSnapshot,
    Shutdown,
    StartRunner,
    StopReason,
    StopRunner,
    Tick,
    UnloadRequested,
)
from corral.scheduler.estimate import default_num_ctx, is_out_of_memory

log = structlog.get_logger(__name__)

REFRESH_INTERVAL = 0.25  # probe polling while stopped runners' memory is held
DEFAULT_STOP_GRACE = 5.0
DEFAULT_DRAIN_TIMEOUT = 3.0

Kind = Literal["completion", "embedding"]


def _scheduler_error(
    reason: Refusal, message: str, retry_after: float | None = None
) -> CorralError:
    """A scheduler Reject/Fail as a domain error (the api gives it its status): queue full and
    shutting down mean try later (Busy, with the queue's drain estimate when known), a load
    that failed or cannot fit is Failed."""
    if reason in (Refusal.QUEUE_FULL, Refusal.SHUTTING_DOWN):
        return Busy(message, retry_after)
    return Failed(message)


# how a refusal is counted in corral_rejected_requests (the other reasons are failures)
_REJECTED = {Refusal.QUEUE_FULL: "queue_full", Refusal.SHUTTING_DOWN: "shutting_down"}


STDERR_TAIL = 10  # stderr lines in a load failure / crash log line

# The scheduling decision a `starting runner` / `stopping runner` / `runner exited
# unexpectedly` log line names (docs/DESIGN.md "Decision log lines").
Decision = Literal["load", "evict", "expire", "reload", "unload", "shutdown", "oom_unload", "crash"]

# StopRunner reasons -> their decision (every StopReason has one: tests/daemon/test_supervisor.py)
DECISIONS: dict[StopReason, Decision] = {
    StopReason.EXPIRED: "expire",
    StopReason.EVICTED: "evict",
    StopReason.RELOAD: "reload",
    StopReason.UNLOAD: "unload",
    StopReason.SHUTDOWN: "shutdown",
    StopReason.OUT_OF_MEMORY: "oom_unload",
}


def _changed_options(old: RunnerOptions, new: RunnerOptions) -> dict[str, list[Any]]:
    """The launch options that differ: ``{name: [old, new]}``."""
    a, b = msgspec.structs.asdict(old), msgspec.structs.asdict(new)
    return {k: [a[k], b[k]] for k in a if a[k] != b[k]}


def _is_gpu_device(name: str) -> bool:
    n = name.upper()
    return not (n.startswith("CPU") or n.endswith("_HOST") or n == "BLAS")


# ----------------------------------------------------------------------------------------- Lease


class Lease:
    """One granted runner slot (a :class:`~corral.daemon.runner_client.RunnerLease`): talk to
    the runner through ``runner``; leave the ``async with`` block to release it (exactly once)."""

    def __init__(
        self,
        sup: Supervisor,
        req_id: int,
        runner_id: str,
        http: RunnerHTTP,
        n_ctx: int,
        load_duration: float,
        proc: RunnerProcess,
    ) -> None:
        self._sup = sup
        self.req_id = req_id
        self.runner_id = runner_id
        self.n_ctx = n_ctx  # per slot
        self.load_duration = load_duration  # seconds from acquire() to the grant
        self._proc = proc
        self.runner = RunnerClient(http, proc.requests, failure=self.wait_failure)
        self._released = False
        self._abort_message: str | None = None
        self.aborted = asyncio.Event()  # set when the runner was lost under this lease
        self.cancelled: str | None = None  # why, once DELETE /api/requests/{id} ended it

    @property
    def released(self) -> bool:
        return self._released

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give the slot back (idempotent; never blocks)."""
        if not self._released:
            self._released = True
            self._sup._release(self)

    def _abort(self, message: str) -> None:
        self._abort_message = message
        self.aborted.set()

    def cancel(self, message: str) -> None:
        """End this request on purpose: its slot is free at once, and the runner call in
        progress ends (:meth:`RunnerClient.cancel`), so the client's stream ends with
        ``message``."""
        if self.cancelled is not None:
            return
        self.cancelled = message
        self.release()
        self.runner.cancel(message)

    def out_of_memory(self) -> None:
        """The request failed with an out-of-memory error at run time: the supervisor is told
        (:meth:`Supervisor.report_out_of_memory`, Ollama's runtime-OOM rule)."""
        self._sup.report_out_of_memory(self)

    def failure_reason(self) -> str | None:
        """Why the runner behind this lease is gone (its last stderr line included), else None."""
        if self._abort_message is not None:
            return self._abort_message
        p = self._proc
        return p.exit_reason() if p.returncode is not None else None

    async def wait_failure(self, timeout: float = 2.0) -> str | None:
        """After a broken runner stream: wait (bounded) until the runner's exit is known.

        Returns the client-facing reason, or None if the runner is still alive after
        ``timeout`` (then the failure was something else, e.g. a network error).
        """
        if (reason := self.failure_reason()) is not None:
            return reason
        try:
            async with asyncio.timeout(timeout):
                await self._proc.wait_exited()
        except TimeoutError:
            pass
        return self.failure_reason()


# ------------------------------------------------------------------------------------ Supervisor


class _Child:
    """One runner process as the supervisor holds it, beyond the scheduler's view (the
    scheduler's own record of a runner is ``scheduler.core._Runner``)."""

    __slots__ = (
        "runner_id",
        "model_key",
        "proc",
        "ready",
        "record",
        "start_effect",
        "task",
        "exit_posted",
        "started",
        "stop_reason",
        "_http",
    )

    def __init__(
        self,
        runner_id: str,
        model_key: str,
        proc: RunnerProcess,
        record: Any,
        start_effect: StartRunner,
    ) -> None:
        self.runner_id = runner_id
        self.model_key = model_key
        self.proc = proc
        self.ready: Ready | None = None
        self.record = record
        self.start_effect = start_effect
        self._http: RunnerHTTP | None = None
        self.task: asyncio.Task[None] | None = None
        self.exit_posted = False
        self.started = time.monotonic()
        self.stop_reason: StopReason | None = None  # of the StopRunner executed for it

    def http(self) -> RunnerHTTP:
        """The pool of keep-alive connections to this runner (once it is ready)."""
        if self._http is None:
            assert self.ready is not None
            self._http = RunnerHTTP("127.0.0.1", self.ready.port)
        return self._http

    def close_http(self) -> None:
        if self._http is not None:
            self._http.close()

    @property
    def name(self) -> str:
        return getattr(self.record, "name", None) or self.model_key


class _Live:
    """A request from its arrival to its release: who asked (for GET /api/requests and DELETE)."""

    __slots__ = ("ticket", "model", "cancelled")

    def __init__(self, ticket: Ticket | None, model: str) -> None:
        self.ticket = ticket
        self.model = model
        self.cancelled: str | None = None


def _public_id(live: _Live | None, req_id: int) -> str:
    """A request's id as GET/DELETE /api/requests name it: its ticket's, else internal-N."""
    ticket = live.ticket if live is not None else None
    return ticket.id if ticket is not None else f"internal-{req_id}"


class RequestInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One row of GET /api/requests."""

    id: str
    model: str
    state: str  # waiting | loading | running
    priority: str  # high | normal | low (as it arrived)
    position: int  # 1-based in its model's queue, in service order; 0 when running
    waited_ms: int
    tokens: int  # output so far (running)
    client: str  # the client's address
    runner_id: str | None = None


class Supervisor:
    """Owns the Scheduler (one task), runner processes and the waiting requests' futures."""

    def __init__(
        self,
        config: Config,
        store: Any = None,
        probe: GpuProbe | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        limits: Limits | None = None,
        runner_argv: Sequence[str] = RUNNER_ARGV,
        stop_grace: float = DEFAULT_STOP_GRACE,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        load_timeout: float | None = None,
        engine: EngineProbe | None | Literal["probe"] = "probe",
        metrics: Metrics | None = None,
        policy: Policy | None = None,
        spare: RunnerProcess | None = None,
    ) -> None:
        """``engine``: what the llama.cpp build can do. ``"probe"`` asks it at start (skipped for
        the fake engine and simulated GPUs, which are paper on purpose); tests pass an answer.
        ``spare``: a spare runner spawned before the supervisor (``corral serve``'s first, by
        :mod:`corral.daemon.boot`), kept if its environment is the spares' at :meth:`start`.
        ``policy``: the operator's policy; None = read ``config.policy_path`` (a bad file raises
        :class:`~corral.daemon.policy.PolicyError`), or no policy without one."""
        self.config = config
        if policy is None:
            policy = load_policy(config.policy_path) if config.policy_path else Policy()
        self.policy = policy
        # model name -> (its rule, the scheduler's policy; None = no rule applies)
        self._rules: dict[str, tuple[ModelRule, ModelPolicy | None]] = {}
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.source = self
        self.store = store
        self._probe_given = probe is not None
        self.probe: GpuProbe = probe if probe is not None else make_probe(config)
        # glibc's malloc puts runners' large buffers in transparent huge pages (child_env):
        # a CPU runner's weights are read into memory (the scheduler's use_mmap default), and
        # in 2 MiB pages every token's pass over them takes 512x fewer TLB entries. Gemma 3
        # 270M on 2 cores, llama-batched-bench without mmap, 1 / 4 sequences: 48-61 / 100-109
        # tok/s in 4 KiB pages, 70-80 / 119-127 in huge pages (docs/DESIGN.md "Huge pages").
        self._huge_pages = huge_pages_usable()
        self._engine_arg = engine
        self.engine: EngineProbe | None = None
        self.gpu_note: str | None = None  # why GPUs are not offered, when some are not
        self._clock = clock
        self._limits = (
            limits
            if limits is not None
            else Limits(
                max_loaded=config.max_loaded_models,
                num_parallel=max(1, config.num_parallel),
                max_queue=config.max_queue,
                default_keep_alive=config.keep_alive,
                sched_spread=config.sched_spread,
                gpu_overhead=config.gpu_overhead,
                priority_aging=config.priority_aging,
            )
        )
        self._argv = tuple(runner_argv)
        self.stop_grace = stop_grace
        self.drain_timeout = drain_timeout
        lt = config.load_timeout if load_timeout is None else load_timeout
        self.load_timeout = None if lt is None or math.isinf(lt) or lt <= 0 else lt
        self._sched: Scheduler | None = None
        self._inbox: collections.deque[Event] = collections.deque()
        self._wake = asyncio.Event()
        # set after the next dispatch, made when someone waits for one (wait_until)
        self._changed: asyncio.Event | None = None
        self._dispatching = False
        self._sleep_until: float | None = None  # the owner's next deadline (None: none)
        self._owner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._waiters: dict[int, asyncio.Future[str]] = {}
        self._leases: dict[int, Lease] = {}
        self._live: dict[int, _Live] = {}  # requests from RequestArrived to release
        self._waits: dict[tuple[str, int], Any] = {}  # (model, class) -> its wait histogram
        self._runners: dict[str, _Child] = {}
        # the spare runners: started ahead (imports done), waiting for the next loads' specs
        # (docs/DESIGN.md "Spare runner"), oldest first; the environment they are kept in (the
        # last load's) and the task that spawns them, one at a time
        self._spares: list[RunnerProcess] = []
        if spare is not None:
            spare.attach(on_exit=self._on_runner_exit, on_report=self._on_kv_report)
            self._spares.append(spare)
        self._spare_env: dict[str, str] | None = None
        self._refilling: asyncio.Task[None] | None = None
        self._spare_ids = itertools.count(1)
        self._records: dict[str, Any] = {}  # model_key -> the record last asked for
        self._facts: dict[str, ModelFacts] = {}  # blob path -> facts
        self._ids = itertools.count(1)
        # num_ctx when neither request nor Modelfile sets it, and whether it is automatic
        self._default_ctx: tuple[int, bool] = (4096, True)
        self._gpu_names: dict[str, str] = {}
        self._closing = False
        self._closed = False
        self._refreshing = False
        self._refresh_again = False
        # model_key -> why its next load happens ("oom_retry" / "reload") and the options of the
        # runner it replaces; dropped once nobody waits for the model.
        self._next_load: dict[str, tuple[str, RunnerOptions]] = {}
        # where runners save their slots' prompt caches when they stop (None: they do not)
        self._kv_cache = (
            KvCacheSpec(
                dir=str(config.kv_cache_path),
                disk_bytes=config.kv_cache_size,
                memory_bytes=config.kv_cache_memory,
            )
            if config.kv_cache_size > 0
            else None
        )
        self.kv_stats = KvCacheStats(config.kv_cache_path if self._kv_cache else None)
        self.processed = 0  # events dispatched so far
        # The start-up preload (preload_default) loaded its model, or had none to load: what
        # GET /readyz reports (a Kubernetes readiness probe), latched.
        self.preloaded = False

    # ------------------------------------------------------------------ lifecycle

    async def _probe_engine(self) -> EngineProbe | None:
        if self._engine_arg != "probe":
            return self._engine_arg
        cfg = self.config
        if cfg.runner_engine == "fake" or cfg.simulate_gpus is not None:
            return None
        return await engine_probe.probe_engine(
            cfg.cache_dir, cfg.cuda_visible_devices, self._argv, cfg.device_selection
        )

    async def start(self) -> None:
        """Ask the engine what it can do, gate the GPUs by it, read the inventory, build the
        Scheduler and start the owner task."""
        engine = self.engine = await self._probe_engine()
        if engine is not None and not self._probe_given:  # macOS: the Metal device is the engine's
            self.probe = make_probe(self.config, engine=engine)
        inventory = await self.probe.refresh()  # one device read serves the gate and the start
        if engine is not None:
            libraries, self.gpu_note = engine_verdict(inventory.gpus, engine)
            self.probe.restrict(libraries)
            if libraries is not None:  # always, with an engine's answer
                inventory = msgspec.structs.replace(
                    inventory, gpus=tuple(g for g in inventory.gpus if g.library in libraries)
                )
            log.info("llama.cpp engine", **engine_probe.summary(engine))
            if self.gpu_note:
                log.warning("gpus unused", reason=self.gpu_note)
        self._gpu_names = {g.id: g.name for g in inventory.gpus}
        cl = self.config.context_length
        self._default_ctx = (
            (cl, False)
            if cl > 0
            else (
                default_num_ctx([g.total for g in inventory.gpus], self._limits.gpu_overhead),
                True,
            )
        )
        self._sched = Scheduler(self._limits, inventory)
        self._owner = asyncio.create_task(self._run(), name="supervisor")
        self._owner.add_done_callback(self._owner_done)
        # the first spares get the environment of a load on every GPU (one GPU: any GPU load)
        self._refill_spares(self._runner_env(tuple(g.id for g in inventory.gpus)))
        log.info(
            "supervisor started",
            gpus=len(inventory.gpus),
            default_num_ctx=self._default_ctx[0],
            max_loaded=self._limits.max_loaded,
            num_parallel=self._limits.num_parallel,
            max_queue=self._limits.max_queue,
        )

    async def begin_shutdown(self) -> None:
        """Shutdown steps 1-2: refuse new requests (503) and fail every queued one. Idempotent;
        returns once the scheduler has processed it (bounded). In-flight leases stay valid."""
        if self._closing:
            return
        self._closing = True  # 1. stop accepting
        log.info("supervisor shutting down", shutdown_step="stop_accepting")
        if self._owner is not None and not self._owner.done():
            self.post(Shutdown())  # 2. fail queued requests
            try:
                async with asyncio.timeout(2.0):
                    await self.wait_processed()
            except TimeoutError:
                pass

    async def kill_all(self) -> None:
        """Last resort when the shutdown budget is exhausted: SIGKILL every runner group, reap."""
        procs = [r.proc for r in self._runners.values()] + self._spares
        if procs:
            await asyncio.gather(*(p.stop(0.0) for p in procs), return_exceptions=True)

    async def preload_default(self, name: str | None = None) -> None:
        """Load model ``name`` from the store with the default keep-alive and release it at once
        (Ollama's empty-prompt preload). Without a name (or a store) there is nothing to do;
        failures are logged, never raised."""
        if name is None or self.store is None:
            self.preloaded = True
            return
        try:
            await self._preload(name)
        except Exception as exc:
            log.warning("preload failed", model=name, error=getattr(exc, "message", str(exc)))
            return
        self.preloaded = True

    async def _preload(self, name: str) -> None:
        """Load model ``name`` from the store and release it at once (raises CorralError)."""
        assert self.store is not None
        record = self.store.resolve(name)
        options = RequestOptions.build(record.parameters, None)
        async with await self.acquire(record, options, None, "completion"):
            pass

    async def close(self) -> None:
        """Shut down in order (STYLE rule 11); idempotent. Total <= drain + grace + ~1 s."""
        if self._closed:
            return
        self._closed = True
        await self.begin_shutdown()  # 1.-2.
        if self._owner is not None and not self._owner.done():
            log.info(
                "supervisor shutting down",
                shutdown_step="drain",  # 3. drain streams
                in_flight=len(self._leases),
            )
            try:
                async with asyncio.timeout(self.drain_timeout):
                    await self.wait_until(lambda: not self._leases)
            except TimeoutError:
                log.warning(
                    "drain timeout: stopping runners with requests in flight",
                    in_flight=len(self._leases),
                )
        procs = [r.proc for r in self._runners.values()]  # 4. stop runners in parallel
        procs += self._spares
        self._spares = []
        log.info("supervisor shutting down", shutdown_step="stop_runners", runners=len(procs))
        if procs:
            await asyncio.gather(*(p.stop(self.stop_grace) for p in procs), return_exceptions=True)
        for lease in list(self._leases.values()):
            lease._abort(SHUTTING_DOWN_MESSAGE)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(Busy(SHUTTING_DOWN_MESSAGE))
        if self._owner is not None:
            self._owner.cancel()
        pending = [t for t in (self._owner, *self._tasks) if t is not None]
        for t in self._tasks:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for r in self._runners.values():
            r.close_http()
        log.info("supervisor shutting down", shutdown_step="close_probe")
        if getattr(self.probe, "blocking", False):  # 5. close NVML
            await asyncio.to_thread(self.probe.close)
        else:
            self.probe.close()
        log.info("supervisor stopped")

    # ------------------------------------------------------------------ public API

    async def acquire(
        self,
        model: ModelLike,
        options: RequestOptions | None = None,
        keep_alive: float | None = None,
        kind: Kind = "completion",
    ) -> Lease:
        """Wait for a runner slot for ``model`` loaded with ``options`` (the request's, merged
        with the model's parameters by the caller; None = defaults). See the module docstring
        for the contract."""
        if self._sched is None or self._owner is None:
            raise RuntimeError("Supervisor.start() was not called")
        if self._closing:
            self._count_rejected(Refusal.SHUTTING_DOWN)
            raise Busy(SHUTTING_DOWN_MESSAGE)
        t0 = time.monotonic()
        if model.model_path is None:
            raise InvalidRequest(f'"{model.name}" does not support generate')
        key = model_key(model)
        facts = await self._model_facts(model, key)
        rule, policy = self.rule(model.name)
        if keep_alive is None:
            keep_alive = rule.keep_alive
        opts = runner_options(
            RequestOptions() if options is None else options,
            default_ctx=self._default_ctx if rule.num_ctx is None else (rule.num_ctx, False),
            kv_cache_type=self.config.kv_cache_type,
            flash_attention=self.config.flash_attention,
        )
        if self._closing:
            raise Busy(SHUTTING_DOWN_MESSAGE)
        req_id = next(self._ids)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[req_id] = fut
        ticket = CURRENT.get()
        live = self._live[req_id] = _Live(ticket, model.name)
        priority = None
        if ticket is not None:  # the header, else the model's policy, else the key's default
            priority = ticket.priority
            if priority is None and rule.priority is None:
                priority = ticket.key_priority
        self._records[key] = model
        # The blob must outlive a copy/delete onto this name until a runner holds it.
        if self.store is not None:
            self._hold(key)
        self._post_now(
            RequestArrived(
                req_id=req_id,
                model_key=key,
                facts=facts,
                options=opts,
                keep_alive=keep_alive,
                embedding=kind == "embedding",
                policy=policy,
                priority=priority,
            )
        )
        try:
            runner_id = await fut
        except asyncio.CancelledError:
            # The client went away: queued -> leaves the queue; granted meanwhile -> released.
            self._live.pop(req_id, None)
            self.post(RequestCancelled(req_id=req_id))
            raise
        except CorralError:
            self._live.pop(req_id, None)
            raise
        finally:
            self._waiters.pop(req_id, None)
            if self.store is not None:
                self._release_blobs(key)
        r = self._runners.get(runner_id)
        ready = r.ready if r is not None else None
        if r is None or ready is None:  # cannot happen: Grant follows RunnerReady
            self._live.pop(req_id, None)
            self.post(RequestFinished(req_id=req_id))
            raise Failed("runner is not available")
        lease = Lease(
            self,
            req_id,
            runner_id,
            r.http(),
            ready.n_ctx_per_slot,
            time.monotonic() - t0,
            r.proc,
        )
        self._leases[req_id] = lease
        self._observe_wait(model.name, priority, policy, lease.load_duration)
        if live.cancelled is not None:  # cancelled in the instant it was granted
            lease.cancel(live.cancelled)
            raise Cancelled(live.cancelled)
        return lease

    def _observe_wait(
        self, name: str, priority: Priority | None, policy: ModelPolicy | None, waited: float
    ) -> None:
        cls = int(priority if priority is not None else (policy.priority if policy else 1))
        h = self._waits.get((name, cls))
        if h is None:
            h = self._waits[(name, cls)] = self.metrics.queue_wait.labels(
                name, Priority(cls).name.lower()
            )
        h.observe(waited)

    def requests(self) -> list[RequestInfo]:
        """Every request waiting, loading or running (GET /api/requests): waiting ones in
        service order, then the running ones."""
        if self._sched is None:
            return []
        out = []
        for v in self._sched.requests(self._clock()):
            live = self._live.get(v.req_id)
            ticket = live.ticket if live is not None else None
            lease = self._leases.get(v.req_id)
            out.append(
                RequestInfo(
                    id=_public_id(live, v.req_id),
                    model=live.model if live is not None else self.model_name(v.model_key),
                    state=v.state,
                    priority=v.priority.name.lower(),
                    position=v.position,
                    waited_ms=round(v.waited * 1000),
                    tokens=lease.runner.tokens if lease is not None else 0,
                    client=ticket.client if ticket is not None else "",
                    runner_id=v.runner_id,
                )
            )
        return out

    def cancel(self, request_id: str) -> int:
        """End every live request whose id is ``request_id`` (DELETE /api/requests/{id}): a
        waiting one leaves the queue and its client gets 499; a running one frees its slot at
        once and its stream ends with an error line. Returns how many there were."""
        n = 0
        message = f"request {request_id} was cancelled"
        for req_id, live in list(self._live.items()):
            if _public_id(live, req_id) != request_id:
                continue
            n += 1
            lease = self._leases.get(req_id)
            if lease is not None:
                lease.cancel(message)
                continue
            fut = self._waiters.get(req_id)
            if fut is not None and not fut.done():
                fut.set_exception(Cancelled(message))
                self.post(RequestCancelled(req_id=req_id))
            else:
                live.cancelled = message  # granted this instant: acquire() cancels the lease
        if n:
            log.info("request cancelled", request_id=request_id, requests=n)
            self.metrics.cancelled.inc(n)
        return n

    def rule(self, name: str) -> tuple[ModelRule, ModelPolicy | None]:
        """The policy rule for model ``name`` and the scheduler's form of it (None: no rule)."""
        hit = self._rules.get(name)
        if hit is None:
            rule = self.policy.rule_for(name)
            hit = (rule, rule.scheduler_policy(name) if rule.describe() else None)
            if len(self._rules) >= 1024:
                self._rules.clear()
            self._rules[name] = hit
        return hit

    def policy_for(self, name: str) -> dict[str, Any]:
        """The policy keys that apply to model ``name`` (empty without a rule), for /api/ps."""
        return self.rule(name)[0].describe()

    def reload_policy(self) -> bool:
        """SIGHUP: read the policy file again. A bad file keeps the old policy (logged, False);
        a good one applies at once to loaded runners (pins, keep-alive) and new requests, and
        its new pins are loaded in the background."""
        path = self.config.policy_path
        if path is None:
            log.info("policy reload: no policy file (CORRAL_POLICY is not set)")
            return False
        try:
            new = load_policy(path)
        except PolicyError as e:
            log.warning("policy reload failed, keeping the old policy", error=str(e))
            return False
        old_pins = set(self.policy.pinned_patterns())
        self.policy = new
        self._rules.clear()
        log.info("policy reloaded", path=str(path), tables=len(new.rules))
        if self._sched is not None:
            policies = {}
            for key, record in self._records.items():
                _, p = self.rule(record.name)
                policies[key] = p or ModelPolicy(name=record.name)
            self.post(PolicyChanged(policies=policies))
            fresh = [p for p in new.pinned_patterns() if p not in old_pins]
            if fresh and not self._closing:
                self._spawn(self._load_pins_logged(fresh), "load-pins")
        return True

    def pinned_models(self, patterns: Sequence[str] | None = None) -> list[str]:
        """The store's model names the policy pins (exact names as written, globs expanded)."""
        if self.store is None:
            return []
        names: list[str] = []
        pats = self.policy.pinned_patterns() if patterns is None else list(patterns)
        listed: list[str] | None = None
        for p in pats:
            if any(c in p for c in "*?["):
                if listed is None:
                    listed = [r.name for r in self.store.list()]
                names += [
                    n
                    for n in listed
                    if self.policy.rule_for(n).pinned and p in self.policy.matches(n)
                ]
            else:
                names.append(p)
        return list(dict.fromkeys(names))

    async def load_pins(self, patterns: Sequence[str] | None = None) -> list[str]:
        """Load every pinned model (kept forever, never evicted), one after the other. Raises
        :class:`~corral.daemon.policy.PolicyError` naming the model when one is not in the store
        or cannot be loaded beside the others (start-up stops then)."""
        loaded = []
        for name in self.pinned_models(patterns):
            try:
                await self._preload(name)
            except CorralError as e:
                raise PolicyError(f"pinned model {name!r} cannot be loaded: {e.message}") from None
            log.info("pinned model loaded", model=name)
            loaded.append(name)
        return loaded

    async def _load_pins_logged(self, patterns: Sequence[str]) -> None:
        try:
            await self.load_pins(patterns)
        except PolicyError as e:
            log.warning("pinned model not loaded", error=str(e))

    async def unload(self, model: ModelLike) -> None:
        """Unload ``model`` as soon as it is idle (no-op when it is not loaded). Returns at once."""
        if model.model_path is None or self._sched is None:
            return
        self.post(UnloadRequested(model_key=model_key(model)))

    def adopt(self, gone: ModelLike, heir: ModelLike) -> None:
        """``gone`` left the store and ``heir``, which is still there, has the same weights (the
        same model key): the runners started for ``gone`` stay, named ``heir`` from now on."""
        name = getattr(gone, "name", None)
        for r in self._runners.values():
            if name is not None and getattr(r.record, "name", None) == name:
                r.record = heir
        key = model_key(heir)
        if getattr(self._records.get(key), "name", None) == name:
            self._records[key] = heir

    def report_out_of_memory(self, lease: Lease) -> None:
        """A granted request failed with an out-of-memory error at run time: every runner
        unloads as soon as it is idle (Ollama's runtime-OOM rule)."""
        self.post(RunnerOutOfMemory(runner_id=lease.runner_id))

    def snapshot(self) -> SchedulerSnapshot:
        assert self._sched is not None
        return self._sched.snapshot()

    @property
    def closing(self) -> bool:
        """Shutdown has begun: new requests get 503."""
        return self._closing

    def _count_rejected(self, reason: Refusal) -> None:
        self.metrics.rejected.labels(_REJECTED.get(reason, "other")).inc()

    def model_name(self, model_key: str) -> str:
        """The name a model was last asked for by (its blob path if never)."""
        return getattr(self._records.get(model_key), "name", None) or model_key

    @property
    def gpus_simulated(self) -> bool:
        """The GPUs are CORRAL_SIMULATE_GPUS's, on paper."""
        return isinstance(self.probe, SimulatedProbe)

    def gpu_name(self, gpu_id: str) -> str:
        return self._gpu_names.get(gpu_id, gpu_id)

    def runner_clients(self) -> dict[str, RunnerClient]:
        """Clients of the runners that are ready and still running, by runner id (/metrics)."""
        return {
            rid: RunnerClient(r.http(), r.proc.requests)
            for rid, r in self._runners.items()
            if r.ready is not None and r.proc.returncode is None
        }

    def runner_process(self, runner_id: str) -> RunnerProcess | None:
        r = self._runners.get(runner_id)
        return r.proc if r is not None else None

    def now(self) -> float:
        """The supervisor's clock (the one the snapshot's deadlines are on)."""
        return self._clock()

    def record(self, view: RunnerView) -> Any:
        """The model record the runner of ``view`` was started for (None if unknown)."""
        r = self._runners.get(view.runner_id)
        return r.record if r is not None else self._records.get(view.model_key)

    def facts(self, model_key: str) -> ModelFacts | None:
        return self._facts.get(model_key)

    # ------------------------------------------------------------------ test hooks

    def tick(self) -> None:
        """Re-evaluate deadlines now (tests with a fake clock call this after advancing it)."""
        self.post(Tick())

    async def wait_processed(self) -> None:
        """Block until every event posted so far has been dispatched."""
        await self.wait_until(lambda: not self._inbox and not self._dispatching)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Block until ``predicate()`` holds; re-checked after every dispatch."""
        while not predicate():
            if self._owner is None or self._owner.done():
                raise RuntimeError("supervisor is not running")
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    # ------------------------------------------------------------------ the owner task

    def post(self, event: Event) -> None:
        """Queue an event for the owner task. Never blocks; callable from any task."""
        self._inbox.append(event)
        self._wake.set()

    def _post_now(self, event: Event) -> None:
        """A request's arrival or end: dispatched at once in the calling task when nothing is
        queued before it, else :meth:`post`. The scheduler is synchronous and the loop has one
        thread, so this is what the owner would do next, without the two task switches of a
        hop to the owner and back (a grant for a free slot then completes ``acquire`` without
        a wait). The owner is woken only when its sleep must end before the time it planned."""
        owner = self._owner
        if self._inbox or self._dispatching or owner is None or owner.done():
            self.post(event)
            return
        self._dispatch(event)
        assert self._sched is not None
        deadline = self._sched.next_deadline()
        if deadline is not None and (self._sleep_until is None or deadline < self._sleep_until):
            self._wake.set()

    async def _run(self) -> None:
        sched = self._sched
        assert sched is not None
        while True:
            while self._inbox:
                self._dispatch(self._inbox.popleft())
            deadline = sched.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            self._wake.clear()
            if timeout == 0.0:
                self._dispatch(Tick())
                await asyncio.sleep(0)  # let the posting tasks run between ticks
                continue
            self._sleep_until = deadline
            if not await wait_event(self._wake, timeout):
                self._dispatch(Tick())

    def _owner_done(self, task: asyncio.Task[None]) -> None:
        """The owner task ended: if it crashed, nobody may wait for it forever."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("supervisor loop crashed", error=repr(task.exception()))
        self._closing = True
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(Failed("internal scheduler error"))

    def _dispatch(self, event: Event) -> None:
        sched = self._sched
        assert sched is not None
        self._dispatching = True
        try:
            effects = sched.dispatch(event, now=self._clock())
        except Exception:
            log.exception("scheduler failed on an event", event=type(event).__name__)
            effects = []
            if isinstance(event, RequestArrived):
                effects = [
                    Fail(
                        req_id=event.req_id,
                        reason=Refusal.LOAD_FAILED,
                        message="internal scheduler error",
                    )
                ]
        try:
            for effect in effects:
                try:
                    self._execute(effect)
                except Exception:
                    log.exception("effect failed", effect=type(effect).__name__)
        finally:
            self._dispatching = False
            self.processed += 1
            changed, self._changed = self._changed, None
            if changed is not None:
                changed.set()
        # Memory moves when a runner starts, reports its real use or goes away: read the probe
        # again (a simulated probe also learns what our runners hold then).
        if isinstance(event, (RunnerStopped, RunnerExited, RunnerReady, RunnerLoadFailed)) or any(
            isinstance(e, StartRunner) for e in effects
        ):
            self._schedule_refresh()
        if self._next_load:
            waiting = self.snapshot().waiting  # no retry/reload once nobody waits for it
            for key in [k for k in self._next_load if k not in waiting]:
                del self._next_load[key]

    def _execute(self, effect: Effect) -> None:
        """Carry out one effect without blocking (slow work goes to a task)."""
        if isinstance(effect, Grant):
            fut = self._waiters.get(effect.req_id)
            if fut is None or fut.done():
                # The caller is gone (cancelled): give the slot straight back.
                self.post(RequestFinished(req_id=effect.req_id))
            else:
                fut.set_result(effect.runner_id)
        elif isinstance(effect, (Reject, Fail)):
            fut = self._waiters.get(effect.req_id)
            if fut is not None and not fut.done():
                retry = effect.retry_after if isinstance(effect, Reject) else None
                fut.set_exception(_scheduler_error(effect.reason, effect.message, retry))
            if effect.reason in _REJECTED:
                self._count_rejected(effect.reason)
            if isinstance(effect, Fail) or effect.reason not in _REJECTED:
                log.info(
                    "request failed",
                    req_id=effect.req_id,
                    reason=effect.reason,
                    error=effect.message,
                )
        elif isinstance(effect, Abort):
            lease = self._leases.get(effect.req_id)
            if lease is not None:
                lease._abort(effect.message)
        elif isinstance(effect, StartRunner):
            self._start_runner(effect)
        elif isinstance(effect, StopRunner):
            self._stop_runner(effect)
        else:  # pragma: no cover - a new effect type must be handled here
            log.error("unknown effect", effect=repr(effect))

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ runners

    def _runner_env(self, gpus: Sequence[str]) -> dict[str, str] | None:
        """The environment of a runner placed on ``gpus`` (runners.child_env)."""
        return child_env(self.probe.visible_devices(gpus), huge_pages=self._huge_pages)

    def _new_process(self, runner_id: str, env: dict[str, str] | None) -> RunnerProcess:
        # Stall timeouts are about a real process: real time, whatever the scheduler's clock.
        return RunnerProcess(
            runner_id,
            env=env,
            on_exit=self._on_runner_exit,
            on_report=self._on_kv_report,
            argv=self._argv,
        )

    def _take_spare(self, env: dict[str, str] | None) -> RunnerProcess | None:
        """A spare runner for a load with ``env`` (the same argv: the daemon has one): a warm
        one if there is one, else the oldest still warming up (nearest its end); None when no
        live spare has exactly that environment (the refill that follows replaces them)."""
        fits = [p for p in self._spares if p.spare and p.env == env]
        if not fits:
            return None
        spare = next((p for p in fits if p.warm), fits[0])
        self._spares.remove(spare)
        self.metrics.spare_runner_uses.inc()
        return spare

    def _refill_spares(self, env: dict[str, str] | None) -> None:
        """Keep ``config.spare_runners`` spares with ``env`` (the last load's: the likeliest
        next one): spares of another environment are stopped, the missing ones spawned by one
        task, each once the one before is warm, so at most one warm-up at a time competes with
        the loads for the CPU."""
        self._spare_env = env
        if self.config.spare_runners <= 0 or self._closing:
            return
        if self._refilling is None or self._refilling.done():
            self._refilling = self._spawn(self._refill(), "spares")

    async def _refill(self) -> None:
        while not self._closing:
            env = self._spare_env
            for p in [p for p in self._spares if not p.spare or p.env != env]:
                self._spares.remove(p)
                if p.spare:  # waiting, in another environment (the others exited or stop)
                    log.info("spare runner stopped", spare_pid=p.pid, reason="another environment")
                    self._spawn(p.stop(1.0), f"stop-{p.runner_id}")
            warming = next((p for p in self._spares if not p.warm), None)
            if warming is not None:  # one warm-up at a time
                if not await warming.wait_warm() and warming in self._spares:
                    if warming.returncode is not None and not warming.stopping:
                        # died in its warm-up: the next load tries again, not this loop
                        log.warning(
                            "spare runner exited", pid=warming.pid, returncode=warming.returncode
                        )
                        self._spares.remove(warming)
                        return
                continue
            if len(self._spares) >= self.config.spare_runners:
                return
            proc = self._new_process(f"spare{next(self._spare_ids)}", env)
            self._spares.append(proc)
            try:
                await proc.spawn(("--spare", self.config.runner_engine))
            except RunnerStartError as exc:
                if proc in self._spares:
                    self._spares.remove(proc)
                if exc.kind != "stopped":
                    log.warning("spare runner not started", reason=exc.reason)
                return
            log.debug("spare runner started", runner_id=proc.runner_id, pid=proc.pid)

    def spare_runners(self) -> tuple[int, int]:
        """Spare runners waiting for a load: (warm, still warming up)."""
        waiting = [p for p in self._spares if p.spare]
        warm = sum(1 for p in waiting if p.warm)
        return warm, len(waiting) - warm

    def spare_memory(self) -> int:
        """Resident bytes of the spare runners (0 without one): /metrics shows what they cost."""
        total = 0
        for p in self._spares:
            if p.pid is not None and p.spare:
                try:
                    total += psutil.Process(p.pid).memory_info().rss
                except psutil.Error:
                    pass
        return total

    def _launch_spec(self, eff: StartRunner) -> LaunchSpec:
        o, p = eff.options, eff.placement
        facts = self._facts.get(eff.model_key)
        knobs = self.config.fake_knobs or {}
        model_path, projector_path = key_paths(eff.model_key)
        return LaunchSpec(
            model_path=model_path,
            projector_path=projector_path,
            engine=self.config.runner_engine,
            num_ctx=o.num_ctx,
            parallel=eff.parallel,
            n_gpu_layers=p.n_gpu_layers if p.gpus else 0,
            main_gpu=p.main_gpu,
            tensor_split=[float(x) for x in p.tensor_split] if len(p.tensor_split) > 1 else None,
            split_mode="layer" if p.split_mode == "layer" else "none" if p.gpus else "layer",
            flash_attention=o.flash_attention,
            kv_cache_type=o.kv_cache_type or "f16",  # type: ignore[arg-type]
            use_mmap=True if o.use_mmap is None else o.use_mmap,
            num_thread=o.num_thread,
            num_batch=o.num_batch,
            embedding=bool(facts and facts.is_embedding_model),
            grace_period=max(0.0, self.stop_grace - 1.0),
            predict_limit=self.config.predict_limit,
            kv_cache=self._kv_cache,
            fake=msgspec.convert(knobs, FakeKnobs) if knobs else FakeKnobs(),
        )

    def _start_runner(self, eff: StartRunner) -> None:
        env = self._runner_env(eff.placement.gpus)
        proc = self._take_spare(env)
        # the log says whether the load started in a spare, and whether its warm-up was over
        spare: str | bool = False
        if proc is not None:
            proc.runner_id = eff.runner_id
            spare = "warm" if proc.warm else "warming"
        else:
            proc = self._new_process(eff.runner_id, env)
        r = _Child(eff.runner_id, eff.model_key, proc, self._records.get(eff.model_key), eff)
        # Why this load: a reload (an older runner of the model is retiring: which options
        # changed), the retry after an out-of-memory load, or a new load.
        old = next(
            (
                o
                for o in self._runners.values()
                if o.model_key == eff.model_key
                and o.proc.returncode is None
                and o.stop_reason in (None, StopReason.RELOAD)
            ),
            None,
        )
        why = None if eff.replica else self._next_load.pop(eff.model_key, None)
        fields: dict[str, Any] = {}
        if eff.replica:  # another runner beside the model's busy one(s)
            why = ("replica", eff.options)
        elif old is not None:  # still running (busy, or stopping right now)
            why = ("reload", old.start_effect.options)
            fields["previous_pid"] = old.proc.pid
        reason = "new" if why is None else why[0]
        if why is not None:
            fields["changed"] = _changed_options(why[1], eff.options)
        self._runners[eff.runner_id] = r
        if self.store is not None:  # its blob stays while the runner lives (see _forget)
            self._hold(eff.model_key)
        p = eff.placement
        log.info(
            "starting runner",
            decision="load",
            reason=reason,
            runner_id=eff.runner_id,
            model=r.name,
            gpus=list(p.gpus),
            gpu_bytes=list(p.gpu_bytes),
            cpu_bytes=p.cpu_bytes,
            n_gpu_layers=p.n_gpu_layers,
            split=p.split_mode,
            num_ctx=eff.options.num_ctx,
            parallel=eff.parallel,
            spare=spare,
            **fields,
        )
        self.metrics.loads.labels(r.name, reason).inc()
        r.task = self._spawn(self._launch(r), f"load-{eff.runner_id}")
        # the next spare starts now: its imports (one thread) overlap this load (mostly one
        # thread: reading the model) rather than the first request's prompt (all threads)
        self._refill_spares(env)

    async def _launch(self, r: _Child) -> None:
        """Spawn the runner and wait for its handshake (the scheduler's ``_load`` decided the
        load); posts RunnerReady or RunnerLoadFailed."""
        try:
            spec = self._launch_spec(r.start_effect)
            ready = await r.proc.start(spec, load_timeout=self.load_timeout)
        except RunnerStartError as exc:
            if not r.proc.stopping:  # a stop we asked for answers with RunnerStopped instead
                oom = exc.oom or is_out_of_memory(exc.reason)
                log.warning(
                    "runner failed to load",
                    runner_id=r.runner_id,
                    model=r.name,
                    pid=r.proc.pid,
                    reason=exc.reason,
                    oom=oom,
                    kind=exc.kind,
                    stderr=r.proc.stderr_tail()[-STDERR_TAIL:],
                )
                self.metrics.load_failures.labels(r.name, "true" if oom else "false").inc()
                if oom and not r.start_effect.replica:
                    self._next_load[r.model_key] = ("oom_retry", r.start_effect.options)
                self._forget(r.runner_id)  # reaped: nothing will stop it
                self.post(RunnerLoadFailed(runner_id=r.runner_id, reason=exc.reason, oom=oom))
            return
        except Exception as exc:  # a bug here must still answer the scheduler
            log.exception("runner start crashed", runner_id=r.runner_id)
            asked = r.proc.stopping
            await r.proc.stop(1.0)
            if not asked:
                self._forget(r.runner_id)
                # the client's error says what failed even for an exception with no message
                what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                reason = f"unable to start runner: {what}"
                self.post(RunnerLoadFailed(runner_id=r.runner_id, reason=reason))
            return
        r.ready = ready
        gpu_bytes, cpu_bytes = self._memory_report(r.start_effect, ready)
        took = time.monotonic() - r.started
        log.info(
            "runner ready",
            runner_id=r.runner_id,
            model=r.name,
            pid=ready.pid,
            port=ready.port,
            n_ctx=ready.n_ctx_per_slot,
            load_s=round(took, 3),
            # of it the model load inside the runner; the rest its spawn or a spare's warm-up
            # still under way, and the handshake
            model_load_s=round(ready.load_duration / 1e9, 3),
            memory={d: m.total for d, m in ready.memory.items()},
        )
        self.metrics.load_duration.labels(r.name).observe(took)
        if r.proc.returncode is not None:
            # Died between Ready and now: the exit watcher may have run and posted nothing.
            await r.proc.wait_exited()
            if not r.exit_posted and not r.proc.stopping:
                r.exit_posted = True
                self._forget(r.runner_id)
                self.post(RunnerExited(runner_id=r.runner_id, reason=r.proc.exit_reason()))
            return
        self.post(
            RunnerReady(
                runner_id=r.runner_id,
                pid=ready.pid,
                n_ctx=ready.n_ctx_per_slot,
                gpu_bytes=gpu_bytes,
                cpu_bytes=cpu_bytes,
            )
        )

    def _memory_report(
        self, eff: StartRunner, ready: Ready
    ) -> tuple[dict[str, int] | None, int | None]:
        """Ready.memory by Gpu.id: what the runner measured replaces the plan.

        An empty report (the FakeEngine on paper GPUs) keeps the estimate, and so does a
        placement on simulated GPUs (CORRAL_SIMULATE_GPUS): they are paper on purpose and the
        plan is what an operator asked to see; a ``simulated placement kept`` line logs what the
        runner measured. A report with no GPU device for a real GPU placement means llama.cpp
        computes on the CPU (a build without that GPU backend): it is logged and reported as
        measured (no VRAM), never as planned.
        """
        if not ready.memory:
            return None, None
        if eff.placement.gpus and self.gpus_simulated:
            log.info(
                "simulated placement kept",
                runner_id=eff.runner_id,
                gpus=list(eff.placement.gpus),
                gpu_bytes=list(eff.placement.gpu_bytes),
                cpu_bytes=eff.placement.cpu_bytes,
                measured={d: m.total for d, m in ready.memory.items()},
            )
            return None, None
        gpus = eff.placement.gpus
        gpu_bytes: dict[str, int] = {}
        cpu = 0
        for device, use in ready.memory.items():
            if not _is_gpu_device(device):
                cpu += use.total
                continue
            digits = "".join(ch for ch in device if ch.isdigit())
            if device in gpus:
                gid = device
            elif digits and int(digits) < len(gpus):
                gid = gpus[int(digits)]  # CUDA0.. index the (narrowed) placement list
            else:
                continue
            gpu_bytes[gid] = gpu_bytes.get(gid, 0) + use.total
        if gpus and not any(gpu_bytes.values()):
            log.warning(
                "runner uses no GPU memory although placed on GPUs: reporting what it "
                "measured (CPU)",
                runner_id=eff.runner_id,
                gpus=list(gpus),
                devices=sorted(ready.memory),
                cpu_bytes=cpu,
            )
            return {}, cpu
        return gpu_bytes, cpu

    def _on_runner_exit(self, proc: RunnerProcess, returncode: int) -> None:
        """Exit watcher callback: an exit we did not ask for, after Ready, is a crash."""
        r = self._runners.get(proc.runner_id)
        if r is None or proc.stopping or r.ready is None or r.exit_posted:
            return  # stop -> RunnerStopped; during load -> RunnerLoadFailed
        r.exit_posted = True
        # Nothing will stop a dead runner: forget it here (a crash loop must not grow the table;
        # its leases keep their own reference to the process for the failure text).
        self._forget(proc.runner_id)
        reason = proc.exit_reason()
        log.warning(
            "runner exited unexpectedly",
            decision="crash",
            runner_id=proc.runner_id,
            model=r.name,
            pid=proc.pid,
            returncode=returncode,
            reason=reason,
            stderr=proc.stderr_tail()[-STDERR_TAIL:],
        )
        self.metrics.crashes.labels(r.name).inc()
        for lease in self._leases.values():
            if lease.runner_id == proc.runner_id:
                lease._abort(reason)
        self.post(RunnerExited(runner_id=proc.runner_id, reason=reason))

    def _on_kv_report(self, proc: RunnerProcess, report: KvCacheReport) -> None:
        """A runner's saved-prompt-cache counts: /metrics, and the totals `corral doctor` reads."""
        r = self._runners.get(proc.runner_id)
        self.metrics.count_kv_cache(r.name if r is not None else "", report)
        self.kv_stats.add(report)

    def _stop_runner(self, eff: StopRunner) -> None:
        r = self._runners.get(eff.runner_id)
        name = r.name if r is not None else None
        if r is not None:
            r.stop_reason = eff.reason
            if eff.reason == StopReason.RELOAD and not any(
                o.model_key == r.model_key and o is not r and o.proc.returncode is None
                for o in self._runners.values()
            ):
                self._next_load[r.model_key] = ("reload", r.start_effect.options)
        fields: dict[str, Any] = {}
        view = next((v for v in self.snapshot().runners if v.runner_id == eff.runner_id), None)
        if view is not None:
            fields["idle_s"] = round(max(0.0, self._clock() - view.last_used), 3)
            fields["keep_alive"] = view.keep_alive
        if eff.reason == StopReason.EVICTED:
            # The victim goes so that the models with waiting requests can load.
            fields["waiting"] = sorted(
                {self.model_name(k) for k in self.snapshot().waiting} - {name}
            )
        log.info(
            "stopping runner",
            decision=DECISIONS[eff.reason],
            reason=eff.reason,
            runner_id=eff.runner_id,
            model=name,
            pid=r.proc.pid if r is not None else None,
            **fields,
        )
        self.metrics.unloads.labels(name or "", eff.reason).inc()
        self._spawn(self._stop(eff.runner_id, r), f"stop-{eff.runner_id}")

    async def _stop(self, runner_id: str, r: _Child | None) -> None:
        if r is not None:
            await r.proc.stop(self.stop_grace)
            if r.task is not None:
                await asyncio.gather(r.task, return_exceptions=True)
            self._forget(runner_id)
        self.post(RunnerStopped(runner_id=runner_id))

    def _forget(self, runner_id: str) -> None:
        """The runner's process is gone: drop it and its hold on the model's blob."""
        r = self._runners.pop(runner_id, None)
        if r is not None:
            r.close_http()
        if r is not None and self.store is not None:
            self._release_blobs(r.model_key)

    def _release(self, lease: Lease) -> None:
        self._leases.pop(lease.req_id, None)
        self._live.pop(lease.req_id, None)
        self._post_now(RequestFinished(req_id=lease.req_id))

    # ------------------------------------------------------------------ probes and facts

    def _schedule_refresh(self) -> None:
        if self._closing:
            return
        if self._refreshing:
            self._refresh_again = True  # the running loop reads once more: nothing is lost
            return
        self._refreshing = True
        self._spawn(self._refresh_loop(), "inventory-refresh")

    def _held_by_runners(self) -> dict[str, int]:
        """GPU bytes per GPU id of every runner the scheduler still has (loading to stopping)."""
        held: dict[str, int] = {}
        for v in self.snapshot().runners:
            for g, b in zip(v.placement.gpus, v.placement.gpu_bytes, strict=True):
                held[g] = held.get(g, 0) + b
        return held

    async def _refresh_loop(self) -> None:
        """Post fresh readings now, again at once if another refresh was asked for meanwhile,
        then every REFRESH_INTERVAL while memory is being reclaimed."""
        try:
            while not self._closing:
                self._refresh_again = False
                try:
                    self.probe.note_usage(self._held_by_runners())
                    inventory: Inventory = await self.probe.refresh()
                except Exception:
                    log.exception("probe refresh failed")
                    return
                self.post(InventoryUpdated(inventory=inventory))
                await self.wait_processed()
                if self._refresh_again:
                    continue
                if not self.snapshot().reclaiming:
                    return
                await asyncio.sleep(REFRESH_INTERVAL)
        finally:
            self._refreshing = False

    def _hold(self, key: str) -> None:
        """Store.hold for every blob of a model key (the GGUF and its projector)."""
        assert self.store is not None
        for path in key_paths(key):
            if path:
                self.store.hold(path)

    def _release_blobs(self, key: str) -> None:
        assert self.store is not None
        for path in key_paths(key):
            if path:
                self.store.release(path)

    async def _model_facts(self, model: ModelLike, key: str) -> ModelFacts:
        facts = self._facts.get(key)
        if facts is not None:
            return facts
        model_path, projector_path = key_paths(key)
        try:
            info = await gguf_info.read_info_async(model_path)
            size = os.path.getsize(model_path)
            projector = await gguf_info.read_info_async(projector_path) if projector_path else None
        except FileNotFoundError as exc:
            raise model_not_found(model.name) from exc
        except Exception as exc:
            raise Failed(
                f"unable to load model: {model_path}: {exc}: this model may be "
                "incompatible with your version of corral. If you previously "
                f"pulled this model, try updating it by running `ollama pull "
                f"{model.name}`"
            ) from exc
        facts = facts_from_info(info, size)
        if projector is not None:
            facts = projector_facts(facts, projector)
        if getattr(model, "model_digest", None) == default_model.embedded_digest():
            facts = msgspec.structs.replace(facts, num_parallel=default_model.DEFAULT_PARALLEL)
        self._facts[key] = facts
        return facts


__all__ = ["Lease", "Supervisor"]
