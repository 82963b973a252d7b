"""Plain data the scheduler works on: frozen msgspec Structs, no behaviour beyond small properties.

Units: memory in bytes (int), time in seconds (float, the supervisor's monotonic clock),
``math.inf`` = forever. GPU identity is ``Gpu.id`` (a string, e.g. ``"0"`` or a UUID).

* :class:`Gpu`, :class:`HostMemory`, :class:`Inventory` - what the daemon's probes measured.
* :class:`ModelFacts` - what the memory estimate needs from a GGUF file (the daemon reads it).
* :class:`RunnerOptions` - the load-relevant options of a request / of a runner.
* :class:`Estimate` - memory the model needs, per layer (scheduler/estimate.py).
* :class:`Placement` - where a runner goes: layers on GPUs, tensor split, bytes per device.
* :class:`Limits` - the scheduler's knobs (from the daemon's Config).
* :class:`Priority`, :class:`ModelPolicy` - the operator's per-model policy (daemon/policy.py).
"""

from __future__ import annotations

import enum
import math
from enum import StrEnum

import msgspec

GiB = 1 << 30
MiB = 1 << 20


class Gpu(msgspec.Struct, frozen=True):
    """One GPU as last measured. ``free`` is the measured free memory (may lag after a stop)."""

    id: str
    name: str
    library: str  # backend: "cuda", "rocm", "metal", "vulkan", ...
    total: int
    free: int
    integrated: bool = False
    # Memory the backend itself needs on this device (CUDA/ROCm 457 MiB, Metal 512 MiB,
    # simulated GPUs 0); see scheduler.estimate.minimum_memory().
    min_overhead: int = 0


class HostMemory(msgspec.Struct, frozen=True):
    """System RAM: ``free`` is MemAvailable (or the cgroup equivalent)."""

    total: int
    free: int


class Inventory(msgspec.Struct, frozen=True):
    gpus: tuple[Gpu, ...]
    host: HostMemory


