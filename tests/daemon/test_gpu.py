"""GPU probes: NVML through a fake pynvml module, simulated GPUs, host memory."""

from __future__ import annotations

import sys

import pytest

from corral.daemon import gpu
from tests.daemon.fake_pynvml import FakeDevice, FakeNvml, NVMLError

GiB = 1024**3
HOST = (64 * GiB, 48 * GiB)


def two_gpus(**kw) -> FakeNvml:
    return FakeNvml(
        devices=[
            FakeDevice(name="RTX A", total=24 * GiB, free=20 * GiB, uuid="GPU-aaaa"),
            FakeDevice(name="RTX B", total=12 * GiB, free=11 * GiB, uuid="GPU-bbbb"),
        ],
        **kw,
    )


def test_nvml_reads_devices_and_host_memory():
    nv = two_gpus()
    probe = gpu.NvmlProbe(nvml=nv, host=HOST)
    inv = probe.read()
    assert [(g.id, g.name, g.total, g.free, g.integrated) for g in inv.gpus] == [
        ("0", "RTX A", 24 * GiB, 20 * GiB, False),
        ("1", "RTX B", 12 * GiB, 11 * GiB, False),
    ]
    assert (inv.host.total, inv.host.free) == HOST
    assert {(g.library, g.min_overhead) for g in inv.gpus} == {("cuda", 457 * 1024**2)}
    assert nv.init_calls == 1
    probe.read()
    assert nv.init_calls == 1  # initialised once, not per read
    probe.close()
    probe.close()
    assert nv.shutdown_calls == 1


def test_nvml_bytes_names_are_decoded():
    probe = gpu.NvmlProbe(nvml=two_gpus(names_as_bytes=True), host=HOST)
    assert [g.name for g in probe.read().gpus] == ["RTX A", "RTX B"]


def test_nvml_init_failure_means_no_gpus_logged_once(capsys):
    nv = FakeNvml(devices=[FakeDevice()], init_error=NVMLError(12, "NVML Shared Library Not Found"))
    probe = gpu.NvmlProbe(nvml=nv, host=HOST)
    assert probe.read().gpus == ()
    assert probe.read().gpus == ()
    assert nv.init_calls == 1  # not retried on every refresh
    probe.close()
    assert nv.shutdown_calls == 0  # nothing to shut down


@pytest.mark.parametrize(
    ("visible", "expect"),
    [
        (None, ["0", "1"]),
        ("1", ["1"]),
        ("1,0", ["1", "0"]),
        ("GPU-bbbb", ["1"]),
        ("GPU-bb", ["1"]),  # unique UUID prefix
        ("0,7,1", ["0"]),  # CUDA stops at the first invalid entry
        ("", []),
        ("-1", []),
    ],
)
def test_nvml_honours_cuda_visible_devices(visible, expect):
    probe = gpu.NvmlProbe(nvml=two_gpus(), visible_devices=visible, host=HOST)
    assert [g.id for g in probe.read().gpus] == expect


def test_nvml_child_visible_devices_use_uuids():
    probe = gpu.NvmlProbe(nvml=two_gpus(), host=HOST)
    probe.read()
    assert probe.visible_devices(["1"]) == "GPU-bbbb"
    assert probe.visible_devices(["0", "1"]) == "GPU-aaaa,GPU-bbbb"
    assert probe.visible_devices([]) is None


def test_nvml_device_error_skips_that_device():
    nv = two_gpus()
    nv.devices[0].fail_memory = True
    probe = gpu.NvmlProbe(nvml=nv, host=HOST)
    assert [g.id for g in probe.read().gpus] == ["1"]


def test_nvml_default_module_comes_from_sys_modules(monkeypatch):
    nv = two_gpus()
    monkeypatch.setitem(sys.modules, "pynvml", nv.module())
    probe = gpu.NvmlProbe(host=HOST)
    assert len(probe.read().gpus) == 2
    probe.close()
    assert nv.shutdown_calls == 1


async def test_refresh_runs_blocking_probe_in_a_thread():
    probe = gpu.NvmlProbe(nvml=two_gpus(), host=HOST)
    inv = await probe.refresh()
    assert len(inv.gpus) == 2
    probe.close()


def test_simulated_gpus_from_json_and_set_free():
    probe = gpu.SimulatedProbe(
        '[{"name": "Sim 24", "total": "24GiB", "free": "20GiB"}, {"total": 8589934592}]', host=HOST
    )
    inv = probe.read()
    assert [(g.id, g.name, g.total, g.free) for g in inv.gpus] == [
        ("0", "Sim 24", 24 * GiB, 20 * GiB),
        ("1", "Simulated GPU 1", 8 * GiB, 8 * GiB),
    ]
    probe.set_free("0", 1 * GiB)
    assert probe.read().gpus[0].free == 1 * GiB
    assert probe.visible_devices(["0"]) is None  # never narrow the env for paper GPUs


@pytest.mark.parametrize("bad", ['[{"free": 1}]', '[{"total": 1, "free": 2}]', '[{"total": "x"}]'])
def test_simulated_bad_items_are_named(bad):
    with pytest.raises(ValueError, match=r"CORRAL_SIMULATE_GPUS\[0\]|could not convert"):
        gpu.SimulatedProbe(bad, host=HOST)


def test_host_memory_from_psutil():
    total, available = gpu.host_memory_psutil()
    assert 0 < available <= total


def test_make_probe_picks_simulated_or_nvml():
    class Cfg:
        simulate_gpus = [{"total": GiB}]
        cuda_visible_devices = None

    assert isinstance(gpu.make_probe(Cfg(), host=HOST), gpu.SimulatedProbe)
    Cfg.simulate_gpus = ()
    assert gpu.make_probe(Cfg(), nvml=two_gpus(), host=HOST).read().gpus == ()
    Cfg.simulate_gpus = None
    probe = gpu.make_probe(Cfg(), nvml=two_gpus(), host=HOST)
    assert isinstance(probe, gpu.NvmlProbe)
    assert len(probe.read().gpus) == 2


def test_simulated_gpus_from_config_structs():
    from corral.daemon.config import Config, SimulatedGpu

    cfg = Config(simulate_gpus=(SimulatedGpu(id="a", total=8 * GiB, free=6 * GiB, name="Sim A"),))
    inv = gpu.make_probe(cfg, host=HOST).read()
    assert [(g.id, g.name, g.library, g.total, g.free, g.min_overhead) for g in inv.gpus] == [
        ("a", "Sim A", "cuda", 8 * GiB, 6 * GiB, 0)
    ]
