"""Test harness for the pure scheduler: a fake clock, effect bookkeeping and the invariant checker
run after every event (STYLE.md: reserved VRAM per GPU <= usable, loaded <= max_loaded, in-flight
per runner <= parallel, queue <= max_queue, each request exactly one outcome)."""

from __future__ import annotations

from corral.scheduler import (
    Abort,
    Fail,
    Gpu,
    Grant,
    HostMemory,
    Inventory,
    InventoryUpdated,
    Limits,
    ModelFacts,
    ModelPolicy,
    Priority,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    RunnerExited,
    RunnerLoadFailed,
    RunnerOptions,
    RunnerReady,
    RunnerStopped,
    Scheduler,
    StartRunner,
    StopRunner,
    Tick,
)

GB = 1_000_000_000  # Ollama's scheduler tests use decimal GB
GiB = 1 << 30
MiB = 1 << 20


def facts(size: int = 1 * GB, *, blocks: int = 10, arch: str = "test", **kw) -> ModelFacts:
    """A model whose estimate is exactly ``size`` bytes (no KV heads, no graph, no output)."""
    per = size // blocks
    return ModelFacts(
        architecture=arch,
        file_size=per * blocks,
        block_count=blocks,
        layer_bytes=(per,) * blocks,
        **kw,
    )


def metal(total: int = 24 * GB, free: int = 12 * GB, id: str = "0") -> Gpu:
    return Gpu(id=id, name="Apple M", library="metal", total=total, free=free, integrated=False)


def cuda(id: str, total: int, free: int | None = None, integrated: bool = False) -> Gpu:
    return Gpu(
        id=id,
        name=f"Sim CUDA {id}",
        library="cuda",
        total=total,
        free=total if free is None else free,
        integrated=integrated,
    )


def inventory(*gpus: Gpu, host_total: int = 32 * GB, host_free: int = 26 * GB) -> Inventory:
    return Inventory(gpus=tuple(gpus), host=HostMemory(total=host_total, free=host_free))


class InvariantError(AssertionError):
    pass


