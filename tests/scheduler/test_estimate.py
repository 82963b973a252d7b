"""Memory estimate from GGUF facts (reference §3.3) and the automatic values."""

from __future__ import annotations

import msgspec
import pytest

from corral.scheduler import ModelFacts, RunnerOptions
from corral.scheduler.estimate import (
    default_num_ctx,
    effective_num_ctx,
    estimate,
    is_out_of_memory,
    kv_bytes_per_element,
    lower_ctx_tier,
    minimum_memory,
    parallel_for,
    sliding_pattern,
)
from tests.scheduler.sched_harness import GiB, MiB

GEMMA3_270M = ModelFacts(
    architecture="gemma3",
    file_size=253_000_000,
    block_count=18,
    n_ctx_train=32768,
    embedding_length=640,
    head_count=4,
    head_count_kv=1,
    key_length=256,
    value_length=256,
    vocab_size=262144,
    sliding_window=512,
)
LLAMA3_8B = ModelFacts(
    architecture="llama",
    file_size=4_920_000_000,
    block_count=32,
    n_ctx_train=8192,
    embedding_length=4096,
    head_count=32,
    head_count_kv=8,
    vocab_size=128256,
)


def test_gemma3_270m_compute_graph_matches_llama_cpp() -> None:
    """llama.cpp really reserves ~514 MiB of compute buffer for Gemma 3 270M at batch 512."""
    est = estimate(GEMMA3_270M, RunnerOptions(num_ctx=4096, num_batch=512))
    assert est.graph_full == 4 * 512 * (640 + 262144)
    assert est.graph_full / MiB == pytest.approx(514, rel=0.01)


def test_gemma3_sliding_window_layers() -> None:
    pattern = sliding_pattern(GEMMA3_270M)
    assert [i for i, s in enumerate(pattern) if not s] == [5, 11, 17]  # every 6th is global
    est = estimate(GEMMA3_270M, RunnerOptions(num_ctx=4096, num_batch=512))
    per_cell = (256 + 256) * 1 * 2
    assert est.layer_kv[5] == 4096 * per_cell  # global layer: the whole context
    assert est.layer_kv[0] == (512 + 512) * per_cell  # sliding: window + ubatch
    assert est.kv_total == 3 * 4096 * per_cell + 15 * 1024 * per_cell


def test_sliding_window_is_per_slot_and_not_past_the_slot() -> None:
    """What llama.cpp allocates for the runner's context (one KV stream per slot, small
    sliding-window cache): Gemma 3 270M, 4 slots x 4096 at batch 512 logs 60.00 MiB for its 15
    sliding layers (1024 cells x 4 seqs) and 48.00 MiB for its 3 global ones."""
    per_cell = 512 * 2
    est = estimate(GEMMA3_270M, RunnerOptions(num_ctx=4096, num_batch=512), parallel=4)
    assert est.layer_kv[0] == 4 * 1024 * per_cell
    assert est.kv_total == 60 * MiB + 48 * MiB
    # a smaller batch: window + ubatch padded to 256 cells per slot (512 + 128 -> 768)
    small = estimate(GEMMA3_270M, RunnerOptions(num_ctx=4096, num_batch=128), parallel=2)
    assert small.layer_kv[0] == 2 * 768 * per_cell
    # never more than the slot's own context
    short = estimate(GEMMA3_270M, RunnerOptions(num_ctx=512, num_batch=512), parallel=4)
    assert short.ctx_total == 2048
    assert short.layer_kv[0] == 4 * 512 * per_cell


def test_explicit_sliding_layers_win() -> None:
    f = ModelFacts(
        architecture="x",
        file_size=0,
        block_count=3,
        embedding_length=64,
        head_count=1,
        head_count_kv=1,
        sliding_window=8,
        sliding_layers=(True, False, True),
    )
    assert sliding_pattern(f) == (True, False, True)


def test_llama3_8b_kv_per_token_is_128_kib() -> None:
    est = estimate(LLAMA3_8B, RunnerOptions(num_ctx=4096))
    assert est.kv_total == 4096 * 128 * 1024 == 512 * MiB


def test_context_is_num_ctx_times_parallel() -> None:
    one = estimate(LLAMA3_8B, RunnerOptions(num_ctx=4096), parallel=1)
    four = estimate(LLAMA3_8B, RunnerOptions(num_ctx=4096), parallel=4)
    assert four.ctx_total == 16384 and four.kv_total == 4 * one.kv_total


@pytest.mark.parametrize(
    ("kind", "fa", "bpe"),
    [
        ("", None, 2.0),
        ("f16", True, 2.0),
        ("q8_0", True, 34 / 32),
        ("q4_0", True, 18 / 32),
        ("q8_0", None, 2.0),
        ("q8_0", False, 2.0),
        ("q4_0", None, 2.0),
    ],
)
def test_quantized_kv_cache_only_with_flash_attention(kind, fa, bpe) -> None:
    assert kv_bytes_per_element(RunnerOptions(kv_cache_type=kind, flash_attention=fa)) == bpe


