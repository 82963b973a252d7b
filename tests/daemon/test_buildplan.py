"""daemon/buildplan.py: the llama.cpp build chosen for a machine (issue 7 point 1).

The plan is a pure function of a Machine, so every case is a machine written by hand. The last
tests check the environment this suite runs in: the installed llama.cpp was built with exactly the
flags the function derives for this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.daemon import buildplan as lb

ROOT = Path(__file__).resolve().parents[2]

ZEN3 = lb.normalize_flags("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 avx2 bmi2 popcnt")
SAPPHIRE = lb.normalize_flags(
    "sse4_2 avx f16c fma avx2 bmi2 avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi "
    "avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16"
)
OLD = lb.normalize_flags("sse sse2 ssse3 sse4_1 sse4_2 popcnt")


def args(plan) -> dict[str, str]:
    out = {}
    for a in plan.cmake_args:
        k, _, v = a.removeprefix("-D").partition("=")
        out[k] = v
    return out


def linux(**kw) -> lb.Machine:
    kw.setdefault("cpu_flags", ZEN3)
    return lb.Machine(os="linux", arch="x86_64", **kw)


def test_avx2_only_cpu_gets_no_avx512():
    a = args(lb.plan(linux()))
    assert a["GGML_NATIVE"] == "OFF"
    assert a["GGML_AVX2"] == a["GGML_FMA"] == a["GGML_F16C"] == a["GGML_BMI2"] == "ON"
    for opt in (
        "GGML_AVX512",
        "GGML_AVX512_VBMI",
        "GGML_AVX512_VNNI",
        "GGML_AVX512_BF16",
        "GGML_AVX_VNNI",
    ):
        assert a[opt] == "OFF", opt


def test_cpu_without_avx_gets_every_set_off_explicitly():
    # ggml turns AVX/AVX2/FMA/F16C/BMI2 ON by default when NATIVE is off: they must be said OFF
    a = args(lb.plan(linux(cpu_flags=OLD)))
    assert a["GGML_SSE42"] == "ON"
    for opt in ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"):
        assert a[opt] == "OFF", opt


def test_amx_cpu_gets_amx_off_and_its_other_sets_on():
    p = lb.plan(linux(cpu_flags=SAPPHIRE))
    a = args(p)
    assert a["GGML_AMX_TILE"] == a["GGML_AMX_INT8"] == a["GGML_AMX_BF16"] == "OFF"
    assert a["GGML_AVX512"] == a["GGML_AVX512_VNNI"] == a["GGML_AVX_VNNI"] == "ON"
    assert "AMX off" in p.reason


def test_avx512f_without_bw_is_not_enough_for_ggml_avx512():
    knl = lb.normalize_flags("sse4_2 avx f16c fma avx2 bmi2 avx512f avx512cd")  # Xeon Phi
    assert args(lb.plan(linux(cpu_flags=knl)))["GGML_AVX512"] == "OFF"


def test_linux_with_nvidia_gpus_and_nvcc_builds_cuda_with_their_architectures():
    p = lb.plan(linux(nvidia_gpus=2, cuda_capabilities=("86", "89", "86"), nvcc="/usr/bin/nvcc"))
    a = args(p)
    assert p.backend == "cuda"
    assert a["GGML_CUDA"] == "ON"
    assert a["CMAKE_CUDA_ARCHITECTURES"] == "86;89"
    assert a["GGML_AVX2"] == "ON" and a["GGML_AMX_TILE"] == "OFF"  # the CPU part still fits
    assert p.env["CUDACXX"] == "/usr/bin/nvcc"


def test_cuda_without_known_capabilities_or_version_leaves_architectures_to_llama_cpp():
    p = lb.plan(linux(nvidia_gpus=1, nvcc="/usr/local/cuda/bin/nvcc"))
    assert p.backend == "cuda" and "CMAKE_CUDA_ARCHITECTURES" not in args(p)


@pytest.mark.parametrize(
    ("version", "first", "last", "has_blackwell"),
    [
        ("13.0", "75", "120-real", True),
        ("12.8", "61-virtual", "120-real", True),
        ("12.4", "61-virtual", "90-real", False),
    ],
)
def test_a_build_box_without_gpus_gets_the_documented_list_for_its_toolkit(
    version, first, last, has_blackwell
):
    """No GPU to ask (the CUDA build of this machine): real code for the common cards and PTX of
    the oldest target; CUDA 13 has nothing below 7.5, Blackwell needs 12.8."""
    p = lb.plan(linux(nvcc="/x/nvcc", cuda_version=version), "cuda")
    archs = args(p)["CMAKE_CUDA_ARCHITECTURES"].split(";")
    assert archs[0] == first and archs[-1] == last
    assert ("100-real" in archs) is has_blackwell
    assert "89-real" in archs and "86-real" in archs and "90-real" in archs
    assert lb.default_cuda_architectures("11.8") is None  # ggml's own default there
    assert lb.default_cuda_architectures(None) is None


def test_corral_cuda_architectures_wins_over_the_gpus_and_the_default():
    m = linux(nvidia_gpus=1, cuda_capabilities=("86",), nvcc="/x/nvcc", cuda_version="13.0")
    assert args(lb.plan(m, "auto", "89-real;90"))["CMAKE_CUDA_ARCHITECTURES"] == "89-real;90"
    assert args(lb.plan(m, "auto", " "))["CMAKE_CUDA_ARCHITECTURES"] == "86"
    assert "CMAKE_CUDA_ARCHITECTURES" not in args(lb.plan(m, "cpu", "89"))


@pytest.mark.parametrize("bad", ["8.9", "sm_89", "89;", "compute_90", "89-fake"])
def test_a_malformed_architecture_list_is_refused_before_building(bad):
    with pytest.raises(lb.PlanError, match="CORRAL_CUDA_ARCHITECTURES"):
        lb.plan(linux(nvcc="/x/nvcc"), "cuda", bad)


def test_without_an_nvidia_driver_the_cuda_build_skips_the_driver_linked_pool():
    """ggml links libcuda for its VMM pool: where no driver loads, that wheel would not import."""
    box = lb.plan(linux(nvcc="/x/nvcc", cuda_driver=False), "cuda")
    assert args(box)["GGML_CUDA_NO_VMM"] == "ON"
    assert any("libcuda.so.1" in w for w in box.warnings)
    server = lb.plan(linux(nvidia_gpus=1, nvcc="/x/nvcc", cuda_driver=True))
    assert "GGML_CUDA_NO_VMM" not in args(server) and not server.warnings


def test_a_toolkit_without_cublas_is_a_cpu_build_that_says_what_is_missing():
    p = lb.plan(linux(nvidia_gpus=1, nvcc="/x/nvcc", cublas=False))
    assert p.backend == "cpu" and "cuBLAS" in p.reason
    assert len(p.warnings) == 1 and "libcublas" in p.warnings[0]


def test_vulkan_for_gpus_without_their_vendor_toolkit():
    """Ollama's Vulkan row: NVIDIA without the CUDA toolkit, AMD without ROCm, Intel GPUs."""
    for m in (
        linux(nvidia_gpus=1, vulkan_gpus=1, vulkan_sdk=True),
        linux(amd_gpus=1, vulkan_gpus=1, vulkan_sdk=True),
        linux(vulkan_gpus=1, vulkan_sdk=True),
    ):
        p = lb.plan(m)
        assert p.backend == "vulkan" and args(p)["GGML_VULKAN"] == "ON"
        assert "GGML_CUDA" not in args(p) and args(p)["GGML_AMX_TILE"] == "OFF"
    # the vendor toolkit wins where it is there; no Vulkan GPU or no tools: CPU
    assert (
        lb.plan(linux(nvidia_gpus=1, nvcc="/x", vulkan_gpus=1, vulkan_sdk=True)).backend == "cuda"
    )
    assert lb.plan(linux(vulkan_gpus=1)).backend == "cpu"
    assert lb.plan(linux(vulkan_sdk=True)).backend == "cpu"
    old = linux(
        vulkan_missing=("Vulkan headers 1.3.275 or newer (those in /usr/include are 1.3.239",)
    )
    with pytest.raises(
        lb.PlanError, match=r"1\.3\.275 or newer \(those in /usr/include are 1\.3\.239"
    ):
        lb.plan(old, "vulkan")
    forced = lb.plan(linux(vulkan_sdk=True), "vulkan")  # a build box: forced, as for CUDA
    assert forced.backend == "vulkan" and "CORRAL_LLAMA_BACKEND=vulkan" in forced.reason


