"""Memory estimate from GGUF facts (Ollama's classic estimator, reference §3.3), pure.

``estimate(facts, options, parallel, metal=False) -> Estimate`` gives per-block weights and KV
cache, the output layer and the compute-graph sizes; placement.py distributes them.

Rules kept from Ollama's estimator:

1. Weights per block from the tensor table (``ModelFacts.layer_bytes``); without it the file's
   bytes minus the output layer spread evenly over the blocks.
2. KV cache per block = cells x (key_length + value_length) x head_count_kv x bytes/element.
   Cells = ``num_ctx x parallel``; sliding-window blocks (Gemma 3: 5 of every 6) hold what
   the runner's llama.cpp context allocates with its small sliding-window cache (one KV stream
   per slot, ``swa_full`` off): per slot ``sliding_window + ubatch`` cells (``ubatch = min(batch,
   512)``) padded to 256, at most ``num_ctx`` (Ollama's unified cache: ``parallel x
   sliding_window + batch`` in all).
3. Bytes per element: f16 2; q8_0 and q4_0 use ggml's block sizes (34/32 and 18/32 bytes) and
   only when flash attention is explicitly on (llama.cpp needs it for a quantized V cache);
   otherwise f16 (the larger, safe number).
4. Compute graph per architecture family (llama, gemma, qwen2; a generic rule otherwise) with
   ``batch = min(num_ctx, num_batch)``; on Metal the partial graph equals the full one.
   For Gemma 3 270M at batch 512 the full graph is 4 x 512 x (640 + 262144) bytes, about
   514 MiB - what llama.cpp really reserves for its compute buffer.
5. A vision projector adds its weights and its encoder's compute buffer
   (:func:`projector_graph`), held on the first GPU of the placement (Ollama's rule), or on CPU.
"""

from __future__ import annotations

from .types import Estimate, GiB, MiB, ModelFacts, RunnerOptions

# llama.cpp architectures that only run one sequence (Ollama forces OLLAMA_NUM_PARALLEL to 1).
SINGLE_PARALLEL_ARCHS = frozenset(
    {
        "mllama",
        "qwen3vl",
        "qwen3vlmoe",
        "qwen35",
        "qwen35moe",
        "qwen3next",
        "lfm2",
        "lfm2moe",
        "nemotron_h",
        "nemotron_h_moe",
        "nemotron_h_omni",
    }
)

