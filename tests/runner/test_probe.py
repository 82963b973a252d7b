"""``python -m corral.runner --probe`` on this machine's real llama.cpp build, and the daemon's
cached use of it (issue 7 points 2 and 6)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corral.daemon import engine_probe
from corral.daemon.cli import doctor
from corral.daemon.config import Config
from corral.runner.protocol import EngineProbe, decode_probe, encode
from tests.daemon.fake_pynvml import FakeDevice, FakeNvml

GiB = 1 << 30


def test_the_probe_prints_one_json_line_with_this_builds_devices():
    out = subprocess.run(
        [sys.executable, "-m", "corral.runner", "--probe"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 1  # llama.cpp's own log goes to stderr
    probe = decode_probe(lines[0])
    assert probe.error is None
    cpu = [d for d in probe.devices if d.type == "cpu"]
    assert len(cpu) == 1 and cpu[0].backend == "CPU" and cpu[0].total > 0
    # offload support and GPU devices agree (this machine: neither)
    assert probe.gpu_offload == bool(probe.gpu_backends())
    assert "AVX2 = 1" in probe.system_info or "NEON = 1" in probe.system_info
    assert "AMX_INT8 = 1" not in probe.system_info
    assert probe.build["backend"] in ("cpu", "cuda", "hip", "metal")
    assert "-DGGML_AMX_INT8=OFF" in probe.build["cmake_args"] or probe.build["backend"] == "metal"


def _counting_probe(tmp_path: Path, answer: EngineProbe) -> tuple[tuple[str, ...], Path]:
    calls = tmp_path / "calls"
    script = (
        f"import sys; open({str(calls)!r}, 'a').write('x'); "
        f"sys.stdout.write({encode(answer).decode()!r} + '\\n')"
    )
    return (sys.executable, "-c", script), calls


async def test_the_daemon_probes_once_per_engine_build(tmp_path):
    argv, calls = _counting_probe(tmp_path, EngineProbe(llama_cpp_python="9.9"))
    cache = tmp_path / "cache"
    first = await engine_probe.probe_engine(cache, None, argv=argv)
    second = await engine_probe.probe_engine(cache, None, argv=argv)
    assert first == second and first.llama_cpp_python == "9.9"
    assert calls.read_text() == "x"  # the second answer came from the cache
    await engine_probe.probe_engine(cache, "1", argv=argv)  # another device mask: probe again
    assert calls.read_text() == "xx"


async def test_a_gpu_build_without_a_device_is_probed_again_at_each_start(tmp_path):
    """The driver may be installed (or the container given its GPU) after the first start."""
    no_device = EngineProbe(build={"backend": "cuda"}, backends=["CUDA", "CPU"])
    argv, calls = _counting_probe(tmp_path, no_device)
    cache = tmp_path / "cache"
    for _ in range(2):
        assert (await engine_probe.probe_engine(cache, None, argv=argv)).idle_gpu_backends()
    assert calls.read_text() == "xx" and not list(cache.glob("engine-probe-*.json"))


async def test_another_vulkan_device_or_driver_selection_probes_again(tmp_path):
    argv, calls = _counting_probe(tmp_path, EngineProbe(llama_cpp_python="9.9"))
    cache = tmp_path / "cache"
    env = {"GGML_VK_VISIBLE_DEVICES": "1", "PATH": "/bin"}
    for selection in ("", "", Config.from_env(env).device_selection):
        await engine_probe.probe_engine(cache, None, argv=argv, selection=selection)
    assert Config.from_env(env).device_selection == "GGML_VK_VISIBLE_DEVICES=1"
    no_icd = Config.from_env({"VK_DRIVER_FILES": "/nonexistent.json"}).device_selection
    await engine_probe.probe_engine(cache, None, argv=argv, selection=no_icd)
    assert calls.read_text() == "xxx"


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (
            (
                sys.executable,
                "-c",
                "import sys; sys.stderr.write('libcuda.so.1: cannot open\\n'); sys.exit(1)",
            ),
            "libcuda.so.1: cannot open",
        ),
        ((sys.executable, "-c", "print('not json')"), "garbage"),
        (("/nonexistent/python",), "cannot start"),
    ],
)
async def test_a_failing_probe_is_an_error_answer_never_an_exception_and_never_cached(
    tmp_path, argv, text
):
    result = await engine_probe.probe_engine(tmp_path, None, argv=argv)
    assert result.error is not None and text in result.error
    assert result.devices == [] and not result.gpu_offload
    assert not list(tmp_path.glob("engine-probe-*.json"))


# ------------------------------------------------------------------------------ corral doctor


def test_doctor_prints_this_machines_real_build_and_cpu_flags():
    out = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "doctor"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    for heading in (
        "build",
        "cpu",
        "gpus",
        "memory",
        "huge pages",
        "store",
        "environment",
        "problems",
    ):
        assert f"\n{heading}\n" in f"\n{out}"
    record = json.loads((Path(sys.prefix) / "corral-llama-build.json").read_text())
    assert record["cmake_args"] in out  # the real flags of this install
    assert "AVX2" in out and "OLLAMA_HOST=" in out


async def test_doctor_json_parses_and_names_the_unused_gpus(tmp_path):
    cpu_only = EngineProbe(llama_cpp_python="0.3.36", build={"backend": "cpu"})
    nv = FakeNvml(devices=[FakeDevice(name="NVIDIA L4", total=24 * GiB)]).module()
    config = Config(models=tmp_path / "models")
    report = await doctor.collect(config, engine=cpu_only, nvml=nv)
    report = json.loads(json.dumps(report))  # plain data
    assert report["gpus"]["nvml"][0]["usable"] is False
    assert any("1 NVIDIA GPU unused" in p["problem"] for p in report["problems"])
    assert report["environment"]["OLLAMA_MODELS"]["value"] == str(tmp_path / "models")
    out = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    parsed = json.loads(out)
    assert set(parsed) >= {
        "build",
        "cpu",
        "gpus",
        "memory",
        "huge_pages",
        "store",
        "environment",
        "problems",
    }


async def test_doctor_asks_nvml_once_for_the_gpu_list_and_the_build_plan(tmp_path):
    fake = FakeNvml(devices=[FakeDevice(name="NVIDIA L4", total=24 * GiB, capability=(8, 9))])
    cpu_only = EngineProbe(llama_cpp_python="0.3.36", build={"backend": "cpu"})
    report = await doctor.collect(
        Config(models=tmp_path / "models"), engine=cpu_only, nvml=fake.module()
    )
    assert fake.init_calls == 1 and fake.shutdown_calls == 1
    # the build plan saw the same (fake) GPU, not a second NVML of its own
    assert "NVIDIA GPU(s)" in report["build"]["plan_for_this_machine"]


@pytest.mark.parametrize(
    ("text", "libc", "usable", "fix"),
    [
        ("always madvise [never]", "glibc", False, "echo madvise > "),
        ("always [madvise] never", "", False, "echo always > "),  # musl: nobody asks
        ("always [madvise] never", "glibc", True, None),
        ("[always] madvise never", "", True, None),
        (None, "glibc", False, None),  # not Linux: nothing to fix
    ],
)
async def test_doctor_reports_transparent_huge_pages_with_the_fix(
    tmp_path, text, libc, usable, fix
):
    setting = tmp_path / "enabled"
    if text is not None:
        setting.write_text(text + "\n")
    cpu_only = EngineProbe(llama_cpp_python="0.3.36", build={"backend": "cpu"})
    report = await doctor.collect(
        Config(models=tmp_path / "models"),
        engine=cpu_only,
        nvml=FakeNvml().module(),
        thp_setting=setting,
        libc=libc,
    )
    report = json.loads(json.dumps(report))
    thp = report["huge_pages"]
    assert thp["runners_get_huge_pages"] is usable
    assert thp["mode"] == (None if text is None else text.split("[")[1].split("]")[0])
    problems = [p for p in report["problems"] if "huge pages" in p["problem"]]
    text_out = doctor.render(report)
    if fix is None:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problems[0]["fix"].startswith(fix + str(setting))
        assert "4 KiB pages" in problems[0]["problem"] and "15-30%" in problems[0]["problem"]
        assert problems[0]["fix"] in text_out
    assert (
        "runners get them" if usable else "NOT get them" if text else "no transparent"
    ) in text_out