class ModelFacts(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the estimate needs from one GGUF file (values of its metadata and tensor table).

    Per-layer tuples are indexed by block (``blk.N``); an empty tuple means "derive it":
    ``layer_bytes`` -> the file's weights spread evenly, ``head_count_kv_per_layer`` ->
    ``head_count_kv`` everywhere, ``sliding_layers`` -> the architecture's pattern when
    ``sliding_window > 0`` (Gemma 3: every 6th layer is global, the rest sliding; Gemma 2:
    every other layer sliding).
    """

    architecture: str
    file_size: int
    block_count: int
    n_ctx_train: int = 0  # 0 = unknown, no clamp
    embedding_length: int = 0
    head_count: int = 0
    head_count_kv: int = 0
    key_length: int = 0  # 0 = embedding_length // head_count
    value_length: int = 0  # 0 = embedding_length // head_count
    vocab_size: int = 0
    sliding_window: int = 0
    sliding_layers: tuple[bool, ...] = ()
    head_count_kv_per_layer: tuple[int, ...] = ()
    layer_bytes: tuple[int, ...] = ()  # weights of blk.N
    output_bytes: int = 0  # output_norm + output head (token_embd when tied): the "+1" layer
    token_embd_bytes: int = 0
    is_embedding_model: bool = False  # no completion capability -> parallel 1
    num_parallel: int = 0  # slots the model asks for at least (0: OLLAMA_NUM_PARALLEL alone)
    has_vision: bool = False  # num_ctx floor 2048
    projector_bytes: int = 0  # vision projector weights (loaded on the first GPU, or CPU)
    projector_graph: int = 0  # its encoder's compute buffer for one image


class RunnerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The options that decide how a runner is launched (a change forces a reload).

    In a request: as merged by the daemon (defaults <- Modelfile <- request); ``num_ctx_auto``
    / ``num_batch_auto`` say the value is the daemon's default rather than asked for.
    In :class:`~scheduler.events.StartRunner` and snapshots: the effective launch values
    (``num_ctx`` per slot after the n_ctx_train clamp, ``use_mmap`` resolved).
    """

    num_ctx: int = 4096
    num_batch: int = 512
    num_gpu: int = -1  # layers on GPU; -1 = automatic, 0 = CPU only
    main_gpu: int | None = None  # index into Inventory.gpus; None = scheduler's choice
    use_mmap: bool | None = None  # None = automatic
    num_thread: int = 0  # 0 = runtime default
    kv_cache_type: str = ""  # "" = f16; "q8_0" / "q4_0" honoured with flash attention on
    flash_attention: bool | None = None  # None = automatic
    num_ctx_auto: bool = False
    num_batch_auto: bool = False
    use_mmap_auto: bool = False  # set by the scheduler when it resolved use_mmap itself


class Estimate(msgspec.Struct, frozen=True):
    """Memory a model needs with given options (scheduler.estimate.estimate)."""

    layer_weights: tuple[int, ...]  # per block
    layer_kv: tuple[int, ...]  # per block, for the whole context (num_ctx x parallel)
    output_bytes: int
    graph_full: int  # compute buffer when every layer is on one backend
    graph_partial: int  # compute buffer per GPU when layers are split / partly on CPU
    file_size: int
    ctx_total: int
    kv_bytes_per_element: float
    projector: int = 0  # vision projector weights + compute, on the first GPU of a placement

    @property
    def block_count(self) -> int:
        return len(self.layer_weights)

    @property
    def kv_total(self) -> int:
        return sum(self.layer_kv)

    @property
    def layer_total(self) -> tuple[int, ...]:
        return tuple(w + k for w, k in zip(self.layer_weights, self.layer_kv, strict=True))

    @property
    def full_gpu_bytes(self) -> int:
        """All layers + output + KV + full graph on one GPU."""
        return (
            sum(self.layer_weights)
            + self.kv_total
            + self.output_bytes
            + self.graph_full
            + self.projector
        )

    @property
    def cpu_bytes(self) -> int:
        """The whole model on CPU: every tensor of the file + KV + compute graph."""
        return self.file_size + self.kv_total + self.graph_full + self.projector


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """Where one runner goes. ``gpus`` are ``Gpu.id`` values; ``gpu_bytes``/``tensor_split``
    are aligned with ``gpus``. ``n_gpu_layers`` counts blocks plus the output layer (llama.cpp
    ``-ngl``: ``block_count + 1`` = everything on GPU). ``tensor_split`` = layers per GPU.
    ``main_gpu`` indexes ``gpus``. CPU-only: ``gpus == ()``, ``n_gpu_layers == 0``."""

    n_gpu_layers: int = 0
    gpus: tuple[str, ...] = ()
    tensor_split: tuple[int, ...] = ()
    main_gpu: int = 0
    split_mode: str = "none"  # "none" (one device) or "layer"
    gpu_bytes: tuple[int, ...] = ()
    cpu_bytes: int = 0
    library: str = "cpu"

    @property
    def vram(self) -> int:
        return sum(self.gpu_bytes)

    @property
    def total(self) -> int:
        return self.vram + self.cpu_bytes

    @property
    def held(self) -> dict[str, int]:
        """GPU id -> bytes, for the GPUs this placement holds memory on (a GPU of ``gpus`` with
        a zero share holds none), in ``gpus`` order."""
        return {g: b for g, b in zip(self.gpus, self.gpu_bytes, strict=True) if b > 0}

    def bytes_on(self, gpu_id: str) -> int:
        for g, b in zip(self.gpus, self.gpu_bytes, strict=True):
            if g == gpu_id:
                return b
        return 0


class NoFit(msgspec.Struct, frozen=True):
    """Placement result when the model does not fit (``message`` set = it never will)."""

    reason: str
    message: str | None = None


class Priority(enum.IntEnum):
    """A request's class: lower values are served first (FIFO within a class, with aging)."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


# a class by its name (X-Corral-Priority, a key's or a model's ``priority``), in serving order
PRIORITIES: dict[str, Priority] = {p.name.lower(): p for p in Priority}


class ModelPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What the operator's policy file says about one model (the daemon resolves it by name and
    sends it with every request; the scheduler keeps the latest one per model).

    ``keep_alive`` and ``num_ctx`` defaults are applied by the daemon before the request gets
    here; the scheduler acts on the rest.
    """

    name: str = ""  # the model name, for messages
    num_parallel: int = 0  # slots per runner; 0 = Limits.num_parallel
    pinned: bool = False  # never evicted, never expires; kept beside every other load
    priority: Priority = Priority.NORMAL  # class of its requests that name none
    max_queue: int = 0  # its own queue limit (503 beyond it); 0 = only Limits.max_queue
    replicas: int = 1  # most runners of it at once
    gpus: tuple[str, ...] = ()  # Gpu.id values its runners may use; () = any


DEFAULT_POLICY = ModelPolicy()


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Scheduler knobs, taken from the daemon's Config."""

    max_loaded: int = 0  # OLLAMA_MAX_LOADED_MODELS; 0 = 3 x max(#GPUs, 1)
    num_parallel: int = 1  # OLLAMA_NUM_PARALLEL (slots per runner; embedding-only models get 1)
    max_queue: int = 512  # OLLAMA_MAX_QUEUE: every waiting request counts
    default_keep_alive: float = 300.0  # OLLAMA_KEEP_ALIVE; inf = never unload
    sched_spread: bool = False  # OLLAMA_SCHED_SPREAD
    gpu_overhead: int = 0  # OLLAMA_GPU_OVERHEAD, bytes kept free on every GPU
    # How long a stopped runner's memory stays reserved when the probes do not see it come back.
    reclaim_timeout: float = 5.0
    # Crash-loop backoff: after a load fails (its waiters got the error), a load of that model
    # with compatible options starts no sooner than ``load_backoff * 2**(n-1)`` seconds (at most
    # ``load_backoff_max``) after the start of the n-th failed one in a row; requests meanwhile
    # fail at once with the last failure's reason. 0 disables it.
    load_backoff: float = 1.0
    load_backoff_max: float = 30.0
    # Priorities: a waiting request moves up one class per ``priority_aging`` seconds waited
    # (CORRAL_PRIORITY_AGING), so a low request never starves.
    priority_aging: float = 30.0
    # Replicas: a model whose policy allows more runners gets another one when its oldest waiting
    # request has waited ``replica_after`` seconds; an extra replica idle for
    # ``replica_keep_alive`` seconds (or its keep-alive, if shorter) stops.
    replica_after: float = 1.0
    replica_keep_alive: float = 30.0


FOREVER = math.inf


# -- snapshot (Scheduler.snapshot(): an immutable view for /api/ps, metrics, logs) -----------


class RunnerState(StrEnum):
    """A runner as the scheduler believes it: loading -> ready -> [expiring] -> stopping."""

    LOADING = "loading"
    READY = "ready"
    EXPIRING = "expiring"  # ready, but no new grants: it stops once idle (a snapshot's word)
    STOPPING = "stopping"  # StopRunner sent


class RunnerView(msgspec.Struct, frozen=True, kw_only=True):
    runner_id: str
    model_key: str
    state: RunnerState
    options: RunnerOptions  # effective launch options (num_ctx per slot)
    placement: Placement  # actual memory once RunnerReady reported it
    parallel: int
    in_flight: int
    queued: int  # requests waiting for this model
    keep_alive: float  # sticky keep-alive (seconds, inf = forever)
    deadline: float | None  # idle expiry time (supervisor clock); None = busy/forever/not ready
    pid: int | None
    context_length: int  # per-slot context: reported by the runner, else the launch value
    started_at: float  # when StartRunner was emitted
    ready_at: float | None
    last_used: float  # last grant or release
    pinned: bool = False  # its policy pins it: never evicted, never expires
    replica: bool = False  # an extra runner of its model (expires and is evicted first)


class RequestState(StrEnum):
    """A request as ``Scheduler.requests`` shows it."""

    WAITING = "waiting"
    LOADING = "loading"  # waiting, and its model's runner is loading
    RUNNING = "running"  # granted a slot


class RequestView(msgspec.Struct, frozen=True, kw_only=True):
    """One request the scheduler holds (``Scheduler.requests(now)``, for GET /api/requests)."""

    req_id: int
    model_key: str
    state: RequestState
    priority: Priority  # its class as it arrived
    position: int  # 1-based place in its model's queue in service order; 0 when running
    waited: float  # s waited: until now, or until its grant when running
    runner_id: str | None = None


class GpuView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    library: str
    total: int
    free: int  # measured
    reserved: int  # by our runners (incl. stopped ones not yet seen released)
    usable: int  # min(free, total - reserved) - overhead - minimum, >= 0: room for a new runner


class SchedulerSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    runners: tuple[RunnerView, ...]
    waiting: dict[str, int]  # model_key -> requests waiting (all of them count for max_queue)
    # model_key -> requests waiting per class (high, normal, low) as they arrived
    waiting_classes: dict[str, tuple[int, int, int]] = {}
    queued: int  # total waiting
    in_flight: int
    max_loaded: int  # effective (auto resolved)
    gpus: tuple[GpuView, ...]
    host_total: int
    host_free: int
    host_reserved: int
    reclaiming: tuple[str, ...]  # runner ids stopped whose memory is still reserved
