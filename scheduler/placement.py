"""Where a runner goes: GPUs, layer split, CPU remainder. Pure.

``place(est, options, rooms, host_usable, spread=..., allow_partial=...) -> Placement | NoFit``

``rooms`` pairs every GPU with its *usable* bytes for a new runner (:func:`usable_memory`:
``min(measured free, total - our reservations) - OLLAMA_GPU_OVERHEAD - backend minimum``,
"trust the smaller number"); ``host_usable`` is the same rule for system RAM.

Decision order (the numbers appear in the code):

1. ``num_gpu == 0`` or no GPU -> CPU; it must fit host RAM.
2. ``main_gpu`` names a GPU -> only that GPU is a candidate (single device).
3. Best single GPU holding all wanted layers: discrete before integrated, then most usable.
   Skipped with OLLAMA_SCHED_SPREAD when the best backend has several GPUs.
4. OLLAMA_SCHED_SPREAD -> all GPUs of the best backend (one with a discrete GPU beats
   all-integrated, then most usable), layers in proportion to usable memory.
5. Split over the fewest GPUs of one backend (largest usable first), filling each in turn.
6. Only when nothing else is loaded (``allow_partial``): partial offload - as many layers as fit
   on the backend that takes most, the rest on CPU.
7. Otherwise :class:`NoFit` (the caller evicts and tries again).

Every placement also needs its CPU part (weights not on GPU, their KV) to fit ``host_usable``,
else ``NoFit`` with the message ``model requires more system memory (X) than is available (Y)``.

Layers are counted as llama.cpp's ``-ngl``: blocks from the last one down, then the output
layer, so ``n_gpu_layers == block_count + 1`` means everything on GPU. Each GPU holding layers
also holds a compute graph: the full one when a single GPU holds the whole model, else the
partial one. ``num_gpu > 0`` asks for exactly that many layers on GPU (fewer only under rule 6).
A vision projector (``Estimate.projector``) goes with the first GPU of a placement, or to CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from .types import Estimate, Gpu, NoFit, Placement, RunnerOptions


def usable_memory(gpu: Gpu, reserved: int, gpu_overhead: int) -> int:
    """Room for a new runner on ``gpu`` given what our runners hold there (>= 0)."""
    return max(0, min(gpu.free, gpu.total - reserved) - gpu_overhead - gpu.min_overhead)


def human_bytes2(n: int) -> str:
    """Ollama's ``format.HumanBytes2`` (binary units, one decimal)."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def system_memory_message(need: int, available: int) -> str:
    return (
        f"model requires more system memory ({human_bytes2(need)}) "
        f"than is available ({human_bytes2(available)})"
    )


Room = tuple[Gpu, int]


def _order(rooms: Sequence[Room]) -> list[Room]:
    """Discrete before integrated, then most usable first (stable on inventory order)."""
    return sorted(rooms, key=lambda r: (r[0].integrated, -r[1]))


def _groups(rooms: Sequence[Room]) -> list[list[Room]]:
    by_lib: dict[str, list[Room]] = {}
    for r in rooms:
        by_lib.setdefault(r[0].library, []).append(r)
    groups = [_order(g) for g in by_lib.values()]
    # Best backend first: one with a discrete GPU, then the most usable memory in total.
    groups.sort(key=lambda g: (all(r[0].integrated for r in g), -sum(r[1] for r in g)))
    return groups


def _layer_sizes(est: Estimate, wanted: int) -> list[int]:
    """Sizes of the layers to offload, in offload order (last block first, output last)."""
    totals = est.layer_total
    n = est.block_count
    sizes = [totals[i] for i in range(n - 1, -1, -1)][: min(wanted, n)]
    if wanted > n:
        sizes.append(est.output_bytes)
    return sizes


def _fill(sizes: list[int], caps: list[int], proportional: bool) -> tuple[list[int], list[int]]:
    """Assign layers in order to GPUs with capacities ``caps``.

    Fill mode: each GPU takes layers until the next one does not fit, then the next GPU.
    Proportional mode: each GPU's share of the bytes follows its capacity.
    Returns (layers per GPU, bytes per GPU); stops at the first layer that fits nowhere.
    """
    k = len(caps)
    counts = [0] * k
    used = [0] * k
    total_cap = sum(c for c in caps if c > 0) or 1
    total = sum(sizes)
    targets = [total * max(c, 0) / total_cap for c in caps]
    i = 0
    for s in sizes:
        while i < k:
            room = caps[i] - used[i]
            over_share = proportional and i < k - 1 and used[i] + s > targets[i] and counts[i] > 0
            if s <= room and not over_share:
                break
            i += 1
        if i >= k:
            break
        counts[i] += 1
        used[i] += s
    return counts, used


