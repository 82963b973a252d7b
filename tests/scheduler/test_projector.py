"""A vision projector in the estimate and the placement (scheduler/estimate.py rule 5)."""

from __future__ import annotations

import msgspec

from corral.scheduler import RunnerOptions
from corral.scheduler.estimate import estimate, projector_graph
from corral.scheduler.placement import place
from tests.scheduler.sched_harness import GB, MiB, cuda, facts

PROJ = 600 * MiB


def _pair(size: int = 4 * GB, blocks: int = 10):
    text = facts(size, blocks=blocks)
    graph = projector_graph(336, 14, 1024, 16)
    return text, msgspec.structs.replace(
        text, has_vision=True, projector_bytes=PROJ, projector_graph=graph
    )


def test_projector_graph_of_a_llava_encoder() -> None:
    # 577 cells (24 x 24 patches + class token), 16 heads, 1024 wide, a 336 x 336 RGB input
    assert projector_graph(336, 14, 1024, 16) == 4 * (3 * 336 * 336 + 577 * (577 * 16 + 4 * 1024))
    assert projector_graph(0, 14, 1024, 16) == 0  # keys missing: no guess


def test_estimate_adds_weights_and_compute_of_the_projector() -> None:
    text, pair = _pair()
    opts = RunnerOptions(num_ctx=2048)
    a, b = estimate(text, opts), estimate(pair, opts)
    assert b.projector == PROJ + pair.projector_graph
    assert b.cpu_bytes - a.cpu_bytes == b.projector
    assert b.full_gpu_bytes - a.full_gpu_bytes == b.projector


def test_projector_is_placed_on_the_first_gpu() -> None:
    text, pair = _pair(12 * GB, blocks=12)
    opts = RunnerOptions(num_ctx=2048)
    one = [(cuda("0", 24 * GB), 24 * GB)]
    p_text, p_pair = (
        place(estimate(text, opts), opts, one, 64 * GB),
        place(estimate(pair, opts), opts, one, 64 * GB),
    )
    assert p_pair.gpu_bytes[0] - p_text.gpu_bytes[0] == estimate(pair, opts).projector
    assert p_pair.cpu_bytes == p_text.cpu_bytes
    # split over two GPUs: the projector's bytes count on the first one only
    two = [(cuda("0", 8 * GB), 8 * GB), (cuda("1", 8 * GB), 8 * GB)]
    split = place(estimate(pair, opts), opts, two, 64 * GB)
    assert split.gpus == ("0", "1") and split.tensor_split[0] >= 1
    e = estimate(pair, opts)
    assert split.gpu_bytes[0] > e.projector + e.graph_partial
    # CPU only: the projector is in the host bytes
    cpu = place(estimate(pair, opts), RunnerOptions(num_ctx=2048, num_gpu=0), one, 64 * GB)
    assert cpu.cpu_bytes == estimate(pair, opts).cpu_bytes


def test_projector_that_does_not_fit_the_first_gpu_is_no_fit() -> None:
    _, pair = _pair(3 * GB, blocks=10)
    opts = RunnerOptions(num_ctx=2048)
    text_only = estimate(msgspec.structs.replace(pair, projector_bytes=0, projector_graph=0), opts)
    room = text_only.full_gpu_bytes + PROJ // 2  # the text model fits, the pair does not
    assert not hasattr(
        place(estimate(pair, opts), opts, [(cuda("0", 24 * GB), room)], 64 * GB), "gpus"
    )
    assert place(text_only, opts, [(cuda("0", 24 * GB), room)], 64 * GB).gpus == ("0",)