class Harness:
    """Drives a Scheduler with a fake clock; checks the invariants after every event."""

    def __init__(
        self, limits: Limits | None = None, inv: Inventory | None = None, now: float = 1000.0
    ) -> None:
        self.limits = limits or Limits()
        self.inv = inv if inv is not None else inventory(metal())
        self.s = Scheduler(self.limits, self.inv)
        self.now = now
        self.effects: list = []
        self.outcome: dict[int, object] = {}  # req -> Grant | Reject | Fail
        self.aborted: set[int] = set()
        self.cancelled_waiting: set[int] = set()
        self.arrived: dict[int, RequestArrived] = {}
        self.granted: dict[int, str] = {}  # req -> runner, while in flight
        self.starts: dict[str, StartRunner] = {}
        self.ready: set[str] = set()
        self.stop_sent: set[str] = set()
        self.gone: set[str] = set()
        self.stop_reasons: dict[str, str] = {}
        self._next_req = 0

    # -- driving -----------------------------------------------------------------------------

    def do(self, ev, dt: float = 0.0) -> list:
        self.now += dt
        if isinstance(ev, InventoryUpdated):
            self.inv = ev.inventory
        if isinstance(ev, RequestArrived):
            self.arrived[ev.req_id] = ev
        if (
            isinstance(ev, RequestCancelled)
            and ev.req_id in self.arrived
            and ev.req_id not in self.outcome
        ):
            self.cancelled_waiting.add(ev.req_id)
        if isinstance(ev, (RequestFinished, RequestCancelled)):
            self.granted.pop(ev.req_id, None)
        if isinstance(ev, RunnerReady):
            self.ready.add(ev.runner_id)
        if isinstance(ev, (RunnerStopped, RunnerExited, RunnerLoadFailed)):
            self.gone.add(ev.runner_id)
        effects = self.s.dispatch(ev, self.now)
        self._record(effects)
        self.check()
        self.effects.extend(effects)
        return effects

    def arrive(
        self,
        model: str = "m",
        f: ModelFacts | None = None,
        options: RunnerOptions | None = None,
        keep_alive: float | None = None,
        req_id: int | None = None,
        dt: float = 0.0,
        embedding: bool = False,
        policy: ModelPolicy | None = None,
        priority: Priority | None = None,
    ) -> list:
        if req_id is None:
            self._next_req += 1
            req_id = self._next_req
        else:
            self._next_req = max(self._next_req, req_id)
        return self.do(
            RequestArrived(
                req_id,
                model,
                f or facts(),
                options or RunnerOptions(),
                keep_alive,
                embedding,
                policy,
                priority,
            ),
            dt,
        )

    def tick(self, dt: float = 0.0) -> list:
        return self.do(Tick(), dt)

    # -- bookkeeping and invariants ----------------------------------------------------------

    def _record(self, effects: list) -> None:
        for e in effects:
            if isinstance(e, (Grant, Reject, Fail)):
                if e.req_id in self.outcome:
                    raise InvariantError(f"second outcome for request {e.req_id}: {e}")
                if e.req_id in self.cancelled_waiting:
                    raise InvariantError(f"outcome for a request cancelled while queued: {e}")
                if e.req_id not in self.arrived:
                    raise InvariantError(f"outcome for an unknown request: {e}")
                self.outcome[e.req_id] = e
            if isinstance(e, Grant):
                if (
                    e.runner_id not in self.ready
                    or e.runner_id in self.stop_sent
                    or e.runner_id in self.gone
                ):
                    raise InvariantError(f"grant on a runner that is not ready: {e}")
                self.granted[e.req_id] = e.runner_id
            if isinstance(e, Abort):
                if self.granted.pop(e.req_id, None) != e.runner_id:
                    raise InvariantError(f"abort of a request not in flight there: {e}")
                self.aborted.add(e.req_id)
            if isinstance(e, StartRunner):
                if e.runner_id in self.starts:
                    raise InvariantError(f"runner id reused: {e}")
                self.starts[e.runner_id] = e
            if isinstance(e, StopRunner):
                if e.runner_id in self.stop_sent:
                    raise InvariantError(f"second stop: {e}")
                busy = [r for r, rr in self.granted.items() if rr == e.runner_id]
                if busy:
                    raise InvariantError(f"stop of a runner with requests in flight {busy}: {e}")
                self.stop_sent.add(e.runner_id)
                self.stop_reasons[e.runner_id] = e.reason
                view = self.runner(e.runner_id)
                if view is not None and view.pinned and e.reason not in ("shutdown", "reload"):
                    raise InvariantError(f"pinned runner stopped: {e}")

    def check(self) -> None:
        snap = self.s.snapshot()
        lim = self.limits
        for g, view in zip(self.inv.gpus, snap.gpus, strict=True):
            cap = max(0, g.total - lim.gpu_overhead - g.min_overhead)
            if view.reserved > cap:
                raise InvariantError(f"GPU {g.id}: reserved {view.reserved} > capacity {cap}")
        if snap.host_reserved > self.inv.host.total:
            raise InvariantError("host reservations exceed host memory")
        live = [r for r in snap.runners if r.state != "gone"]
        if len(live) > snap.max_loaded:
            raise InvariantError(f"{len(live)} runners loaded > max {snap.max_loaded}")
        for r in snap.runners:
            if r.in_flight > r.parallel:
                raise InvariantError(f"{r.runner_id}: in flight {r.in_flight} > {r.parallel}")
        if snap.queued > lim.max_queue:
            raise InvariantError(f"queue {snap.queued} > max {lim.max_queue}")
        waiting = {
            rid
            for rid in self.arrived
            if rid not in self.outcome and rid not in self.cancelled_waiting
        }
        if snap.queued != len(waiting):
            raise InvariantError(f"scheduler counts {snap.queued} waiting, harness {len(waiting)}")
        in_flight = sum(r.in_flight for r in snap.runners)
        if in_flight != len(self.granted):
            raise InvariantError(f"in flight {in_flight} != harness {len(self.granted)}")
        views = self.s.requests(self.now)
        running = {v.req_id for v in views if v.state == "running"}
        if running != set(self.granted) or len(views) - len(running) != len(waiting):
            raise InvariantError(f"request list {views} != waiting {waiting}, {self.granted}")

    # -- queries -----------------------------------------------------------------------------

    def runner(self, runner_id: str):
        for r in self.s.snapshot().runners:
            if r.runner_id == runner_id:
                return r
        return None

    def runners(self) -> dict[str, object]:
        return {r.runner_id: r for r in self.s.snapshot().runners}


def kinds(effects: list) -> list[str]:
    return [type(e).__name__ for e in effects]


def only(effects: list, cls):
    got = [e for e in effects if isinstance(e, cls)]
    assert len(got) == 1, effects
    return got[0]