def _on_gpus(
    est: Estimate,
    sizes: list[int],
    group: list[Room],
    graph: int,
    proportional: bool,
    need_all: bool,
) -> tuple[list[Room], list[int], list[int]] | None:
    caps = [u - graph - (est.projector if j == 0 else 0) for j, (_, u) in enumerate(group)]
    if all(c <= 0 for c in caps):
        return None
    counts, used = _fill(sizes, caps, proportional)
    if need_all and sum(counts) < len(sizes):
        return None
    keep = [j for j in range(len(group)) if counts[j] > 0]
    if not keep or (est.projector and keep[0] != 0):  # the projector sits on the first GPU
        return None
    used[0] += est.projector
    return [group[j] for j in keep], [counts[j] for j in keep], [used[j] + graph for j in keep]


def _make(
    est: Estimate, sizes: list[int], rooms: list[Room], counts: list[int], gpu_bytes: list[int]
) -> Placement:
    placed = sum(counts)
    n = est.block_count
    blocks_on_gpu = min(placed, n)
    weights = est.layer_weights
    gpu_weights = sum(weights[i] for i in range(n - blocks_on_gpu, n))
    if placed > n:
        gpu_weights += est.output_bytes
    cpu_kv = sum(est.layer_kv[i] for i in range(0, n - blocks_on_gpu))
    cpu = max(0, est.file_size - gpu_weights) + cpu_kv
    return Placement(
        n_gpu_layers=placed,
        gpus=tuple(g.id for g, _ in rooms),
        tensor_split=tuple(counts) if len(rooms) > 1 else (),
        main_gpu=0,
        split_mode="layer" if len(rooms) > 1 else "none",
        gpu_bytes=tuple(gpu_bytes),
        cpu_bytes=cpu,
        library=rooms[0][0].library,
    )


def cpu_placement(est: Estimate) -> Placement:
    return Placement(cpu_bytes=est.cpu_bytes)


def place(
    est: Estimate,
    options: RunnerOptions,
    rooms: Sequence[Room],
    host_usable: int,
    *,
    spread: bool = False,
    allow_partial: bool = False,
) -> Placement | NoFit:
    """Choose a placement for ``est`` (see the module docstring for the rules)."""
    host_usable = max(0, host_usable)

    def host_ok(p: Placement) -> Placement | NoFit:
        if p.cpu_bytes > host_usable:
            return NoFit("host", system_memory_message(p.cpu_bytes, host_usable))
        return p

    # 1. CPU only.
    if options.num_gpu == 0 or not rooms:
        return host_ok(cpu_placement(est))

    total_layers = est.block_count + 1
    wanted = total_layers if options.num_gpu < 0 else min(options.num_gpu, total_layers)
    sizes = _layer_sizes(est, wanted)
    whole = wanted == total_layers

    # 2. An explicit main GPU is the only candidate.
    if options.main_gpu is not None and 0 <= options.main_gpu < len(rooms):
        rooms = [rooms[options.main_gpu]]

    groups = _groups(rooms)

    # 3. Best single GPU.
    if not (spread and len(groups[0]) > 1):
        graph = est.graph_full if whole else est.graph_partial
        for room in _order(rooms):
            got = _on_gpus(est, sizes, [room], graph, False, need_all=True)
            if got is not None:
                return host_ok(_make(est, sizes, *got))

    # 4. Spread over all GPUs of the best backend.
    if spread:
        got = _on_gpus(est, sizes, groups[0], est.graph_partial, True, need_all=True)
        if got is not None:
            return host_ok(_make(est, sizes, *got))

    # 5. Fewest GPUs of one backend, largest usable first.
    best = None
    for group in groups:
        for k in range(2, len(group) + 1):
            got = _on_gpus(est, sizes, group[:k], est.graph_partial, False, need_all=True)
            if got is not None:
                key = (k, -sum(u for _, u in group[:k]))
                if best is None or key < best[0]:
                    best = (key, got)
                break
    if best is not None:
        return host_ok(_make(est, sizes, *best[1]))

    # 6. Partial offload, only when nothing else is loaded.
    if allow_partial:
        most = None
        for group in groups:
            got = _on_gpus(est, sizes, group, est.graph_partial, False, need_all=False)
            if got is not None and (most is None or sum(got[1]) > sum(most[1])):
                most = got
        if most is None:
            return host_ok(cpu_placement(est))
        return host_ok(_make(est, sizes, *most))

    # 7. Does not fit now.
    return NoFit("gpu")