def vulkan_include(root: Path, version: tuple[int, int, int], hpp: bool = True) -> Path:
    """A folder of Vulkan headers as Khronos lays them out, of ``version``."""
    (root / "vulkan").mkdir(parents=True)
    major, minor, patch = version
    (root / "vulkan" / "vulkan_core.h").write_text(
        f"#define VK_HEADER_VERSION {patch}\n\n// Complete version of this file\n"
        f"#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, {major}, {minor}, "
        "VK_HEADER_VERSION)\n"
    )
    if hpp:
        (root / "vulkan" / "vulkan.hpp").write_text("#include <vulkan/vulkan.h>\n")
    return root


def test_the_vulkan_headers_checked_are_those_the_build_compiles_with(tmp_path):
    """CORRAL_VULKAN_INCLUDE first (given to CMake), then $VULKAN_SDK/include (FindVulkan's hint),
    then the compiler's order, /usr/local before /usr; each is held to VULKAN_MIN_HEADERS."""
    usr = vulkan_include(tmp_path / "usr", (1, 3, 239))  # Debian 12's
    local = vulkan_include(tmp_path / "local", (1, 4, 309))
    vulkan_include(tmp_path / "sdk" / "include", (1, 3, 275))
    mine = vulkan_include(tmp_path / "mine", (1, 4, 341))
    system = (tmp_path / "nothing", usr)
    include, version, problem = lb.vulkan_headers({}, system)
    assert (include, version) == ("", "1.3.239")
    assert "1.3.275 or newer" in problem and str(usr) in problem and "1.3.239" in problem
    assert "CORRAL_VULKAN_INCLUDE" in problem  # says how to use newer ones
    assert lb.vulkan_headers({}, (local, usr)) == ("", "1.4.309", "")
    sdk_env = {"VULKAN_SDK": str(tmp_path / "sdk")}
    assert lb.vulkan_headers(sdk_env, (local, usr)) == ("", "1.3.275", "")
    explicit = {"VULKAN_SDK": str(tmp_path / "sdk"), "CORRAL_VULKAN_INCLUDE": str(mine)}
    assert lb.vulkan_headers(explicit, (local, usr)) == (str(mine), "1.4.341", "")
    # what cannot build is said, with the folder it looked at
    assert lb.vulkan_headers({}, (tmp_path / "nothing",)) == ("", "", "the Vulkan headers")
    gone = {"CORRAL_VULKAN_INCLUDE": str(tmp_path / "gone")}
    assert "gone has no vulkan/vulkan_core.h" in lb.vulkan_headers(gone, (local,))[2]
    no_hpp = vulkan_include(tmp_path / "c-only", (1, 4, 309), hpp=False)
    _, _, problem = lb.vulkan_headers({"CORRAL_VULKAN_INCLUDE": str(no_hpp)}, (local,))
    assert "vulkan.hpp" in problem
    spaced = vulkan_include(tmp_path / "a b", (1, 4, 309))
    assert "without spaces" in lb.vulkan_headers({"CORRAL_VULKAN_INCLUDE": str(spaced)}, ())[2]
    # the oldest accepted: Ubuntu 24.04's, llama.cpp's own CI; one release older is refused
    edge = vulkan_include(tmp_path / "edge", (1, 3, 274))
    assert lb.vulkan_headers({}, (edge,))[2].startswith("Vulkan headers 1.3.275 or newer")