_KV_BYTES = {"f16": 2.0, "": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# Substrings (lower case) by which a runner's error is an out-of-memory condition (§2.4; Ollama's
# IsOutOfMemory). The one list: load failures, stderr tails and run-time errors all use it.
OOM_MARKERS = (
    "out of memory",
    "out of device memory",
    "cudamalloc failed",
    "hipmalloc failed",
    "failed to allocate",
    "allocation failed",
    "not enough memory",
    "insufficient memory",
    "vk_error_out_of_device_memory",
    "erroroutofmemory",
    "erroroutofdevicememory",
)


def is_out_of_memory(message: str) -> bool:
    """Whether a runner's error text says it ran out of memory (:data:`OOM_MARKERS`, any case)."""
    low = message.lower()
    return any(m in low for m in OOM_MARKERS)


def minimum_memory(library: str) -> int:
    """Memory a backend keeps for itself on each device (Ollama's ``MinimumMemory``)."""
    lib = library.lower()
    if lib == "metal":
        return 512 * MiB
    if lib in ("cuda", "rocm"):
        return 457 * MiB
    return 0


def parallel_for(facts: ModelFacts, num_parallel: int, policy: int = 0) -> int:
    """Slots for a runner of this model: 1 for embedding-only models and single-sequence archs;
    else the policy's ``num_parallel`` when it has one; else OLLAMA_NUM_PARALLEL, or the model's
    own ``num_parallel`` when that is more."""
    if facts.is_embedding_model or facts.architecture in SINGLE_PARALLEL_ARCHS:
        return 1
    if policy > 0:
        return policy
    return max(1, num_parallel, facts.num_parallel)


def effective_num_ctx(facts: ModelFacts, num_ctx: int) -> int:
    """Per-slot context after Ollama's floors (4; 2048 with vision) and the n_ctx_train clamp."""
    n = max(4, num_ctx)
    if facts.has_vision:
        n = max(n, 2048)
    if facts.n_ctx_train > 0:
        n = min(n, facts.n_ctx_train)
    return n


def kv_bytes_per_element(options: RunnerOptions) -> float:
    kind = options.kv_cache_type.lower()
    if options.flash_attention is True and kind in _KV_BYTES:
        return _KV_BYTES[kind]
    return 4.0 if kind == "f32" else 2.0


def sliding_pattern(facts: ModelFacts) -> tuple[bool, ...]:
    """Which blocks use the sliding window (True) - explicit, else by architecture."""
    n = facts.block_count
    if facts.sliding_window <= 0:
        return (False,) * n
    if facts.sliding_layers:
        return tuple(
            facts.sliding_layers[i] if i < len(facts.sliding_layers) else False for i in range(n)
        )
    arch = facts.architecture
    if arch.startswith("gemma3"):
        return tuple((i + 1) % 6 != 0 for i in range(n))
    if arch == "gemma2":
        return tuple(i % 2 == 0 for i in range(n))
    return (True,) * n


def _head_dims(facts: ModelFacts) -> tuple[int, int]:
    default = facts.embedding_length // facts.head_count if facts.head_count else 0
    return facts.key_length or default, facts.value_length or default


def _heads_kv(facts: ModelFacts) -> tuple[int, ...]:
    n = facts.block_count
    if facts.head_count_kv_per_layer:
        per = facts.head_count_kv_per_layer
        return tuple(per[i] if i < len(per) else per[-1] for i in range(n))
    return (facts.head_count_kv or facts.head_count,) * n


def _layer_weights(facts: ModelFacts) -> tuple[int, ...]:
    n = facts.block_count
    if facts.layer_bytes and len(facts.layer_bytes) == n:
        return tuple(facts.layer_bytes)
    if n <= 0:
        return ()
    rest = max(0, facts.file_size - facts.output_bytes - facts.token_embd_bytes)
    return (rest // n,) * n


def graph_size(
    facts: ModelFacts, ctx_total: int, batch: int, kv_total: int, metal: bool = False
) -> tuple[int, int]:
    """(full, partial) compute-graph bytes (§3.3.4)."""
    e = facts.embedding_length
    h = max(1, facts.head_count)
    hkv = min(_heads_kv(facts)) if facts.block_count else 1
    hkv = max(1, hkv)
    v = facts.vocab_size
    c = ctx_total
    b = batch
    dk, _ = _head_dims(facts)
    dh = e // h if h else 0
    arch = facts.architecture
    if arch in ("llama", "llama4", "mistral", "granite"):
        full = max(4 * b * (1 + 4 * e + c * (1 + h)), 4 * b * (e + v))
        partial = 4 * b * e + max(
            4 * b * (1 + e + max(c, e)) + e * e * 9 // 16 + 4 * c * (b * h + dh * hkv),
            4 * b * (e + v) + e * v * 105 // 128,
        )
    elif arch.startswith("gemma"):
        full = max(4 * b * (e + v), 4 * b * (2 + c + c * h + 2 * e + 2 * dk * h))
        partial = max(
            4 * e * b + e * v * 105 // 128 + 4 * v * b,
            4 * b * (2 * e + 1 + 2 * dk * h + c + c * h) + 4 * dk * c * 8 + e * dk * h * 9 // 16,
        )
        if arch == "gemma3n":
            full, partial = 4 * full, 4 * partial
    elif arch == "qwen2":
        full = max(4 * b * (e + v), 4 * b * (1 + 2 * e + c + c * h))
        partial = max(
            4 * b * (e + v) + e * v * 105 // 128, 4 * (b * (1 + 2 * e + c * (1 + h)) + e * (1 + c))
        )
    else:
        partial = (h // hkv) * kv_total // 6
        full = partial
    if metal:
        partial = full
    return full, partial


def estimate(
    facts: ModelFacts, options: RunnerOptions, parallel: int = 1, metal: bool = False
) -> Estimate:
    """Memory for ``facts`` launched with ``options`` (``num_ctx`` per slot) and ``parallel``."""
    num_ctx = effective_num_ctx(facts, options.num_ctx)
    ctx_total = num_ctx * max(1, parallel)
    batch = max(1, min(num_ctx, options.num_batch))
    bpe = kv_bytes_per_element(options)
    k, v = _head_dims(facts)
    heads = _heads_kv(facts)
    sliding = sliding_pattern(facts)
    ubatch = min(batch, 512)
    swa_cells = max(1, parallel) * min(num_ctx, -(-(facts.sliding_window + ubatch) // 256) * 256)
    kv = tuple(
        int((swa_cells if sliding[i] else ctx_total) * (k + v) * heads[i] * bpe)
        for i in range(facts.block_count)
    )
    weights = _layer_weights(facts)
    full, partial = graph_size(facts, ctx_total, batch, sum(kv), metal=metal)
    return Estimate(
        layer_weights=weights,
        layer_kv=kv,
        output_bytes=facts.output_bytes,
        graph_full=full,
        graph_partial=partial,
        file_size=facts.file_size,
        ctx_total=ctx_total,
        kv_bytes_per_element=bpe,
        projector=facts.projector_bytes + facts.projector_graph,
    )


def projector_graph(
    image_size: int, patch_size: int, embedding_length: int, head_count: int
) -> int:
    """Compute buffer of a CLIP-style vision encoder for one image (our rule, f32): the input
    image, and per patch (+ a class token) the attention scores of every head over all patches
    plus four embedding-wide activations."""
    if image_size <= 0 or patch_size <= 0:
        return 0
    n = (image_size // patch_size) ** 2 + 1
    return 4 * (3 * image_size * image_size + n * (n * max(1, head_count) + 4 * embedding_length))


# -- automatic values ------------------------------------------------------------------------


def default_num_ctx(gpu_totals: list[int] | tuple[int, ...], gpu_overhead: int = 0) -> int:
    """Ollama's default ``num_ctx`` when OLLAMA_CONTEXT_LENGTH is 0: a tier by total VRAM."""
    vram = sum(max(0, t - gpu_overhead) for t in gpu_totals)
    if vram >= 47 * GiB:
        return 262144
    if vram >= 23 * GiB:
        return 32768
    return 4096


def lower_ctx_tier(num_ctx: int) -> int | None:
    """The next automatic context tier after an out-of-memory load, or None."""
    if num_ctx > 32768:
        return 32768
    if num_ctx > 4096:
        return 4096
    return None


_SURCHARGE = {2048: 2 * GiB, 1024: 768 * MiB, 512: 0}


def batch_surcharge(batch: int) -> int:
    if batch >= 2048:
        return _SURCHARGE[2048]
    if batch >= 1024:
        return _SURCHARGE[1024]
    return 0


def auto_batch(
    ctx: int,
    predicted: int,
    available: int,
    *,
    flash_attention_off: bool = False,
    cuda_small_gpu: bool = False,
) -> int:
    """Ollama's automatic generation batch (§3.1.2).

    ``ctx`` = effective total context; ``predicted``/``available`` bytes (0 = unknown);
    ``flash_attention_off`` with a CUDA device selected; ``cuda_small_gpu`` = a CUDA GPU with
    <= 8 GiB.
    """
    if flash_attention_off:
        return 256 if ctx > 4096 and cuda_small_gpu else 512
    batch = 2048 if ctx > 32768 else 1024 if ctx > 4096 else 512

    def fits(b: int) -> bool:
        if predicted <= 0 or available <= 0:
            return True
        budget = 0.8 * available
        if predicted > budget:
            return False
        if b >= 2048 and predicted > 0.60 * available:
            return False
        if b >= 1024 and predicted > 0.75 * available:
            return False
        return batch_surcharge(b) <= budget - predicted

    while batch > 512 and not fits(batch):
        batch //= 2
    return batch
