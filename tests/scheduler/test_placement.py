"""Placement rules (scheduler/placement.py), table-driven."""

from __future__ import annotations

import pytest

from corral.scheduler import Gpu, NoFit, Placement, RunnerOptions
from corral.scheduler.estimate import estimate
from corral.scheduler.placement import human_bytes2, place, usable_memory
from tests.scheduler.sched_harness import GB, cuda, facts


def est(size: int, blocks: int = 10):
    return estimate(facts(size, blocks=blocks), RunnerOptions())


def rooms(*gpus: Gpu) -> list[tuple[Gpu, int]]:
    return [(g, g.free) for g in gpus]


@pytest.mark.parametrize(
    ("total", "free", "reserved", "overhead", "minimum", "expect"),
    [
        (24, 24, 0, 0, 0, 24),
        (24, 12, 0, 0, 0, 12),  # measured free is smaller
        (24, 24, 10, 0, 0, 14),  # our reservations are not yet visible in free
        (24, 14, 10, 0, 0, 14),  # both agree: not counted twice
        (24, 24, 10, 2, 1, 11),  # minus OLLAMA_GPU_OVERHEAD and the backend minimum
        (24, 24, 30, 0, 0, 0),  # never negative
    ],
)
def test_usable_memory_trusts_the_smaller_number(
    total, free, reserved, overhead, minimum, expect
) -> None:
    g = Gpu(
        id="0",
        name="g",
        library="cuda",
        total=total * GB,
        free=free * GB,
        min_overhead=minimum * GB,
    )
    assert usable_memory(g, reserved * GB, overhead * GB) == expect * GB


def test_num_gpu_zero_is_cpu() -> None:
    p = place(est(4 * GB), RunnerOptions(num_gpu=0), rooms(cuda("0", 24 * GB)), 64 * GB)
    assert p == Placement(cpu_bytes=4 * GB)


def test_single_gpu_when_it_fits_most_room_first() -> None:
    p = place(est(4 * GB), RunnerOptions(), rooms(cuda("0", 8 * GB), cuda("1", 16 * GB)), 64 * GB)
    assert (p.gpus, p.n_gpu_layers, p.tensor_split, p.split_mode) == (("1",), 11, (), "none")
    assert p.gpu_bytes == (4 * GB,) and p.cpu_bytes == 0


def test_split_over_the_fewest_gpus_largest_first() -> None:
    gpus = rooms(cuda("0", 6 * GB), cuda("1", 8 * GB), cuda("2", 4 * GB))
    p = place(est(12 * GB, blocks=12), RunnerOptions(), gpus, 64 * GB)
    assert isinstance(p, Placement)
    assert p.gpus == ("1", "0") and p.split_mode == "layer"
    assert p.tensor_split == (8, 5) and sum(p.tensor_split) == p.n_gpu_layers == 13
    assert p.gpu_bytes == (8 * GB, 4 * GB) and p.cpu_bytes == 0


def test_split_stays_within_one_backend() -> None:
    rocm = Gpu(id="r", name="r", library="rocm", total=6 * GB, free=6 * GB)
    gpus = rooms(cuda("0", 8 * GB), rocm)
    assert isinstance(place(est(12 * GB), RunnerOptions(), gpus, 64 * GB), NoFit)


def test_spread_uses_every_gpu_of_the_best_backend_in_proportion() -> None:
    gpus = rooms(cuda("0", 10 * GB), cuda("1", 30 * GB))
    p = place(est(8 * GB, blocks=40), RunnerOptions(), gpus, 64 * GB, spread=True)
    assert set(p.gpus) == {"0", "1"}
    split = dict(zip(p.gpus, p.tensor_split, strict=True))
    assert split["1"] > split["0"] > 0


def test_no_fit_without_partial_and_partial_when_alone() -> None:
    gpus = rooms(cuda("0", 10 * GB))
    assert place(est(20 * GB), RunnerOptions(), gpus, 64 * GB) == NoFit("gpu")
    p = place(est(20 * GB), RunnerOptions(), gpus, 64 * GB, allow_partial=True)
    assert p.n_gpu_layers == 5 and p.gpu_bytes == (10 * GB,) and p.cpu_bytes == 10 * GB


def test_partial_offload_cpu_part_must_fit_host() -> None:
    gpus = rooms(cuda("0", 10 * GB))
    p = place(est(20 * GB), RunnerOptions(), gpus, 8 * GB, allow_partial=True)
    assert isinstance(p, NoFit) and p.reason == "host"
    assert p.message == "model requires more system memory (9.3 GiB) than is available (7.5 GiB)"


def test_explicit_layer_count() -> None:
    gpus = rooms(cuda("0", 24 * GB))
    p = place(est(10 * GB), RunnerOptions(num_gpu=3), gpus, 64 * GB)
    assert p.n_gpu_layers == 3 and p.gpu_bytes == (3 * GB,) and p.cpu_bytes == 7 * GB
    p = place(est(10 * GB), RunnerOptions(num_gpu=99), gpus, 64 * GB)
    assert p.n_gpu_layers == 11  # capped at block_count + 1


def test_main_gpu_pins_one_device() -> None:
    gpus = rooms(cuda("0", 24 * GB), cuda("1", 8 * GB))
    p = place(est(4 * GB), RunnerOptions(main_gpu=1), gpus, 64 * GB)
    assert p.gpus == ("1",) and p.main_gpu == 0
    assert isinstance(place(est(12 * GB), RunnerOptions(main_gpu=1), gpus, 64 * GB), NoFit)


def test_graph_is_reserved_on_every_gpu_holding_layers() -> None:
    from corral.scheduler import ModelFacts

    f = ModelFacts(
        architecture="llama",
        file_size=8 * GB,
        block_count=32,
        embedding_length=4096,
        head_count=32,
        head_count_kv=8,
        vocab_size=128256,
        layer_bytes=(GB // 4,) * 32,
    )
    e = estimate(f, RunnerOptions(num_ctx=4096))
    one = place(e, RunnerOptions(), rooms(cuda("0", 80 * GB)), 64 * GB)
    assert one.gpu_bytes[0] == sum(e.layer_total) + e.output_bytes + e.graph_full
    two = place(e, RunnerOptions(), rooms(cuda("0", 6 * GB), cuda("1", 6 * GB)), 64 * GB)
    assert len(two.gpus) == 2
    layers = sum(e.layer_total) + e.output_bytes
    assert sum(two.gpu_bytes) == layers + 2 * e.graph_partial


def test_held_names_the_gpus_with_a_share_and_their_bytes() -> None:
    p = Placement(gpus=("0", "1", "2"), gpu_bytes=(5, 0, 7), tensor_split=(3, 0, 4))
    assert p.held == {"0": 5, "2": 7} and list(p.held) == ["0", "2"]
    assert Placement().held == {}


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (20 * GB, "18.6 GiB"),
    ],
)
def test_human_bytes2(n: int, text: str) -> None:
    assert human_bytes2(n) == text