def test_vulkan_facts_name_what_the_build_lacks_from_the_real_header_check(tmp_path):
    old = vulkan_include(tmp_path / "old", (1, 3, 239))
    gpus, missing, include, version = lb.vulkan_facts(
        {"CORRAL_VULKAN_INCLUDE": str(old), "PATH": os.environ.get("PATH", "")}
    )
    assert include == "" and version == "1.3.239"
    assert any(f"those in {old} are 1.3.239" in m for m in missing)
    with pytest.raises(lb.PlanError, match="those in .* are 1.3.239"):
        lb.plan(linux(vulkan_missing=missing), "vulkan")


def test_chosen_vulkan_headers_go_to_cmake_and_into_the_reason_and_key():
    plain = lb.plan(linux(vulkan_sdk=True, vulkan_headers="1.3.275"), "vulkan")
    assert "Vulkan_INCLUDE_DIR" not in args(plain)  # CMake's own search finds the same ones
    assert "Vulkan headers 1.3.275" in plain.reason
    own = linux(vulkan_sdk=True, vulkan_include="/opt/vk/include", vulkan_headers="1.4.309")
    p = lb.plan(own, "vulkan")
    assert args(p)["Vulkan_INCLUDE_DIR"] == "/opt/vk/include"
    assert "Vulkan headers 1.4.309 from /opt/vk/include" in p.reason
    assert p.key("0.3.36", "3.11", b"x") != plain.key("0.3.36", "3.11", b"x")
    # a CPU or CUDA build does not carry it
    assert "Vulkan_INCLUDE_DIR" not in args(lb.plan(own, "cpu"))


