"""Wire types shared by the daemon and the runner child process.

Everything that crosses the process boundary is a msgspec Struct defined here and encoded as JSON:
the ``LaunchSpec`` the daemon writes on the child's stdin and the completion requests that follow
it there (``Submit``, ``Cancel``), the lifecycle and completion events the child writes on its
stdout (one JSON line each), and the bodies of the runner's HTTP API. Every message carries a
``type`` tag; top-level launch/event messages also carry ``version`` (``Literal[1]``), so a message
from a different protocol version or with an unknown tag fails to decode instead of being guessed
at. No pickle anywhere.

This module imports msgspec and the stdlib only: the daemon imports it, and must never pull in
llama.cpp through it.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Version = Literal[1]
PROTOCOL_VERSION: Version = 1
# why a generation ended: a stop (EOS, a stop string) or a length limit (num_predict, the slot)
DoneReason = Literal["stop", "length"]

# ----------------------------------------------------------------------------------------------
# Launch spec (daemon -> runner, one JSON line on stdin)


class MemoryUse(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes llama.cpp allocated on one device, from its buffer-size log lines."""

    weights: int = 0
    kv: int = 0
    compute: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


class FakeKnobs(msgspec.Struct, frozen=True, kw_only=True):
    """Behaviour of the FakeEngine (``LaunchSpec.engine == "fake"``), for tests of the daemon."""

    load_time: float = 0.0  # seconds the load takes (Loading progress is reported meanwhile)
    tokens_per_second: float = 1000.0  # per sequence; sequences run concurrently up to `parallel`
    fail_load: str | None = (
        None  # the load fails with LoadFailed(reason=fail_load, oom=fail_load_oom)
    )
    fail_load_oom: bool = False  # the load fails as out of memory (reason defaults to an OOM text)
    crash_after_tokens: int | None = (
        None  # the process exits hard (os._exit(1)) after N tokens total
    )
    ignore_sigterm: bool = False  # SIGTERM is ignored (the daemon must escalate to SIGKILL)
    # tokens before the fake's "end of turn" when num_predict is -1 (huge: a model that never
    # ends its turn, which only num_ctx-bound limits stop)
    default_num_predict: int = 16
    embedding_dim: int = 8
    memory: dict[str, MemoryUse] | None = None  # Ready.memory to report; None: see gpu_offload
    # With memory None: a CPU placement reports a small CPU figure. A GPU placement
    # (n_gpu_layers > 0) reports nothing when gpu_offload (the daemon keeps its estimate: the fake
    # measures no device), and everything on "CPU" when not, as a CPU-only llama.cpp build does.
    gpu_offload: bool = True
    # The load hangs without a sign of life (no progress, no output; a stuck driver or disk)
    # for as long as this file exists, then carries on.
    hang_load_while: str | None = None
    # After its first token a sequence decodes nothing for as long as this file exists (a
    # stream a test holds open however slow the machine), then carries on.
    hold_tokens_while: str | None = None


class KvCacheSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how much a runner may keep of its slots' prompt caches beyond its own life
    (runner/kvcache.py, docs/DESIGN.md "Saved prompt caches"). The daemon fills it from
    CORRAL_KV_CACHE_DIR / _SIZE / _MEMORY."""

    dir: str  # the cache directory (one subdirectory per cache key)
    disk_bytes: int  # the directory's cap: least recently used files go first
    memory_bytes: int  # saved bytes kept in the page cache (the rest is dropped from memory)


KvCacheType = Literal["f16", "f32", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


class LaunchSpec(msgspec.Struct, frozen=True, kw_only=True, tag="launch", tag_field="type"):
    """How to load one model. ``num_ctx`` is per slot: the context holds num_ctx * parallel."""

    version: Version = PROTOCOL_VERSION
    model_path: str
    projector_path: str | None = None  # a vision projector (mmproj GGUF) loaded with libmtmd
    engine: Literal["llama", "fake"] = "llama"
    num_ctx: int = 4096
    parallel: int = 1
    n_gpu_layers: int = -1  # -1: all layers (llama.cpp clamps); 0: CPU only
    main_gpu: int = 0
    tensor_split: list[float] | None = None
    split_mode: Literal["none", "layer", "row"] = "layer"
    flash_attention: bool | None = None  # None: llama.cpp decides (auto)
    kv_cache_type: KvCacheType = "f16"
    # llama.cpp's full-size sliding-window cache (llama-server --swa-full): every sliding layer
    # holds num_ctx cells per slot. False (llama-server's default): num_swa + ubatch cells per
    # slot, and a prompt is reused past the window through the slot's checkpoint
    swa_full: bool = False
    use_mmap: bool = True
    num_thread: int = 0  # 0: llama.cpp's default (physical cores)
    num_batch: int = 512
    embedding: bool = False  # an embedding model: load the embedding context up front
    shift: bool = True  # context shift when a generation fills its slot (else done_reason "length")
    # a generation ends with done_reason "length" after predict_limit x num_ctx generated tokens,
    # whatever num_predict asks (the daemon sets CORRAL_PREDICT_LIMIT); 0 = no limit
    predict_limit: int = 0
    grace_period: float = (
        5.0  # seconds in-flight work may run on after SIGTERM before it is cancelled
    )
    verbose: bool = False  # llama.cpp's debug log and the runner's debug lines on stderr
    kv_cache: KvCacheSpec | None = None  # None: the slots' prompt caches die with the runner
    fake: FakeKnobs = msgspec.field(default_factory=FakeKnobs)


# ----------------------------------------------------------------------------------------------
# Lifecycle events (runner -> daemon, one JSON line each on stdout)


class Loading(msgspec.Struct, frozen=True, kw_only=True, tag="loading", tag_field="type"):
    version: Version = PROTOCOL_VERSION
    progress: float = 0.0  # 0..1


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready", tag_field="type"):
    version: Version = PROTOCOL_VERSION
    port: int  # on 127.0.0.1
    pid: int
    n_ctx: int  # whole context: n_ctx_per_slot * parallel
    n_ctx_per_slot: int
    parallel: int
    n_ctx_train: int = 0
    memory: dict[str, MemoryUse] = msgspec.field(default_factory=dict)  # device name -> bytes
    load_duration: int = 0  # ns the model load took inside the runner


class LoadFailed(msgspec.Struct, frozen=True, kw_only=True, tag="failed", tag_field="type"):
    version: Version = PROTOCOL_VERSION
    reason: str
    oom: bool = False


class Warm(msgspec.Struct, frozen=True, kw_only=True, tag="warm", tag_field="type"):
    """A spare runner (``--spare ENGINE``) has done its warm-up (imports, llama.cpp's backend)
    and waits for its LaunchSpec: a load sent to it now starts at once. Its first line; a runner
    spawned with its spec never writes it."""

    version: Version = PROTOCOL_VERSION


# the handshake (Warm first from a spare); after Ready: PipeEvent
RunnerEvent = Warm | Loading | Ready | LoadFailed


class KvCacheReport(msgspec.Struct, frozen=True, kw_only=True, tag="kvcache", tag_field="type"):
    """What the saved prompt cache did since the runner's previous report (counts, not totals):
    after Ready, on the event pipe, when a request restored or missed and after the saves at
    the runner's stop."""

    version: Version = PROTOCOL_VERSION
    saves: int = 0  # prefixes written
    saved_bytes: int = 0
    restores: int = 0  # prefixes read back into a slot (hits)
    restored_tokens: int = 0
    restored_bytes: int = 0
    misses: int = 0  # cold admits (no usable prefix in the runner's slots) with nothing to restore
    dropped: int = 0  # files refused and removed (corrupt, truncated, unloadable)
    failed_saves: int = 0  # saves given up (full disk, over the cap, past the stop deadline)


# ----------------------------------------------------------------------------------------------
# Engine probe (``python -m corral.runner --probe``: one JSON line on stdout, no model loaded)


class EngineDevice(msgspec.Struct, frozen=True, kw_only=True):
    """One device as llama.cpp's backend registry sees it (bytes)."""

    name: str  # "CPU", "CUDA0", "Metal", "ROCm0", "Vulkan0"...
    description: str = ""  # "NVIDIA A100-SXM4-80GB", "Apple M2 Max", the CPU's model name
    type: Literal["cpu", "gpu", "igpu", "accel", "meta", "unknown"] = "unknown"
    backend: str = ""  # the registry's name: "CPU", "CUDA", "ROCm", "Metal", "Vulkan", "BLAS"
    total: int = 0
    free: int = 0


# ggml backend registry names that drive GPUs
_GPU_BACKEND_NAMES = frozenset({"cuda", "rocm", "hip", "metal", "mtl", "vulkan", "sycl", "musa"})
# scripts/install-llama.sh's backend (the build record) -> the name llama.cpp registers it under
_BUILT_BACKEND = {"cuda": "CUDA", "vulkan": "Vulkan", "hip": "ROCm", "metal": "Metal"}


class EngineProbe(msgspec.Struct, frozen=True, kw_only=True, tag="probe", tag_field="type"):
    """What the engine this runner was built with can do."""

    version: Version = PROTOCOL_VERSION
    llama_cpp_python: str = ""  # the package version
    gpu_offload: bool = False  # llama_supports_gpu_offload()
    devices: list[EngineDevice] = msgspec.field(default_factory=list)
    system_info: str = ""  # llama_print_system_info(): the CPU features compiled in
    build: dict[str, str] = msgspec.field(default_factory=dict)  # scripts/install-llama.sh's record
    error: str | None = None  # the engine could not be loaded at all (the daemon uses CPU only)
    # the backends compiled in ("CUDA", "Vulkan", "CPU"), devices or not, and what llama.cpp
    # logged as a warning or error while they looked for devices ("ggml_cuda_init: failed to
    # initialize CUDA: ..."): a GPU build on a machine whose GPU it cannot use says why
    backends: list[str] = msgspec.field(default_factory=list)
    backend_errors: list[str] = msgspec.field(default_factory=list)

    def gpu_backends(self) -> set[str]:
        """Backend names (lower case) of the GPU-like devices, e.g. {"cuda"}, {"metal"}."""
        return {d.backend.lower() for d in self.devices if d.type in ("gpu", "igpu")}

    def idle_gpu_backends(self) -> list[str]:
        """GPU backends compiled in that found no device (a CUDA build without a GPU or driver),
        as llama.cpp names them; the CPU and accelerator-only backends (BLAS, RPC) never count.

        Also the build's own GPU backend when llama.cpp did not register it at all: ggml-vulkan
        drops itself, silently, where the Vulkan loader finds no driver (no ICD), seen here."""
        with_devices = {d.backend.lower() for d in self.devices}
        idle = [
            b
            for b in self.backends
            if b.lower() not in with_devices and b.lower() in _GPU_BACKEND_NAMES
        ]
        unregistered = self.unregistered_gpu_backend()
        return [*idle, unregistered] if unregistered else idle

    def unregistered_gpu_backend(self) -> str | None:
        """The build's GPU backend when llama.cpp did not register it (see idle_gpu_backends)."""
        built = _BUILT_BACKEND.get(self.build.get("backend", ""))
        if built and self.backends and built.lower() not in {b.lower() for b in self.backends}:
            return built
        return None


_probe_decoder = msgspec.json.Decoder(EngineProbe)


def decode_probe(line: bytes | str) -> EngineProbe:
    """Raise msgspec.ValidationError/DecodeError on a bad probe line."""
    return _probe_decoder.decode(line)


_launch_decoder = msgspec.json.Decoder(LaunchSpec)
_encoder = msgspec.json.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    """JSON bytes without a newline."""
    return _encoder.encode(msg)


def decode_launch(line: bytes | str) -> LaunchSpec:
    return _launch_decoder.decode(line)


# ----------------------------------------------------------------------------------------------
# Runner HTTP API bodies


class SamplingOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Ollama's predict options (api.Options) with Ollama's defaults. Unknown keys are ignored.
    The daemon builds it from typed request options (``daemon.params.RequestOptions.sampling``)."""

    num_keep: int = 4
    seed: int = -1  # -1: random
    num_predict: int = -1  # -1: until EOS or the context is full (with shift: unbounded); -2: fill
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_last_n: int = 64  # 0 off, -1 = num_ctx
    temperature: float = 0.8
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = msgspec.field(default_factory=list)


Format = Literal["json"] | dict[str, Any] | None


MAX_TOP_LOGPROBS = 20


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One candidate token: its text (the token's bytes decoded, U+FFFD for a partial UTF-8
    character), natural-log probability and raw bytes."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A generated token's log probability under the model's distribution at that step
    (log-softmax of the logits, before temperature/top-k/top-p), with the ``top_logprobs`` most
    likely tokens of that distribution (empty unless asked for)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class CompletionRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly one of ``prompt`` (text; special tokens are parsed) and ``tokens`` is used; when
    both are given, ``tokens`` come first and ``prompt`` is tokenized and appended (generate's
    context)."""

    prompt: str | None = None
    tokens: list[int] | None = None
    options: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    format: Format = None  # "json" or a JSON schema: output constrained by a llama.cpp grammar
    # (opening, closing) thinking tags: the format grammar applies only once the model is past
    # its thinking, i.e. the generated text contains the closing tag, or (opening tag not "")
    # the text has started with something that is not the opening tag. None: from the start.
    format_after: tuple[str, str] | None = None
    logprobs: bool = False  # each generated token's log probability in the chunks / done record
    top_logprobs: int = 0  # 0..MAX_TOP_LOGPROBS most likely alternatives per token (with logprobs)
    stream: bool = True
    add_special: bool = True  # add BOS etc. when tokenizing `prompt` (ignored for `tokens`)
    shift: bool | None = None  # None: the LaunchSpec's setting
    truncate: bool = True  # a prompt longer than the slot keeps num_keep + the tail; else 400
    images: list[bytes] = msgspec.field(default_factory=list)  # base64 in JSON; "[img-N]" in
    # the prompt is images[N] (a runner without a projector leaves the markers as text)


class CompletionChunk(
    msgspec.Struct, frozen=True, kw_only=True, tag="chunk", tag_field="type", omit_defaults=True
):
    content: str  # whole UTF-8 characters only
    # with logprobs: the tokens sampled since the previous chunk (their text may still be held
    # back, e.g. as a possible stop string; a token is never reported twice)
    logprobs: list[TokenLogprob] | None = None


class CompletionDone(msgspec.Struct, frozen=True, kw_only=True, tag="done", tag_field="type"):
    content: str = ""  # the whole text when stream=false, else ""
    done_reason: DoneReason = "stop"
    prompt_eval_count: int = 0  # the whole prompt's tokens (image cells included), cached or not
    prompt_eval_cached_count: int = 0  # of those, the ones the slot's prompt cache already held
    prompt_eval_duration: int = 0  # ns, evaluating the others
    eval_count: int = 0  # tokens generated
    eval_duration: int = 0  # ns
    tokens: list[int] = msgspec.field(
        default_factory=list
    )  # prompt + generated (generate's context)
    truncated: bool = False  # the prompt was truncated to fit the slot
    # with logprobs: the tokens not yet reported in a chunk (all of them when stream=false)
    logprobs: list[TokenLogprob] | None = None


class CompletionError(msgspec.Struct, frozen=True, kw_only=True, tag="error", tag_field="type"):
    error: str


CompletionEvent = CompletionChunk | CompletionDone | CompletionError
_completion_event_decoder = msgspec.json.Decoder(CompletionEvent)


def decode_completion_event(
    line: bytes | str,
) -> CompletionChunk | CompletionDone | CompletionError:
    return _completion_event_decoder.decode(line)


# ----------------------------------------------------------------------------------------------
# The request pipe (daemon -> runner, the child's stdin after the LaunchSpec line, one JSON line
# each) and its answers on the event pipe (runner -> daemon, after Ready)


class Submit(msgspec.Struct, frozen=True, kw_only=True, tag="completion", tag_field="type"):
    """A completion for the runner's engine; every event of it comes back up the event pipe
    with ``id`` (Relay, RelayStep), or one Refused line. ``id`` >= 1, unique per runner while
    the request is open."""

    id: int
    request: CompletionRequest


class Cancel(msgspec.Struct, frozen=True, kw_only=True, tag="cancel", tag_field="type"):
    """The daemon gave up request ``id`` (its client went away, DELETE /api/requests): the job
    stops at the engine's next step and nothing more comes for it. An unknown id (the job has
    ended already) is ignored."""

    id: int


PipeRequest = Submit | Cancel
# the longest request a runner takes, a Submit line or an HTTP body (the daemon refuses a longer
# Submit with 413 itself: the runner never reads it)
MAX_REQUEST = 64 << 20
_pipe_request_decoder = msgspec.json.Decoder(PipeRequest)


def decode_pipe_request(line: bytes | str) -> Submit | Cancel:
    """Raise msgspec.ValidationError/DecodeError on an unknown tag or a bad field."""
    return _pipe_request_decoder.decode(line)


class Refused(msgspec.Struct, frozen=True, kw_only=True, tag="refused", tag_field="type"):
    """Request ``id`` was not started, for the reason an HTTP status would give: 400 a bad
    request (the engine's BadRequest, a line that does not decode), 503 the runner is
    draining, 500 the runner's own failure. Its only answer."""

    id: int
    status: int
    error: str


class Relay(msgspec.Struct, frozen=True, kw_only=True, tag="relay", tag_field="type"):
    """One completion event of request ``id`` (a Submit) on the event pipe."""

    id: int
    event: CompletionEvent


class RelayStep(msgspec.Struct, frozen=True, kw_only=True, tag="step", tag_field="type"):
    """The text of one decode step for several streamed requests, one line for all of them:
    ``content[i]`` is a CompletionChunk (without logprobs) of request ``ids[i]``. A step writes
    it before its Relay lines (a request's last chunk comes before its done)."""

    ids: list[int]
    content: list[str]


PipeEvent = RunnerEvent | Relay | RelayStep | Refused | KvCacheReport
_event_decoder: msgspec.json.Decoder[PipeEvent] = msgspec.json.Decoder(PipeEvent)


def decode_event(
    line: bytes | str,
) -> Warm | Loading | Ready | LoadFailed | Relay | RelayStep | Refused | KvCacheReport:
    """Raise msgspec.ValidationError/DecodeError on an unknown tag, version or a bad field."""
    return _event_decoder.decode(line)


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True):
    input: list[str]
    truncate: bool = True


class EmbedResponse(msgspec.Struct, frozen=True, kw_only=True):
    embeddings: list[list[float]]  # L2-normalised, one per input
    prompt_eval_count: int = 0  # tokens over all inputs


class TokenizeRequest(msgspec.Struct, frozen=True, kw_only=True):
    content: str
    add_special: bool = False
    parse_special: bool = True


class TokenizeResponse(msgspec.Struct, frozen=True, kw_only=True):
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, frozen=True, kw_only=True):
    tokens: list[int]


class DetokenizeResponse(msgspec.Struct, frozen=True, kw_only=True):
    content: str


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ok", "loading", "draining"] = "ok"
    slots_total: int = 0
    slots_busy: int = 0
    queued: int = 0
    kv_used: int = 0  # KV cells held by running sequences (a finished slot's cache is free)
    kv_total: int = 0  # KV cells of the context (n_ctx)


class ErrorResponse(msgspec.Struct, frozen=True, kw_only=True):
    error: str
