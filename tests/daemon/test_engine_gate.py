"""The engine gate and honest memory (issue 7 points 2-5): GPUs the llama.cpp build cannot use are
never offered, /api/ps reports what runners measured, Metal sizing, cgroup v2 host memory.

Runners are real processes with the FakeEngine; GPUs come from a fake ``pynvml`` module; the
engine's answer is an EngineProbe as ``python -m corral.runner --probe`` prints it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from corral.daemon.api.ps import ps_models
from corral.daemon.config import Config
from corral.daemon.gpu import (
    GpuReading,
    NvmlProbe,
    SimulatedProbe,
    UnifiedMemoryProbe,
    cgroup_limit,
    engine_verdict,
    host_memory,
    make_probe,
)
from corral.daemon.supervisor import Supervisor
from corral.runner.protocol import EngineDevice, EngineProbe
from tests.daemon.fake_pynvml import FakeDevice, FakeNvml
from tests.daemon.test_supervisor import HOST, SAFETY, acquire, models  # noqa: F401 (fixture)

GiB = 1 << 30

CPU_DEV = EngineDevice(
    name="CPU", description="AMD EPYC", type="cpu", backend="CPU", total=64 * GiB, free=48 * GiB
)
CPU_ONLY = EngineProbe(
    llama_cpp_python="0.3.36",
    gpu_offload=False,
    devices=[CPU_DEV],
    system_info="CPU : SSE3 = 1 | AVX2 = 1 |",
    build={"backend": "cpu"},
)
WITH_CUDA = EngineProbe(
    llama_cpp_python="0.3.36",
    gpu_offload=True,
    build={"backend": "cuda"},
    devices=[
        EngineDevice(
            name="CUDA0",
            description="NVIDIA A100",
            type="gpu",
            backend="CUDA",
            total=80 * GiB,
            free=79 * GiB,
        ),
        EngineDevice(
            name="CUDA1",
            description="NVIDIA A100",
            type="gpu",
            backend="CUDA",
            total=80 * GiB,
            free=79 * GiB,
        ),
        CPU_DEV,
    ],
)
M2 = EngineProbe(
    gpu_offload=True,
    devices=[
        EngineDevice(
            name="Metal",
            description="Apple M2 Max",
            type="gpu",
            backend="Metal",
            total=48 * GiB,
            free=48 * GiB,
        ),
        CPU_DEV,
    ],
)


def cfg(**kw: Any) -> Config:
    base: dict[str, Any] = dict(
        runner_engine="fake",
        keep_alive=300.0,
        load_timeout=20.0,
        fake_knobs={"load_time": 0.0, "tokens_per_second": 200.0},
    )
    base.update(kw)
    return Config(**base)


def nvml_two_gpus() -> FakeNvml:
    return FakeNvml(
        devices=[
            FakeDevice(name="NVIDIA A100", total=80 * GiB),
            FakeDevice(name="NVIDIA A100", total=80 * GiB),
        ]
    )


def readings(*libs: str) -> list[GpuReading]:
    return [
        GpuReading(id=str(i), name="g", total=GiB, free=GiB, library=lib)
        for i, lib in enumerate(libs)
    ]


# ------------------------------------------------------------------------------- pure verdict


def test_no_engine_probe_offers_everything():
    assert engine_verdict(readings("cuda"), None) == (None, None)


def test_cpu_only_build_offers_no_nvidia_gpu_and_says_how_to_fix_it():
    libs, why = engine_verdict(readings("cuda", "cuda"), CPU_ONLY)
    assert libs == frozenset()
    assert why == (
        "llama.cpp was built without CUDA; 2 NVIDIA GPUs unused; "
        "reinstall with CORRAL_LLAMA_BACKEND=cuda"
    )


def test_a_cuda_build_offers_the_nvidia_gpus():
    assert engine_verdict(readings("cuda", "cuda"), WITH_CUDA) == (frozenset({"cuda"}), None)


def test_an_engine_that_failed_to_load_says_so():
    libs, why = engine_verdict(readings("cuda"), EngineProbe(error="OSError: libcuda.so.1"))
    assert libs == frozenset()
    assert why is not None and "could not be loaded (OSError: libcuda.so.1)" in why
    assert "1 NVIDIA GPU unused" in why


# A CUDA build on a machine without an NVIDIA driver, as `python -m corral.runner --probe` prints it
# for the wheel scripts/check-gpu-build.sh cuda builds here: the CUDA backend is registered,
# finds no device, and llama.cpp logged why.
CUDA_NO_DEVICE = EngineProbe(
    llama_cpp_python="0.3.36",
    gpu_offload=False,
    devices=[CPU_DEV],
    build={"backend": "cuda"},
    backends=["CUDA", "CPU"],
    backend_errors=[
        "ggml_cuda_init: failed to initialize CUDA: CUDA driver version is insufficient for "
        "CUDA runtime version"
    ],
)


def test_a_gpu_build_without_a_device_says_the_cpu_runs_everything_and_why():
    libs, why = engine_verdict([], CUDA_NO_DEVICE)
    assert libs == frozenset()
    assert why == (
        "llama.cpp's CUDA backend found no device (ggml_cuda_init: failed to initialize CUDA: "
        "CUDA driver version is insufficient for CUDA runtime version); models run on the CPU"
    )
    assert CUDA_NO_DEVICE.idle_gpu_backends() == ["CUDA"]


def test_a_backend_with_its_device_or_a_cpu_helper_backend_is_not_idle():
    with_device = EngineProbe(devices=WITH_CUDA.devices, backends=["CUDA", "CPU"])
    assert with_device.idle_gpu_backends() == []
    assert engine_verdict(readings("cuda"), with_device) == (frozenset({"cuda"}), None)
    blas = EngineProbe(devices=[CPU_DEV], backends=["BLAS", "RPC", "CPU"])
    assert blas.idle_gpu_backends() == [] and engine_verdict([], blas) == (frozenset(), None)
    vulkan = EngineProbe(devices=[CPU_DEV], backends=["Vulkan", "CPU"])
    assert engine_verdict([], vulkan)[1] == (
        "llama.cpp's Vulkan backend found no device; models run on the CPU"
    )


def test_a_gpu_build_whose_backend_did_not_even_register_still_says_why():
    """A Vulkan build where the Vulkan loader finds no driver at all (no ICD: a container without
    the GPU's driver): ggml-vulkan drops itself without a word and the probe lists only the CPU
    backend, as `VK_DRIVER_FILES=/nonexistent.json python -m corral.runner --probe` printed for
    the wheel scripts/check-gpu-build.sh vulkan built here."""
    no_icd = EngineProbe(devices=[CPU_DEV], build={"backend": "vulkan"}, backends=["CPU"])
    assert no_icd.idle_gpu_backends() == ["Vulkan"]
    assert engine_verdict([], no_icd) == (
        frozenset(),
        "llama.cpp's Vulkan backend found no device (it did not start: no Vulkan driver); "
        "models run on the CPU",
    )
    # a CPU build, an old probe line without the backends list, a registered backend: no claim
    assert (
        EngineProbe(
            devices=[CPU_DEV], build={"backend": "cpu"}, backends=["CPU"]
        ).idle_gpu_backends()
        == []
    )
    assert EngineProbe(devices=[CPU_DEV], build={"backend": "vulkan"}).idle_gpu_backends() == []
    registered = EngineProbe(
        devices=[CPU_DEV], build={"backend": "vulkan"}, backends=["Vulkan", "CPU"]
    )
    assert registered.idle_gpu_backends() == ["Vulkan"]  # once, with the plain message
    assert engine_verdict([], registered)[1] == (
        "llama.cpp's Vulkan backend found no device; models run on the CPU"
    )


# ------------------------------------------------------------------------ supervisor behaviour


async def start(config: Config, probe: Any, engine: EngineProbe | None) -> Supervisor:
    sup = Supervisor(config, probe=probe, engine=engine, stop_grace=2.0, drain_timeout=1.0)
    await sup.start()
    return sup


async def test_nvml_gpus_with_a_cpu_only_engine_place_on_cpu_log_once_and_report_no_vram(models):
    probe = NvmlProbe(nvml=nvml_two_gpus().module(), host=HOST)
    with capture_logs() as logs:
        sup = await start(cfg(), probe, CPU_ONLY)
        try:
            assert (await sup.probe.refresh()).gpus == ()
            for i in range(2):
                async with await acquire(sup, models(i)):
                    pass
            rows = ps_models(sup)
            assert len(rows) == 2
            for row in rows:
                assert row["size_vram"] == 0 and row["gpus"] == [] and row["size"] > 0
            assert all(v.placement.gpus == () for v in sup.snapshot().runners)
        finally:
            await asyncio.wait_for(sup.close(), SAFETY)
    unused = [e for e in logs if e["event"] == "gpus unused"]
    assert len(unused) == 1
    assert unused[0]["reason"] == (
        "llama.cpp was built without CUDA; 2 NVIDIA GPUs unused; "
        "reinstall with CORRAL_LLAMA_BACKEND=cuda"
    )


async def test_nvml_gpus_with_a_cuda_engine_place_on_gpu_as_before(models):
    probe = NvmlProbe(nvml=nvml_two_gpus().module(), host=HOST)
    with capture_logs() as logs:
        sup = await start(cfg(), probe, WITH_CUDA)
        try:
            assert [g.id for g in (await sup.probe.refresh()).gpus] == ["0", "1"]
            async with await acquire(sup, models(0)):
                pass
            (row,) = ps_models(sup)
            assert row["size_vram"] > 0 and row["size"] == row["size_vram"]
            assert [g["id"] for g in row["gpus"]] == ["0"]
        finally:
            await asyncio.wait_for(sup.close(), SAFETY)
    assert not [e for e in logs if e["event"] == "gpus unused"]


async def test_a_runner_that_measures_no_gpu_memory_is_reported_as_measured(models):
    """The plan said GPU; the (CPU-only) engine put everything on CPU: ps shows the truth."""
    probe = NvmlProbe(nvml=nvml_two_gpus().module(), host=HOST)
    config = cfg(fake_knobs={"gpu_offload": False})
    with capture_logs() as logs:
        sup = await start(config, probe, WITH_CUDA)
        try:
            async with await acquire(sup, models(0)):
                pass
            (row,) = ps_models(sup)
            assert row["size_vram"] == 0 and row["gpus"] == []
            assert row["size"] > 0
            (view,) = sup.snapshot().runners
            assert view.placement.vram == 0  # the ledger no longer holds GPU memory
        finally:
            await asyncio.wait_for(sup.close(), SAFETY)
    assert [e for e in logs if e["event"].startswith("runner uses no GPU memory")]


async def test_measured_gpu_memory_replaces_the_estimate(models):
    probe = NvmlProbe(nvml=nvml_two_gpus().module(), host=HOST)
    knobs = {
        "memory": {
            "CUDA0": {"weights": 100 << 20, "kv": 50 << 20, "compute": 10 << 20},
            "CPU": {"weights": 1 << 20},
        }
    }
    sup = await start(cfg(fake_knobs=knobs), probe, WITH_CUDA)
    try:
        async with await acquire(sup, models(0)):
            pass
        (row,) = ps_models(sup)
        assert row["size_vram"] == 160 << 20
        assert row["gpus"] == [{"id": "0", "name": "NVIDIA A100", "vram": 160 << 20}]
    finally:
        await asyncio.wait_for(sup.close(), SAFETY)


async def test_simulated_gpus_show_the_simulated_placement_whatever_the_runner_measures(models):
    """CORRAL_SIMULATE_GPUS is paper on purpose: /api/ps shows the plan on them (marked
    simulated) also when the runner measured CPU memory only, as the real engine on a machine
    without GPUs does, or other GPU figures; the log says what it measured."""
    for measured in ({"CPU": {"weights": 7 << 20, "kv": 1 << 20}}, {"CUDA0": {"weights": 1 << 20}}):
        probe = SimulatedProbe([{"name": "Sim A100", "total": 24 * GiB}], host=HOST)
        with capture_logs() as logs:
            sup = await start(cfg(fake_knobs={"memory": measured}), probe, None)
            try:
                async with await acquire(sup, models(0)):
                    pass
                (row,) = ps_models(sup)
                (view,) = sup.snapshot().runners
                assert view.placement.gpus == ("0",) and view.placement.vram > 1 << 20
                assert row["size_vram"] == view.placement.vram
                assert row["gpus"] == [
                    {"id": "0", "name": "Sim A100", "vram": view.placement.vram, "simulated": True}
                ]
            finally:
                await asyncio.wait_for(sup.close(), SAFETY)
        (note,) = [e for e in logs if e["event"] == "simulated placement kept"]
        assert note["measured"] == {d: sum(m.values()) for d, m in measured.items()}
        assert note["gpus"] == ["0"] and note["gpu_bytes"] == [view.placement.vram]


async def test_the_fake_engine_and_simulated_gpus_are_not_gated(models):
    config = cfg()
    sup = Supervisor(config, probe=SimulatedProbe([{"total": 24 * GiB}], host=HOST))
    await sup.start()
    try:
        assert sup.engine is None and len((await sup.probe.refresh()).gpus) == 1
    finally:
        await sup.close()


# ---------------------------------------------------------------------------- Apple silicon


def test_macos_gets_one_integrated_metal_gpu_sized_by_the_engine():
    probe = make_probe(cfg(), engine=M2, platform="darwin", host=(64 * GiB, 40 * GiB))
    assert isinstance(probe, UnifiedMemoryProbe)
    inv = probe.read()
    (gpu,) = inv.gpus
    assert (gpu.library, gpu.integrated, gpu.total, gpu.name) == (
        "metal",
        True,
        48 * GiB,
        "Apple M2 Max",
    )
    assert inv.host.total == 64 * GiB
    probe.note_usage({"0": 10 * GiB})  # our runner holds 10 GiB of it
    assert probe.read().gpus[0].free == 38 * GiB


def test_macos_without_a_metal_engine_has_no_gpu():
    probe = make_probe(cfg(), engine=CPU_ONLY, platform="darwin", host=(8 * GiB, 4 * GiB))
    assert probe.read().gpus == ()


# ------------------------------------------------------------------------------ cgroup v2


def _cgroup(tmp_path: Path, files: dict[str, str], self_line: str = "0::/\n") -> tuple[Path, Path]:
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    me = tmp_path / "self_cgroup"
    me.write_text(self_line)
    return root, me


class _VM:
    def __init__(self, total: int, available: int) -> None:
        self.total, self.available = total, available


def test_a_pod_limit_caps_host_memory(tmp_path):
    root, me = _cgroup(tmp_path, {"memory.max": f"{8 * GiB}\n", "memory.current": f"{3 * GiB}\n"})
    total, free = host_memory(root, me, vm=lambda: _VM(64 * GiB, 50 * GiB))
    assert (total, free) == (8 * GiB, 5 * GiB)


def test_no_limit_means_memavailable(tmp_path):
    root, me = _cgroup(tmp_path, {"memory.max": "max\n", "memory.current": f"{3 * GiB}\n"})
    assert host_memory(root, me, vm=lambda: _VM(64 * GiB, 50 * GiB)) == (64 * GiB, 50 * GiB)
    assert cgroup_limit(tmp_path / "nowhere", me) is None


def test_our_own_group_below_the_root_is_read_first(tmp_path):
    root, me = _cgroup(
        tmp_path,
        {
            "memory.max": "max\n",
            "system.slice/corral.service/memory.max": f"{4 * GiB}",
            "system.slice/corral.service/memory.current": f"{1 * GiB}",
        },
        self_line="0::/system.slice/corral.service\n",
    )
    assert cgroup_limit(root, me) == (4 * GiB, 1 * GiB)
    # usage above the limit (page cache being reclaimed) never makes free memory negative
    (root / "system.slice/corral.service/memory.current").write_text(str(5 * GiB))
    assert host_memory(root, me, vm=lambda: _VM(64 * GiB, 50 * GiB)) == (4 * GiB, 0)


def test_available_below_the_cgroup_headroom_wins(tmp_path):
    root, me = _cgroup(tmp_path, {"memory.max": f"{32 * GiB}", "memory.current": f"{1 * GiB}"})
    assert host_memory(root, me, vm=lambda: _VM(64 * GiB, 2 * GiB)) == (32 * GiB, 2 * GiB)


# ------------------------------------------------------------------ memory after an unload


async def test_the_next_load_waits_until_the_stopped_runners_vram_reads_free_again(models):
    """A stopped runner's GPU memory stays reserved until the device shows 3/4 of it back (the
    supervisor polls the probe every 250 ms meanwhile), then the waiting model loads."""
    # what one tiny model takes on a GPU, from a first supervisor
    sup = await start(cfg(), NvmlProbe(nvml=nvml_two_gpus().module(), host=HOST), WITH_CUDA)
    try:
        async with await acquire(sup, models(0)):
            pass
        held = sup.snapshot().runners[0].placement.vram
    finally:
        await asyncio.wait_for(sup.close(), SAFETY)
    # a GPU that holds one of them but not two
    total = held + held // 2 + (457 << 20)
    nv = FakeNvml(devices=[FakeDevice(name="NVIDIA L4", total=total)])
    sup = await start(cfg(max_loaded_models=2), NvmlProbe(nvml=nv.module(), host=HOST), WITH_CUDA)
    try:
        async with await acquire(sup, models(0)):
            pass
        (a,) = sup.snapshot().runners
        assert a.placement.vram == held
        nv.devices[0].free = total - held  # the driver shows what A holds
        b = asyncio.create_task(acquire(sup, models(1)))  # B fits only once A is gone
        await asyncio.wait_for(
            sup.wait_until(lambda: sup.snapshot().reclaiming == (a.runner_id,)), SAFETY
        )
        seen = sup.processed
        # three more probe readings (every 250 ms) with the memory still held: B waits
        await asyncio.wait_for(sup.wait_until(lambda: sup.processed >= seen + 3), SAFETY)
        assert not b.done()
        assert [v.runner_id for v in sup.snapshot().runners] == []
        nv.devices[0].free = total - held // 8  # 7/8 of it back
        async with await asyncio.wait_for(b, SAFETY) as lease:
            assert lease.runner_id != a.runner_id
        assert sup.snapshot().reclaiming == ()
    finally:
        await asyncio.wait_for(sup.close(), SAFETY)


async def test_a_cuda_build_without_a_device_runs_on_cpu_and_says_why_in_one_line(models):
    probe = NvmlProbe(nvml=FakeNvml(devices=[]).module(), host=HOST)
    with capture_logs() as logs:
        sup = await start(cfg(), probe, CUDA_NO_DEVICE)
        try:
            async with await acquire(sup, models(0)):
                pass
            (row,) = ps_models(sup)
            assert row["size_vram"] == 0 and row["gpus"] == [] and row["size"] > 0
        finally:
            await asyncio.wait_for(sup.close(), SAFETY)
    (line,) = [e for e in logs if e["event"] == "gpus unused"]
    assert line["reason"].startswith("llama.cpp's CUDA backend found no device (ggml_cuda_init:")