def test_gpu_without_toolkit_is_a_cpu_build_with_a_warning_that_says_how():
    p = lb.plan(linux(nvidia_gpus=2))
    assert p.backend == "cpu" and "GGML_CUDA" not in args(p)
    assert len(p.warnings) == 1 and "CORRAL_LLAMA_BACKEND=cuda" in p.warnings[0]
    assert "CUDA toolkit" in p.warnings[0]


def test_toolkit_without_gpu_is_a_cpu_build():
    p = lb.plan(linux(nvcc="/usr/local/bin/nvcc"))
    assert p.backend == "cpu" and not p.warnings
    assert "no NVIDIA GPU" in p.reason


def test_amd_gpu_with_hipcc_builds_hip():
    p = lb.plan(linux(amd_gpus=1, hip_targets=("gfx1100",), hipcc="/opt/rocm/bin/hipcc"))
    assert p.backend == "hip"
    assert args(p)["GGML_HIP"] == "ON" and args(p)["AMDGPU_TARGETS"] == "gfx1100"


def test_macos_arm64_is_metal_without_any_x86_flag():
    p = lb.plan(lb.Machine(os="darwin", arch="arm64"))
    a = args(p)
    assert p.backend == "metal" and a["GGML_METAL"] == "ON"
    assert not any(
        k.startswith(("GGML_AVX", "GGML_AMX", "GGML_SSE", "GGML_FMA", "GGML_F16C")) for k in a
    )


def test_intel_mac_reads_sysctl_spellings_and_builds_cpu():
    flags = lb.normalize_flags("FPU SSE4.2 AVX1.0 F16C FMA AVX2 BMI2")
    p = lb.plan(lb.Machine(os="darwin", arch="x86_64", cpu_flags=flags))
    a = args(p)
    assert p.backend == "cpu" and a["GGML_METAL"] == "OFF"
    assert a["GGML_AVX"] == a["GGML_AVX2"] == a["GGML_SSE42"] == "ON"


def test_aarch64_linux_builds_natively():
    p = lb.plan(lb.Machine(os="linux", arch="aarch64"))
    assert args(p)["GGML_NATIVE"] == "ON" and p.backend == "cpu"


