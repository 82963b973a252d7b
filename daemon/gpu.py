"""GPU and host-memory probes: each returns the scheduler's :class:`Inventory`.

Three probes share one interface (:class:`GpuProbe`):

* :class:`NvmlProbe` reads NVIDIA GPUs through ``pynvml`` (device count, name, total/free memory;
  CUDA GPUs are discrete). It honours ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-`` UUID
  prefixes). If NVML cannot be initialised the probe reports no GPUs and logs that once.
* :class:`SimulatedProbe` reports the GPUs described by ``CORRAL_SIMULATE_GPUS`` (a JSON list);
  tests change their free memory with :meth:`SimulatedProbe.set_free`. Paper GPUs do not lose
  free memory when a runner loads, so the supervisor tells the probe what its runners hold
  (:meth:`note_usage`) and readings report ``free - held``, as a real device would.
* :class:`UnifiedMemoryProbe` is Apple silicon's one Metal GPU, sized as llama.cpp's Metal
  device reports it (its recommended working set, from the engine probe), integrated: it shares
  the host's RAM, so the scheduler never gives it more than the host has left, and what our
  runners hold there is subtracted as for simulated GPUs.
* host memory comes from ``psutil`` (total, MemAvailable), capped by the cgroup v2 limit when one
  is set (``memory.max`` - ``memory.current``, as a container's pod limit), unless a fixed value is
  injected.

The engine gate: a GPU is only offered to the scheduler when the llama.cpp build can use it. The
supervisor runs ``python -m corral.runner --probe`` once (daemon/engine_probe.py) and calls
:meth:`GpuProbe.restrict` with the GPU libraries the engine has; :func:`engine_verdict` says in one
line why GPUs were left out ("llama.cpp was built without CUDA; 2 NVIDIA GPUs unused; ...").

Contracts:

* ``read()`` may block (NVML calls into the driver); the event loop calls ``await refresh()``,
  which runs ``read()`` in a worker thread when the probe may block.
* ``read()`` never raises for a device error: a GPU whose memory cannot be read is left out of
  that reading and the failure is logged once per device.
* ``close()`` shuts NVML down (if it was initialised) and is idempotent.
* ``note_usage(held)``: bytes per GPU id that our live runners hold, as the scheduler believes;
  called by the supervisor before every ``refresh()``. Probes that measure ignore it.
* ``visible_devices(gpu_ids)`` tells the runner launcher what to put in the child's
  ``CUDA_VISIBLE_DEVICES`` for a placement; ``None`` means "leave the environment alone"
  (simulated GPUs and CPU-only placements never narrow it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import psutil
import structlog

from corral.daemon.config import Config, parse_simulated_gpus
from corral.runner.protocol import EngineProbe
from corral.scheduler.estimate import minimum_memory
from corral.scheduler.types import Gpu, HostMemory, Inventory

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU as a probe measured it (bytes)."""

    id: str  # what the scheduler and /api/ps call this GPU
    name: str
    total: int
    free: int
    library: str = "cuda"
    integrated: bool = False
    visible_id: str | None = None  # value for the child's CUDA_VISIBLE_DEVICES (None: no narrowing)
    min_overhead: int = 0  # what the backend keeps for itself on the device


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def cgroup_limit(
    root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> tuple[int, int] | None:
    """(memory.max, memory.current) of this process's cgroup v2, or None without a limit.

    The cgroup is the ``0::/path`` line of /proc/self/cgroup below ``root``; inside a container
    the namespace makes that ``/``, so ``root/memory.max`` is the pod's limit.
    """
    rel = ""
    try:
        for line in self_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                rel = line[3:].strip().lstrip("/")
                break
    except OSError:
        pass
    for folder in dict.fromkeys([root / rel, root]):  # our own group first, then the root
        limit = _read_int(folder / "memory.max")
        if limit is not None:
            return limit, _read_int(folder / "memory.current") or 0
    return None


def host_memory(
    root: Path = Path("/sys/fs/cgroup"),
    self_cgroup: Path = Path("/proc/self/cgroup"),
    vm: Callable[[], Any] = psutil.virtual_memory,
) -> tuple[int, int]:
    """(total, available) bytes of host RAM: psutil's total and MemAvailable, capped by the cgroup
    v2 limit when one is set (total <= memory.max, available <= memory.max - memory.current).
    Cheap, no blocking."""
    v = vm()
    total, available = int(v.total), int(v.available)
    limit = cgroup_limit(root, self_cgroup)
    if limit is not None:
        cap, current = limit
        total = min(total, cap)
        available = min(available, max(0, cap - current))
    return total, available


def host_memory_psutil() -> tuple[int, int]:
    """The host memory every probe uses by default (cgroup-aware, see :func:`host_memory`)."""
    return host_memory()


def make_inventory(gpus: Iterable[GpuReading], host: tuple[int, int]) -> Inventory:
    """Build the scheduler's Inventory from probe readings (the only place that knows its shape)."""
    return Inventory(
        gpus=tuple(
            Gpu(
                id=g.id,
                name=g.name,
                library=g.library,
                total=g.total,
                free=g.free,
                integrated=g.integrated,
                min_overhead=g.min_overhead,
            )
            for g in gpus
        ),
        host=HostMemory(total=host[0], free=host[1]),
    )


class GpuProbe(Protocol):
    """What the supervisor needs from a probe (see the module docstring for the contracts)."""

    blocking: bool  # True: call read() off the event loop

    def read(self) -> Inventory: ...

    async def refresh(self) -> Inventory: ...

    def visible_devices(self, gpu_ids: Sequence[str]) -> str | None: ...

    def note_usage(self, held: Mapping[str, int]) -> None: ...

    def restrict(self, libraries: Iterable[str] | None) -> None: ...

    def gpu_readings(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class _ProbeBase:
    blocking = False

    def __init__(self, host: Callable[[], tuple[int, int]] | tuple[int, int] | None = None) -> None:
        if host is None:
            self._host: Callable[[], tuple[int, int]] = host_memory_psutil
        elif callable(host):
            self._host = host
        else:
            fixed = (int(host[0]), int(host[1]))
            self._host = lambda: fixed

    _libraries: frozenset[str] | None = None  # GPU libraries the engine can use; None: all

    def gpu_readings(self) -> list[GpuReading]:
        raise NotImplementedError

    def restrict(self, libraries: Iterable[str] | None) -> None:
        """Offer only GPUs of these libraries from now on (None: every GPU). See engine_verdict."""
        self._libraries = None if libraries is None else frozenset(libraries)

    def usable_readings(self) -> list[GpuReading]:
        readings = self.gpu_readings()
        if self._libraries is None:
            return readings
        return [g for g in readings if g.library in self._libraries]

    def read(self) -> Inventory:
        return make_inventory(self.usable_readings(), self._host())

    async def refresh(self) -> Inventory:
        if self.blocking:
            return await asyncio.to_thread(self.read)
        return self.read()

    def visible_devices(self, gpu_ids: Sequence[str]) -> str | None:
        return None

    def note_usage(self, held: Mapping[str, int]) -> None:
        """Measuring probes see our runners' memory on the device itself: nothing to do."""

    def close(self) -> None:
        pass


class CpuOnlyProbe(_ProbeBase):
    """No GPUs; host memory only."""

    def gpu_readings(self) -> list[GpuReading]:
        return []


# ---------------------------------------------------------------------------------------- simulated


class SimulatedProbe(_ProbeBase):
    """GPUs that exist only on paper. The child's environment is never narrowed for them."""

    def __init__(
        self,
        gpus: str | Sequence[Any],
        host: Callable[[], tuple[int, int]] | tuple[int, int] | None = None,
    ) -> None:
        """``gpus``: Config.simulate_gpus, or anything :func:`config.parse_simulated_gpus`
        takes (its ValueError passes through)."""
        super().__init__(host)
        self._gpus = {
            g.id: GpuReading(
                id=g.id,
                name=g.name,
                total=g.total,
                free=g.free,
                library=g.library,
                integrated=g.integrated,
            )
            for g in parse_simulated_gpus(gpus)
        }
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def gpu_readings(self) -> list[GpuReading]:
        """The configured GPUs; ``free`` minus what our runners hold (see :meth:`note_usage`)."""
        with self._lock:
            return [
                dataclasses.replace(g, free=max(0, g.free - self._held.get(g.id, 0)))
                for g in self._gpus.values()
            ]

    def note_usage(self, held: Mapping[str, int]) -> None:
        """Our runners hold ``held`` bytes per GPU id from now on (replaces the last value).

        Without it a paper GPU would keep reporting its configured free memory while our
        runners fill it, and "trust the smaller number" would trust ``total - reserved``
        alone: memory that others use (total - free) would be handed out twice.
        """
        with self._lock:
            self._held = {k: int(v) for k, v in held.items() if v > 0}

    def set_free(self, gpu_id: str, free: int) -> None:
        """Test hook: the next reading reports ``free`` bytes for ``gpu_id`` (less what our
        runners hold there, see :meth:`note_usage`)."""
        with self._lock:
            g = self._gpus[gpu_id]
            self._gpus[gpu_id] = dataclasses.replace(g, free=min(max(free, 0), g.total))


# ------------------------------------------------------------------------------ the engine's view

# llama.cpp backend registry names -> our GPU library names (Gpu.library)
ENGINE_LIBRARIES = {
    "cuda": "cuda",
    "rocm": "rocm",
    "hip": "rocm",
    "metal": "metal",
    "mtl": "metal",
    "vulkan": "vulkan",
    "sycl": "oneapi",
}
_BUILD_FLAG = {"cuda": "cuda", "rocm": "hip", "metal": "metal"}
_VENDOR = {"cuda": "NVIDIA", "rocm": "AMD", "metal": "Apple"}


def engine_libraries(engine: EngineProbe) -> frozenset[str]:
    """The GPU libraries (``Gpu.library`` names) the engine has devices for."""
    return frozenset(ENGINE_LIBRARIES.get(b, b) for b in engine.gpu_backends())


def engine_verdict(
    readings: Sequence[GpuReading | Gpu], engine: EngineProbe | None
) -> tuple[frozenset[str] | None, str | None]:
    """(libraries to offer, one-line reason when GPUs are left out). Pure; of each reading (a
    probe's, or an Inventory's Gpu) only the library counts.

    No engine probe (the fake engine, simulated GPUs): everything is offered. Otherwise a GPU is
    offered only when the engine has a device of its library. The reason also names a GPU
    backend that was compiled in but found no device (a CUDA build on a machine without a GPU
    or driver: models run on the CPU), with what llama.cpp said while looking.
    """
    if engine is None:
        return None, None
    usable = engine_libraries(engine)
    unused: dict[str, int] = {}
    for g in readings:
        if g.library not in usable:
            unused[g.library] = unused.get(g.library, 0) + 1
    parts = []
    for lib, n in sorted(unused.items()):
        vendor = _VENDOR.get(lib, lib)
        flag = _BUILD_FLAG.get(lib, lib)
        why = (
            f"llama.cpp could not be loaded ({engine.error})"
            if engine.error
            else f"llama.cpp was built without {lib.upper() if lib != 'rocm' else 'ROCm/HIP'}"
        )
        parts.append(
            f"{why}; {n} {vendor} GPU{'s' if n != 1 else ''} unused; "
            f"reinstall with CORRAL_LLAMA_BACKEND={flag}"
        )
    for backend in engine.idle_gpu_backends():
        said = [e for e in engine.backend_errors if backend.lower() in e.lower()]
        if not said and backend == engine.unregistered_gpu_backend():
            said = [f"it did not start: no {backend} driver"]
        parts.append(
            f"llama.cpp's {backend} backend found no device"
            + (f" ({said[0]})" if said else "")
            + "; models run on the CPU"
        )
    return usable, "; ".join(parts) or None


class UnifiedMemoryProbe(SimulatedProbe):
    """Apple silicon: the engine's Metal device is the one GPU, integrated (unified memory).

    Its size is what llama.cpp's Metal device reports (the recommended working set), read once
    from the engine probe; like a paper GPU it loses what our runners hold (note_usage).
    """

    def __init__(
        self,
        engine: EngineProbe,
        host: Callable[[], tuple[int, int]] | tuple[int, int] | None = None,
    ) -> None:
        super().__init__([], host=host)
        devs = [
            d
            for d in engine.devices
            if d.type in ("gpu", "igpu") and ENGINE_LIBRARIES.get(d.backend.lower()) == "metal"
        ]
        self._gpus = {
            str(i): GpuReading(
                id=str(i),
                name=d.description or d.name,
                total=d.total,
                free=min(d.free or d.total, d.total),
                library="metal",
                integrated=True,
                min_overhead=minimum_memory("metal"),
            )
            for i, d in enumerate(devs)
            if d.total > 0
        }


# --------------------------------------------------------------------------------------------- NVML


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def parse_visible_devices(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of entries; None when unset (all devices visible).

    CUDA stops at the first invalid entry; an empty string or ``-1`` hides every device.
    """
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    out: list[str] = []
    for v in items:
        if not v or v.startswith("-"):
            break
        out.append(v)
    return out


class NvmlProbe(_ProbeBase):
    """NVIDIA GPUs through NVML. ``nvml`` is the ``pynvml`` module (tests pass a fake one)."""

    blocking = True

    def __init__(
        self,
        *,
        visible_devices: str | None = None,
        nvml: ModuleType | None = None,
        host: Callable[[], tuple[int, int]] | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(host)
        self._nvml: Any = nvml  # pynvml (untyped), imported on first use
        self._visible = parse_visible_devices(visible_devices)
        self._lock = threading.Lock()  # NVML calls from worker threads are serialised
        self._state = "new"  # new -> ready | unavailable -> closed
        self._warned: set[str] = set()

    # -- NVML lifecycle (under self._lock)

    def _init(self) -> bool:
        if self._state == "ready":
            return True
        if self._state != "new":
            return False
        try:
            if self._nvml is None:
                import pynvml  # optional native dependency (function import: tests/test_imports.py)

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # NVMLError, ImportError, OSError: no usable driver
            self._state = "unavailable"
            log.info("nvml unavailable, no NVIDIA GPUs", error=str(exc) or type(exc).__name__)
            return False
        self._state = "ready"
        return True

    def _count(self) -> int | None:
        """NVML's device count (every device, CUDA_VISIBLE_DEVICES aside); None when NVML is
        unusable or the count fails (warned once)."""
        if not self._init():
            return None
        try:
            return int(self._nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self._warn_once("count", error=str(exc))
            return None

    def _warn_once(self, key: str, **kw: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("nvml device read failed", **kw)

    def _selected(self, count: int, uuids: list[str | None]) -> list[int]:
        """Indices of the NVML devices CUDA may use, in CUDA_VISIBLE_DEVICES order."""
        if self._visible is None:
            return list(range(count))
        out: list[int] = []
        for entry in self._visible:
            if entry.isdigit():
                idx = int(entry)
                if idx >= count:
                    break
            else:
                matches = [i for i, u in enumerate(uuids) if u and u.startswith(entry)]
                if len(matches) != 1:
                    break
                idx = matches[0]
            if idx not in out:
                out.append(idx)
        return out

    def gpu_readings(self) -> list[GpuReading]:
        with self._lock:
            count = self._count()
            if count is None:
                return []
            nv = self._nvml
            handles: list[Any] = []
            uuids: list[str | None] = []
            for i in range(count):
                try:
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                except Exception as exc:
                    self._warn_once(f"handle{i}", index=i, error=str(exc))
                    h = None
                handles.append(h)
                uuid = None
                if h is not None:
                    try:
                        uuid = _text(nv.nvmlDeviceGetUUID(h))
                    except Exception:
                        uuid = None
                uuids.append(uuid)
            out: list[GpuReading] = []
            for i in self._selected(count, uuids):
                h = handles[i]
                if h is None:
                    continue
                try:
                    mem = nv.nvmlDeviceGetMemoryInfo(h)
                    name = _text(nv.nvmlDeviceGetName(h))
                except Exception as exc:
                    self._warn_once(f"mem{i}", index=i, error=str(exc))
                    continue
                total = int(mem.total)
                out.append(
                    GpuReading(
                        id=str(i),
                        name=name,
                        total=total,
                        free=min(int(mem.free), total),
                        library="cuda",
                        integrated=False,
                        visible_id=uuids[i] or str(i),
                        min_overhead=minimum_memory("cuda"),
                    )
                )
            self._by_id = {g.id: g for g in out}
            return out

    def compute_capabilities(self) -> tuple[int, tuple[str, ...]] | None:
        """(device count, CUDA compute capabilities such as ``"89"``) of every NVIDIA device,
        ignoring CUDA_VISIBLE_DEVICES: what the build plan wants (``buildplan.nvidia_gpus``).
        None when NVML is unavailable. A device whose capability cannot be read is counted
        without one. Blocks like :meth:`gpu_readings`."""
        with self._lock:
            count = self._count()
            if count is None:
                return None
            nv = self._nvml
            caps: list[str] = []
            for i in range(count):
                try:
                    major, minor = nv.nvmlDeviceGetCudaComputeCapability(
                        nv.nvmlDeviceGetHandleByIndex(i)
                    )
                except Exception as exc:
                    self._warn_once(f"cap{i}", index=i, error=str(exc))
                    continue
                caps.append(f"{major}{minor}")
            return count, tuple(caps)

    def visible_devices(self, gpu_ids: Sequence[str]) -> str | None:
        """The child's CUDA_VISIBLE_DEVICES for a placement on ``gpu_ids`` (UUIDs when known)."""
        if not gpu_ids:
            return None
        known = getattr(self, "_by_id", {})
        ids = [known[g].visible_id if g in known and known[g].visible_id else g for g in gpu_ids]
        return ",".join(str(i) for i in ids)

    def close(self) -> None:
        with self._lock:
            if self._state == "ready":
                try:
                    self._nvml.nvmlShutdown()
                except Exception as exc:
                    log.warning("nvml shutdown failed", error=str(exc))
            self._state = "closed"


def make_probe(
    config: Config,
    *,
    nvml: ModuleType | None = None,
    host: Callable[[], tuple[int, int]] | tuple[int, int] | None = None,
    engine: EngineProbe | None = None,
    platform: str = sys.platform,
) -> GpuProbe:
    """The probe the daemon uses for ``config``: simulated GPUs when configured; on macOS the
    engine's Metal device; else NVML."""
    simulated = config.simulate_gpus
    if simulated is not None:  # () simulates a machine without GPUs
        return SimulatedProbe(simulated, host=host)
    if platform == "darwin":
        if engine is not None and "metal" in engine_libraries(engine):
            return UnifiedMemoryProbe(engine, host=host)
        return CpuOnlyProbe(host=host)
    return NvmlProbe(visible_devices=config.cuda_visible_devices, nvml=nvml, host=host)