def test_weights_per_layer_from_tensor_sizes_or_spread_evenly() -> None:
    f = ModelFacts(
        architecture="x", file_size=1000, block_count=2, layer_bytes=(300, 500), output_bytes=150
    )
    est = estimate(f, RunnerOptions())
    assert est.layer_weights == (300, 500) and est.output_bytes == 150
    even = ModelFacts(architecture="x", file_size=1000, block_count=4, output_bytes=200)
    assert estimate(even, RunnerOptions()).layer_weights == (200, 200, 200, 200)


def test_generic_architecture_graph_and_metal() -> None:
    f = ModelFacts(
        architecture="bert",
        file_size=10,
        block_count=2,
        embedding_length=64,
        head_count=8,
        head_count_kv=2,
    )
    est = estimate(f, RunnerOptions(num_ctx=512))
    assert est.graph_full == est.graph_partial == (8 // 2) * est.kv_total // 6
    metal = estimate(LLAMA3_8B, RunnerOptions(num_ctx=4096), metal=True)
    assert metal.graph_partial == metal.graph_full


def test_partial_graph_is_larger_than_full_for_llama() -> None:
    est = estimate(LLAMA3_8B, RunnerOptions(num_ctx=4096))
    assert est.graph_partial > est.graph_full > 0


@pytest.mark.parametrize(
    ("num_ctx", "train", "vision", "expect"),
    [
        (2, 0, False, 4),
        (128, 0, True, 2048),
        (262144, 131072, False, 131072),
        (8192, 0, False, 8192),
        (128, 1024, True, 1024),
    ],
)
def test_effective_num_ctx(num_ctx, train, vision, expect) -> None:
    f = ModelFacts(
        architecture="x", file_size=0, block_count=1, n_ctx_train=train, has_vision=vision
    )
    assert effective_num_ctx(f, num_ctx) == expect


@pytest.mark.parametrize(
    ("totals", "overhead", "expect"),
    [
        ([], 0, 4096),
        ([16 * GiB], 0, 4096),
        ([24 * GiB], 0, 32768),
        ([24 * GiB], 2 * GiB, 4096),
        ([48 * GiB], 0, 262144),
        ([24 * GiB, 24 * GiB], 0, 262144),
    ],
)
def test_default_num_ctx_tiers(totals, overhead, expect) -> None:
    assert default_num_ctx(totals, overhead) == expect


def test_lower_ctx_tiers() -> None:
    assert [lower_ctx_tier(n) for n in (262144, 32768, 8192, 4096)] == [32768, 4096, 4096, None]


@pytest.mark.parametrize(
    ("message", "oom"),
    [
        ("cudaMalloc failed: out of memory", True),
        ("CUDA error: out of memory", True),
        ("ggml_vulkan: vk::Device::allocateMemory: ErrorOutOfDeviceMemory", True),
        ("hipMalloc failed: out of memory", True),
        ("failed to allocate buffer", True),
        ("VK_ERROR_OUT_OF_DEVICE_MEMORY", True),
        ("insufficient memory", True),
        ("simulated llama-server OOM crash", False),
        ("server parse failed", False),
    ],
)
def test_is_out_of_memory(message: str, oom: bool) -> None:
    assert is_out_of_memory(message) is oom


def test_parallel_for_embedding_and_single_sequence_models() -> None:
    emb = ModelFacts(architecture="nomic-bert", file_size=1, block_count=1, is_embedding_model=True)
    assert parallel_for(emb, 4) == 1
    assert parallel_for(ModelFacts(architecture="mllama", file_size=1, block_count=1), 4) == 1
    assert parallel_for(LLAMA3_8B, 4) == 4
    assert parallel_for(LLAMA3_8B, 0) == 1


def test_parallel_for_a_model_asking_for_slots() -> None:
    """The embedded model asks for 4: more than OLLAMA_NUM_PARALLEL 1, less than 8; a policy's
    num_parallel is what the operator wrote, either way."""
    tiny = msgspec.structs.replace(LLAMA3_8B, num_parallel=4)
    assert [parallel_for(tiny, n) for n in (1, 4, 8)] == [4, 4, 8]
    assert parallel_for(tiny, 1, policy=2) == 2 and parallel_for(LLAMA3_8B, 1, policy=3) == 3


def test_minimum_memory_by_backend() -> None:
    assert minimum_memory("cuda") == minimum_memory("rocm") == 457 * MiB
    assert minimum_memory("metal") == 512 * MiB
    assert minimum_memory("sim") == 0