def test_the_override_wins():
    m = linux(nvidia_gpus=1, nvcc="/usr/bin/nvcc")
    assert lb.plan(m, "cpu").backend == "cpu"
    assert "GGML_CUDA" not in args(lb.plan(m, "cpu"))
    assert lb.plan(linux(nvcc="/usr/bin/nvcc"), "cuda").backend == "cuda"  # no GPU seen: forced
    assert "CORRAL_LLAMA_BACKEND=cuda" in lb.plan(linux(nvcc="/x/nvcc"), "CUDA").reason


@pytest.mark.parametrize(
    ("machine", "override", "text"),
    [
        (linux(), "cuda", "nvcc"),
        (linux(), "hip", "hipcc"),
        (linux(), "metal", "macOS"),
        (linux(), "vulkan", "glslc"),
        (linux(), "rocm", "one of"),
        (linux(nvcc="/x/nvcc", cublas=False), "cuda", "no cuBLAS"),
    ],
)
def test_an_override_the_machine_cannot_take_is_an_error(machine, override, text):
    with pytest.raises(lb.PlanError, match=text):
        lb.plan(machine, override)


def test_the_cache_key_changes_with_backend_flags_patch_version_and_python():
    m = linux(nvidia_gpus=1, nvcc="/usr/bin/nvcc")
    base = lb.plan(m, "cpu").key("0.3.36", "3.11", b"patch")
    assert lb.plan(m, "cuda").key("0.3.36", "3.11", b"patch") != base
    assert lb.plan(linux(cpu_flags=SAPPHIRE), "cpu").key("0.3.36", "3.11", b"patch") != base
    assert lb.plan(m, "cpu").key("0.3.36", "3.11", b"patch2") != base
    assert lb.plan(m, "cpu").key("0.3.37", "3.11", b"patch") != base
    assert lb.plan(m, "cpu").key("0.3.36", "3.12", b"patch") != base
    assert lb.plan(m, "cpu").key("0.3.36", "3.11", b"patch") == base


def test_the_script_prints_its_choice_and_reason_in_one_line():
    out = subprocess.run(
        [sys.executable, str(ROOT / "daemon" / "buildplan.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith("llama.cpp build: ") and " because " in out[0]


def test_this_environment_runs_the_build_the_function_derives_for_this_machine():
    """./dev built llama-cpp-python with the plan of this machine (the install records it)."""
    record = Path(sys.prefix) / "corral-llama-build.json"
    installed = json.loads(record.read_text())
    want = lb.plan(lb.probe_machine(), os.environ.get("CORRAL_LLAMA_BACKEND", "auto"))
    assert installed["backend"] == want.backend
    assert installed["cmake_args"] == want.cmake_args_str
    assert "-DGGML_AMX_INT8=OFF" in installed["cmake_args"]


def test_glslc_without_the_fast_shader_extensions_is_a_warning_not_an_error(tmp_path):
    """ggml's CMake silently leaves shaders out for what glslc cannot compile; the plan says so."""
    glslc = tmp_path / "glslc"  # answers as shaderc 2023.2 does (Debian 12) for what it lacks
    glslc.write_text(
        "#!/bin/sh\n"
        'src=$(cat); case "$*" in *-fshader-stage=compute*) ;; *) exit 2 ;; esac\n'
        'case "$src" in *GL_KHR_cooperative_matrix*)\n'
        "  echo \"<stdin>:2: error: '#extension' : extension not supported: "
        'GL_KHR_cooperative_matrix" >&2; exit 1 ;; esac\n'
    )
    glslc.chmod(0o755)
    assert lb.glslc_lacks(str(glslc)) == ("GL_KHR_cooperative_matrix",)
    assert lb.glslc_lacks(str(tmp_path / "absent")) == ()
    assert lb.glslc_lacks(None) == ()
    m = linux(vulkan_sdk=True, glslc_lacks=("GL_EXT_integer_dot_product",))
    p = lb.plan(m, "vulkan")
    assert p.backend == "vulkan" and len(p.warnings) == 1
    assert "integer-dot quantized matmul shaders" in p.warnings[0]
    assert lb.plan(linux(vulkan_sdk=True), "vulkan").warnings == ()
    assert lb.plan(m, "cpu").warnings == ()  # only a Vulkan build is concerned
