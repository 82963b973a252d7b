"""Chooses how llama.cpp (inside llama-cpp-python) is built for the machine it is installed on.

    python daemon/buildplan.py            # one line: the chosen build and why
    python daemon/buildplan.py --shell    # shell assignments for scripts/install-llama.sh
    python daemon/buildplan.py --json     # the whole plan

Standard library only and runnable as a file: scripts/install-llama.sh runs it before corral is
installed; `corral doctor` imports it as ``corral.daemon.buildplan``.

`plan(machine, override)` is pure: from the OS, the architecture, the CPU's feature flags, the GPUs
seen and the toolkits found it derives the backend, the CMake options, extra environment and the
wheel cache key. `probe_machine()` gathers those facts (reads /proc/cpuinfo or sysctl, looks for
nvcc / hipcc, asks NVML or nvidia-smi for compute capabilities); it is the only part that touches
the system. `CORRAL_LLAMA_BACKEND=auto|cpu|cuda|hip|metal|vulkan` overrides the backend;
`CORRAL_CUDA_ARCHITECTURES` (a CMake list, e.g. `89` or `80;90`) overrides the CUDA targets;
`CORRAL_VULKAN_INCLUDE` (a folder holding vulkan/vulkan.hpp) chooses the Vulkan headers.

Decision tree of the backend (numbers appear in the code):
 1. an override other than `auto` wins; `cuda`/`hip` without their compiler is an error.
 2. macOS on arm64: Metal (llama.cpp's default there); no x86 flag.
 3. NVIDIA GPUs seen and a CUDA toolkit found: CUDA, with the GPUs' compute capabilities as
    CMAKE_CUDA_ARCHITECTURES when known. GPUs without a toolkit: CPU build and a warning.
 4. AMD GPUs seen and ROCm's hipcc found: HIP (gfx targets from rocminfo when known).
 5. a Vulkan GPU seen (an NVIDIA GPU without the CUDA toolkit, an AMD GPU without ROCm, an Intel
    GPU), with the Vulkan loader, its headers, SPIR-V headers and `glslc` present: Vulkan, as
    Ollama ships it for those GPUs. The headers must be `VULKAN_MIN_HEADERS` or newer; the plan
    reads the version of the very headers the build will use (see `vulkan_headers`).
 6. otherwise CPU. A toolkit without a GPU is not a reason to build for it (a CUDA build takes
    an hour on two cores and its runner would find no device); the override forces it.

CUDA specifics (learned by compiling it, toolkit 13.0 on a machine without a GPU):
- targets: `CORRAL_CUDA_ARCHITECTURES` if set, else the GPUs' compute capabilities, else (a
  build box without a GPU) `DEFAULT_CUDA_ARCHITECTURES` for the toolkit's major version: real
  code for the common datacenter and desktop cards and PTX for the oldest supported one, so
  anything newer still runs (JIT-compiled once by the driver). CUDA 13 dropped compute
  capabilities below 7.5, so its list starts at 75.
- ggml's CUDA backend links cuBLAS: a toolkit without it (e.g. one assembled from NVIDIA's pip
  wheels without `nvidia-cublas`) fails an hour into nothing at configure time, so the plan
  checks for it first.
- ggml links the CUDA driver library (libcuda) for its virtual-memory pool. Where no driver is
  installed (a build box, a container without the NVIDIA runtime) that wheel would not even
  import, so there the plan sets `GGML_CUDA_NO_VMM=ON`: the wheel then loads, finds no device
  and runs on the CPU. Where a driver exists the pool keeps VMM.

CPU flags on x86-64 (every backend keeps a CPU backend for what is not offloaded):
`GGML_NATIVE=OFF` and each instruction set set explicitly ON or OFF from the CPU's flags (ggml
turns SSE4.2/AVX/AVX2/BMI2/FMA/F16C on by default when NATIVE is off, which dies with an illegal
instruction on CPUs without them). AMX is always OFF: ggml's AMX matmul segfaults on some CPUs,
and a native build (`-march=native`) would enable it on every AMX CPU, so native is not used on
x86. Other architectures (aarch64 Linux) build natively: the wheel is built on the machine that
runs it and ARM has no such crash.

Why not one portable x86 build (`GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`): llama-cpp-python
0.3.36 never calls `ggml_backend_load_all()`, so a build with dynamically loaded backends has no
CPU backend at all without more patching; it compiles the CPU backend thirteen times (over half an
hour on two cores); and its runtime pick on an AMX CPU is the `sapphirerapids` variant with AMX on,
the very crash above. A per-machine build is what `./dev` does anyway (the wheel is cached per
plan key, so a changed CPU or a new toolkit builds again).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

BACKENDS = ("auto", "cpu", "cuda", "hip", "metal", "vulkan")

# The oldest Vulkan headers ggml-vulkan compiles with: llama.cpp's own CI builds it on Ubuntu 24.04
# with that release's libvulkan-dev (1.3.275). Debian 12's 1.3.239 lack VK_EXT_layer_settings
# (1.3.272) and fail to compile (`'LayerSettingEXT' is not a member of 'vk'`, seen here).
VULKAN_MIN_HEADERS = (1, 3, 275)

# GLSL extensions ggml-vulkan compiles its fastest shaders with when glslc has them (its CMake
# tests each and silently leaves the shaders out otherwise): the quantized matmul by integer dot
# products and the cooperative-matrix matmul. Debian 12's glslc (shaderc 2023.2) has neither.
GLSLC_FEATURES = {
    "GL_EXT_integer_dot_product": "integer-dot quantized matmul",
    "GL_KHR_cooperative_matrix": "cooperative-matrix matmul",
}

# CMAKE_CUDA_ARCHITECTURES for a machine whose GPUs cannot be asked (a build box), by the CUDA
# toolkit's version: real code for the common cards — 70 V100, 75 T4/RTX 20xx, 80 A100/A30,
# 86 RTX 30xx/A10/A40, 89 RTX 40xx/L4/L40, 90 H100/H200, 100 B200 and 120 RTX 50xx (both 12.8+;
# ggml turns 120 into 120a) — and PTX of the oldest one, which any newer GPU JIT-compiles once.
# Each real target adds about as much compile time again as the first.


def default_cuda_architectures(version: str | None) -> str | None:
    """The documented target list for toolkit ``version`` ("13.0"); None: ggml's own default."""
    try:
        major, minor = (int(x) for x in (version or "").split(".")[:2])
    except ValueError:
        return None
    if major >= 13:  # CUDA 13 dropped compute capabilities below 7.5
        archs = ["75", "80-real", "86-real", "89-real", "90-real", "100-real", "120-real"]
    elif major == 12:
        archs = ["61-virtual", "70-real", "75-real", "80-real", "86-real", "89-real", "90-real"]
        if minor >= 8:
            archs += ["100-real", "120-real"]
    else:
        return None
    return ";".join(archs)


# ggml CMake option -> the CPU flags (Linux /proc/cpuinfo names) it needs, in ggml's order.
X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    # ggml compiles its AVX512 path with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512f", "avx512vbmi")),
    ("GGML_AVX512_VNNI", ("avx512f", "avx512_vnni")),
    ("GGML_AVX512_BF16", ("avx512f", "avx512_bf16")),
)
AMX_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")

# macOS sysctl spellings -> Linux cpuinfo spellings
_MAC_NAMES = {
    "sse4.2": "sse4_2",
    "avx1.0": "avx",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avxvnni": "avx_vnni",
    "avx512vbmi": "avx512vbmi",
}


@dataclass(frozen=True)
class Machine:
    """What the build depends on. Every field is plain data, so tests write machines by hand."""

    os: str  # "linux" | "darwin" | ...
    arch: str  # "x86_64" | "arm64" | "aarch64" | ...
    cpu_flags: frozenset[str] = frozenset()
    nvidia_gpus: int = 0
    cuda_capabilities: tuple[str, ...] = ()  # "86", "89", ... as CMAKE_CUDA_ARCHITECTURES wants
    amd_gpus: int = 0
    hip_targets: tuple[str, ...] = ()  # "gfx1100", ...
    nvcc: str | None = None
    hipcc: str | None = None
    cuda_version: str | None = None  # the toolkit's release, "13.0"
    cublas: bool = True  # the CUDA toolkit has cuBLAS (libcublas.so and cublas_v2.h)
    cuda_driver: bool = True  # the NVIDIA driver library (libcuda.so.1) loads here
    vulkan_gpus: int = 0  # Vulkan devices that are GPUs (not a CPU rasteriser like llvmpipe)
    vulkan_sdk: bool = False  # loader + headers, SPIR-V headers and glslc: ggml-vulkan builds
    vulkan_missing: tuple[str, ...] = ()  # what it lacks otherwise, for the error
    vulkan_include: str = ""  # CORRAL_VULKAN_INCLUDE, given to CMake ("": CMake's own search)
    vulkan_headers: str = ""  # the version of the headers the build compiles with, "1.4.309"
    glslc_lacks: tuple[str, ...] = ()  # GLSL extensions of GLSLC_FEATURES glslc cannot compile


@dataclass(frozen=True)
class BuildPlan:
    backend: str
    cmake_args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def cmake_args_str(self) -> str:
        return " ".join(self.cmake_args)

    def key(self, version: str, python: str, patch: bytes) -> str:
        """The wheel cache key: llama-cpp-python version, backend, flags, env, Python, patch."""
        blob = json.dumps(
            [
                version,
                self.backend,
                list(self.cmake_args),
                sorted(self.env.items()),
                python,
                hashlib.sha256(patch).hexdigest(),
            ]
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PlanError(ValueError):
    """The override asks for a build this machine cannot make."""


_NO_CUBLAS = (
    "the CUDA toolkit of {nvcc} has no cuBLAS (libcublas.so, cublas_v2.h), which llama.cpp's CUDA "
    "backend links: install the toolkit's cuBLAS development files (the libcublas-dev / "
    "cuda-libraries-dev package of the same CUDA version)"
)
_ARCH = re.compile(r"^(native|all|all-major|[0-9]{2,3}[af]?(-real|-virtual)?)$")


def _check_cuda_architectures(archs: str) -> None:
    """Refuse a malformed CORRAL_CUDA_ARCHITECTURES before an hour-long build does."""
    bad = [a for a in archs.split(";") if not _ARCH.match(a.strip())]
    if bad:
        raise PlanError(
            f"CORRAL_CUDA_ARCHITECTURES={archs!r}: {', '.join(map(repr, bad))} is not a CUDA "
            "architecture (use compute capabilities without the dot, e.g. 86;89 or 90-real)"
        )


def normalize_flags(raw: str) -> frozenset[str]:
    """CPU flags from /proc/cpuinfo's `flags` or macOS sysctl words, in cpuinfo spelling."""
    out = set()
    for word in raw.replace(",", " ").split():
        w = word.strip().lower()
        out.add(_MAC_NAMES.get(w, w))
    return frozenset(out)


def x86_args(flags: frozenset[str]) -> tuple[list[str], list[str]]:
    """(CMake options, names of the sets turned on) for an x86-64 CPU with these flags."""
    args = ["-DGGML_NATIVE=OFF"]
    on = []
    for opt, need in X86_OPTIONS:
        have = all(f in flags for f in need)
        args.append(f"-D{opt}={'ON' if have else 'OFF'}")
        if have:
            on.append(opt.removeprefix("GGML_"))
    args += [f"-D{opt}=OFF" for opt in AMX_OFF]
    return args, on


def _is_x86(arch: str) -> bool:
    return arch.lower() in ("x86_64", "amd64", "x64")


def plan(m: Machine, override: str = "auto", cuda_architectures: str = "") -> BuildPlan:
    """The build for machine `m`. Pure; raises PlanError for an override the machine can't take.

    ``cuda_architectures``: CORRAL_CUDA_ARCHITECTURES, a CMake list ("" = derive it)."""
    override = (override or "auto").strip().lower()
    if override not in BACKENDS:
        raise PlanError(f"CORRAL_LLAMA_BACKEND={override!r}: use one of {', '.join(BACKENDS)}")
    warnings: list[str] = []
    why: str
    # 1. the override wins
    if override != "auto":
        backend = override
        why = f"CORRAL_LLAMA_BACKEND={override}"
        if backend == "cuda" and not m.nvcc:
            raise PlanError(
                "CORRAL_LLAMA_BACKEND=cuda but no CUDA toolkit: nvcc is not on PATH, "
                "under $CUDA_HOME/bin or /usr/local/cuda/bin"
            )
        if backend == "hip" and not m.hipcc:
            raise PlanError("CORRAL_LLAMA_BACKEND=hip but ROCm's hipcc was not found")
        if backend == "metal" and m.os != "darwin":
            raise PlanError("CORRAL_LLAMA_BACKEND=metal needs macOS")
        if backend == "vulkan" and not m.vulkan_sdk:
            lacks = ", ".join(m.vulkan_missing) or "the Vulkan build tools"
            raise PlanError(
                f"CORRAL_LLAMA_BACKEND=vulkan but this machine lacks {lacks}: the build needs the "
                f"Vulkan loader, headers {'.'.join(map(str, VULKAN_MIN_HEADERS))} or newer, SPIR-V "
                "headers and glslc (Debian 13 / Ubuntu 24.04: apt-get install libvulkan-dev "
                "spirv-headers glslc)"
            )
        if backend == "cuda" and not m.cublas:
            raise PlanError(_NO_CUBLAS.format(nvcc=m.nvcc))
    # 2. Apple silicon
    elif m.os == "darwin" and not _is_x86(m.arch):
        backend, why = "metal", "macOS on Apple silicon: Metal"
    # 3. NVIDIA
    elif m.nvidia_gpus and m.nvcc and m.cublas:
        backend, why = "cuda", f"{m.nvidia_gpus} NVIDIA GPU(s) and CUDA toolkit {m.nvcc}"
    # 4. AMD
    elif m.amd_gpus and m.hipcc:
        backend, why = "hip", f"{m.amd_gpus} AMD GPU(s) and ROCm {m.hipcc}"
    # 5. Vulkan
    elif m.vulkan_gpus and m.vulkan_sdk:
        backend, why = "vulkan", f"{m.vulkan_gpus} Vulkan GPU(s) and no CUDA/ROCm toolkit for them"
        if m.nvidia_gpus and m.nvcc and not m.cublas:
            warnings.append(_NO_CUBLAS.format(nvcc=m.nvcc) + "; building for Vulkan meanwhile")
    # 6. CPU
    else:
        backend, why = "cpu", "no usable GPU toolkit"
        if m.nvidia_gpus and m.nvcc and not m.cublas:
            warnings.append(_NO_CUBLAS.format(nvcc=m.nvcc) + ": this build runs on the CPU only")
            why = "NVIDIA GPU(s) and a CUDA toolkit without cuBLAS"
        elif m.nvidia_gpus:
            warnings.append(
                f"{m.nvidia_gpus} NVIDIA GPU(s) found but no CUDA toolkit (nvcc): this build runs "
                "on the CPU only; install the CUDA toolkit and reinstall with "
                "CORRAL_LLAMA_BACKEND=cuda (or the Vulkan build tools for a Vulkan build)"
            )
            why = "NVIDIA GPU(s) without a CUDA toolkit"
        elif m.amd_gpus:
            warnings.append(
                f"{m.amd_gpus} AMD GPU(s) found but no ROCm hipcc: this build runs on the CPU "
                "only; install ROCm and reinstall with CORRAL_LLAMA_BACKEND=hip"
            )
            why = "AMD GPU(s) without ROCm"
        elif m.nvcc:
            why = "CUDA toolkit found but no NVIDIA GPU (CORRAL_LLAMA_BACKEND=cuda forces it)"
        elif m.hipcc:
            why = "ROCm found but no AMD GPU (CORRAL_LLAMA_BACKEND=hip forces it)"

    args: list[str] = []
    env: dict[str, str] = {}
    if _is_x86(m.arch):
        cpu_args, on = x86_args(m.cpu_flags)
        args += cpu_args
        cpu_desc = "x86-64 " + ("+".join(on) if on else "baseline") + ", AMX off"
    else:
        args.append("-DGGML_NATIVE=ON")
        cpu_desc = f"{m.arch} native"
    if backend == "cuda":
        args.append("-DGGML_CUDA=ON")
        archs = cuda_architectures.strip()
        if not archs and m.cuda_capabilities:
            archs = ";".join(sorted(set(m.cuda_capabilities)))
        if not archs:
            archs = default_cuda_architectures(m.cuda_version) or ""
        if archs:
            _check_cuda_architectures(archs)
            args.append("-DCMAKE_CUDA_ARCHITECTURES=" + archs)
        if not m.cuda_driver:
            args.append("-DGGML_CUDA_NO_VMM=ON")  # loads without libcuda (see the docstring)
            warnings.append(
                "no NVIDIA driver (libcuda.so.1) here: the CUDA build will load and find no "
                "device; it is built without the driver's virtual-memory pool (GGML_CUDA_NO_VMM)"
            )
        if m.nvcc:
            env["CUDACXX"] = m.nvcc
    elif backend == "hip":
        args.append("-DGGML_HIP=ON")
        if m.hip_targets:
            args.append("-DAMDGPU_TARGETS=" + ";".join(sorted(set(m.hip_targets))))
    elif backend == "metal":
        args.append("-DGGML_METAL=ON")
    elif backend == "vulkan":
        args.append("-DGGML_VULKAN=ON")
        if m.vulkan_include:
            args.append("-DVulkan_INCLUDE_DIR=" + m.vulkan_include)
        if m.glslc_lacks:
            shaders = " and ".join(GLSLC_FEATURES.get(e, e) for e in m.glslc_lacks)
            warnings.append(
                f"this glslc cannot compile {', '.join(m.glslc_lacks)}: the Vulkan build leaves "
                f"out ggml's {shaders} shaders, slower on GPUs that have them (a newer glslc: "
                "Debian 13's, the LunarG SDK)"
            )
        why += f"; Vulkan headers {m.vulkan_headers or '?'}"
        if m.vulkan_include:
            why += f" from {m.vulkan_include}"
    elif m.os == "darwin":
        args.append("-DGGML_METAL=OFF")  # an Intel Mac: CPU build
    reason = f"llama.cpp build: {backend} ({cpu_desc}) because {why}"
    return BuildPlan(backend, tuple(args), env, reason, tuple(warnings))


# ---------------------------------------------------------------- probing (touches the system)


def _run_all(cmd: list[str]) -> str:
    """stdout and stderr of ``cmd`` ("" when it cannot run)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout + r.stderr


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def find_nvcc(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    for root in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(Path(root, "bin", "nvcc"), os.X_OK):
            return str(Path(root, "bin", "nvcc"))
    return None


def find_hipcc(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    found = shutil.which("hipcc", path=env.get("PATH"))
    if found:
        return found
    for root in (env.get("ROCM_PATH"), "/opt/rocm"):
        if root and os.access(Path(root, "bin", "hipcc"), os.X_OK):
            return str(Path(root, "bin", "hipcc"))
    return None


def cuda_toolkit(nvcc: str | None) -> tuple[str | None, bool]:
    """(release "13.0", has cuBLAS) of the toolkit whose compiler is ``nvcc``.

    The toolkit's root is what nvcc itself reports (``TOP``: nvcc may be a wrapper script
    elsewhere on PATH), and cuBLAS counts when both its library and its header are there."""
    if not nvcc:
        return None, False
    found = re.search(r"release (\d+\.\d+)", _run([nvcc, "--version"]))
    dry = _run_all([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
    roots = [Path(t).resolve() for t in re.findall(r"TOP=(\S+)", dry)]
    roots.append(Path(nvcc).resolve().parent.parent)
    for root in roots:
        dirs = [root, *root.glob("targets/*")]
        lib = any(any((d / sub).glob("libcublas.so*")) for d in dirs for sub in ("lib64", "lib"))
        header = any((d / "include" / "cublas_v2.h").is_file() for d in dirs)
        if lib and header:
            return (found.group(1) if found else None), True
    return (found.group(1) if found else None), False


def cuda_driver_loads() -> bool:
    """Whether the NVIDIA driver's library loads in this process (absent on a build box)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def vulkan_headers_version(include: Path) -> tuple[int, int, int] | None:
    """The version of the Vulkan headers under ``include`` (its vulkan/vulkan_core.h), or None."""
    try:
        text = (include / "vulkan" / "vulkan_core.h").read_text(errors="replace")
    except OSError:
        return None
    patch = re.search(r"#define VK_HEADER_VERSION (\d+)", text)
    api = re.search(
        r"#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(\s*0,\s*(\d+),\s*(\d+),", text
    )
    if not patch:
        return None
    major, minor = (int(api.group(1)), int(api.group(2))) if api else (1, 0)
    return major, minor, int(patch.group(1))


def vulkan_headers(
    environ: Mapping[str, str] | None = None,
    system: tuple[Path, ...] = (Path("/usr/local/include"), Path("/usr/include")),
) -> tuple[str, str, str]:
    """(include dir to give CMake or "", the version "1.4.309" of the headers the build will
    compile with, what is wrong with them or "").

    The headers are those CMake's FindVulkan and the compiler will really use:
    `CORRAL_VULKAN_INCLUDE` (then passed as Vulkan_INCLUDE_DIR, the first on the include path),
    else `$VULKAN_SDK/include` (FindVulkan's hint), else the compiler's own order, /usr/local
    before /usr. They must have vulkan.hpp and be at least `VULKAN_MIN_HEADERS`."""
    env = os.environ if environ is None else environ
    explicit = env.get("CORRAL_VULKAN_INCLUDE", "").strip()
    if explicit:
        where, dirs = "CORRAL_VULKAN_INCLUDE=" + explicit, [Path(explicit)]
        if re.search(r"\s", explicit):
            return "", "", f"{where}: a folder without spaces (CMAKE_ARGS splits on them)"
    else:
        sdk = env.get("VULKAN_SDK", "").strip()
        where, dirs = "", [*([Path(sdk, "include")] if sdk else []), *system]
    found = next((d for d in dirs if (d / "vulkan" / "vulkan_core.h").is_file()), None)
    if found is None:
        return "", "", (f"{where} has no vulkan/vulkan_core.h" if where else "the Vulkan headers")
    version = vulkan_headers_version(found)
    shown = ".".join(map(str, version)) if version else "?"
    least = ".".join(map(str, VULKAN_MIN_HEADERS))
    if version is None or version < VULKAN_MIN_HEADERS:
        return (
            "",
            shown,
            (
                f"Vulkan headers {least} or newer (those in {found} are {shown}; newer ones: "
                "Debian 13's or Ubuntu 24.04's libvulkan-dev, the LunarG SDK, or Khronos' "
                "Vulkan-Headers with CORRAL_VULKAN_INCLUDE=<their include folder>)"
            ),
        )
    if not (found / "vulkan" / "vulkan.hpp").is_file():
        return "", shown, f"the Vulkan C++ headers (vulkan.hpp) beside {found}/vulkan/vulkan_core.h"
    return (str(found) if explicit else ""), shown, ""


def glslc_lacks(glslc: str | None) -> tuple[str, ...]:
    """The extensions of GLSLC_FEATURES that ``glslc`` refuses, tested as ggml's CMake does."""
    if not glslc:
        return ()
    lacks = []
    for ext in GLSLC_FEATURES:
        shader = f"#version 460\n#extension {ext} : require\nvoid main() {{}}\n"
        try:
            r = subprocess.run(
                [glslc, "-o", os.devnull, "-fshader-stage=compute", "--target-env=vulkan1.3", "-"],
                input=shader,
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if f"extension not supported: {ext}" in r.stderr:
            lacks.append(ext)
    return tuple(lacks)


def vulkan_facts(environ: Mapping[str, str] | None = None) -> tuple[int, tuple[str, ...], str, str]:
    """(Vulkan GPUs seen, what ggml-vulkan's build lacks here: () when it can build, the include
    dir to give CMake or "", the headers' version).

    GPUs: `vulkaninfo --summary`'s devices that are not a CPU rasteriser (llvmpipe, SwiftShader);
    without vulkaninfo, the kernel's DRM render nodes. The build needs glslc on PATH, the loader's
    development library, headers as :func:`vulkan_headers` checks them (Debian 12's 1.3.239 are
    too old: ggml-vulkan.cpp fails to compile, seen here) and SPIR-V headers' CMake package."""
    env = os.environ if environ is None else environ
    if shutil.which("vulkaninfo"):
        summary = _run_all(["vulkaninfo", "--summary"])
        types = re.findall(r"deviceType\s*=\s*PHYSICAL_DEVICE_TYPE_(\w+)", summary)
        gpus = sum(1 for t in types if t != "CPU")
    else:
        gpus = len(list(Path("/dev/dri").glob("renderD*"))) if Path("/dev/dri").is_dir() else 0
    include, version, headers_problem = vulkan_headers(env)
    missing = []
    if not shutil.which("glslc"):
        missing.append("glslc")
    if ctypes.util.find_library("vulkan") is None:
        missing.append("the Vulkan loader (libvulkan)")
    if headers_problem:
        missing.append(headers_problem)
    roots = [env.get("VULKAN_SDK", "")]  # ggml-vulkan adds it to CMAKE_PREFIX_PATH
    roots += ["/usr/share/cmake", "/usr/lib/cmake", "/usr/local/share", "/usr/local/lib/cmake"]
    if not any(
        next(Path(d).glob("**/SPIRV-HeadersConfig.cmake"), None)
        for d in roots
        if d and Path(d).is_dir()
    ):
        missing.append("SPIR-V headers (spirv-headers)")
    return gpus, tuple(missing), include, version


def cpu_flags(os_name: str) -> frozenset[str]:
    if os_name == "linux":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    return normalize_flags(line.split(":", 1)[1])
        except OSError:
            return frozenset()
        return frozenset()
    if os_name == "darwin":
        return normalize_flags(
            " ".join(
                _run(["sysctl", "-n", key])
                for key in (
                    "machdep.cpu.features",
                    "machdep.cpu.leaf7_features",
                    "machdep.cpu.extfeatures",
                )
            )
        )
    return frozenset()


def nvidia_gpus(nvml: tuple[int, tuple[str, ...]] | None = None) -> tuple[int, tuple[str, ...]]:
    """(count, compute capabilities) from NVML, else nvidia-smi, else /proc/driver/nvidia.

    ``nvml``: NVML's answer when the caller has read it already (``corral doctor`` reads NVML
    once for its GPU listing too); None asks NVML here.
    """
    if nvml is not None:
        return nvml
    try:
        import pynvml  # nvidia-ml-py, when it is already installed

        pynvml.nvmlInit()
        try:
            n = pynvml.nvmlDeviceGetCount()
            caps: list[str] = []
            for i in range(n):
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(
                    pynvml.nvmlDeviceGetHandleByIndex(i)
                )
                caps.append(f"{major}{minor}")
            return n, tuple(caps)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library, no driver: try the next source
        pass
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
        listed = tuple(
            c.strip().replace(".", "")
            for c in out.splitlines()
            if re.fullmatch(r"\s*\d+\.\d+\s*", c)
        )
        if listed:
            return len(listed), listed
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return len(list(gpus.iterdir())), ()
    return 0, ()


def amd_gpus(hipcc: str | None) -> tuple[int, tuple[str, ...]]:
    if not Path("/dev/kfd").exists():
        return 0, ()
    rocminfo = shutil.which("rocminfo") or ("/opt/rocm/bin/rocminfo" if hipcc else None)
    targets = (
        tuple(sorted(set(re.findall(r"\bgfx[0-9a-f]{3,4}\b", _run([rocminfo])))))
        if rocminfo
        else ()
    )
    return max(len(targets), 1), targets


def probe_machine(nvml: tuple[int, tuple[str, ...]] | None = None) -> Machine:
    """This machine's facts; ``nvml`` as in :func:`nvidia_gpus`."""
    os_name = platform.system().lower()
    arch = platform.machine().lower()
    nvcc, hipcc = find_nvcc(), find_hipcc()
    n_nv, caps = nvidia_gpus(nvml) if os_name == "linux" or os_name == "windows" else (0, ())
    n_amd, targets = amd_gpus(hipcc) if os_name == "linux" else (0, ())
    cuda_version, cublas = cuda_toolkit(nvcc)
    driver = cuda_driver_loads() if os_name == "linux" else False
    n_vk, vk_missing, vk_include, vk_headers = (
        vulkan_facts() if os_name == "linux" else (0, ("Linux",), "", "")
    )
    lacks = glslc_lacks(shutil.which("glslc")) if os_name == "linux" and not vk_missing else ()
    return Machine(
        os_name,
        arch,
        cpu_flags(os_name),
        n_nv,
        caps,
        n_amd,
        targets,
        nvcc,
        hipcc,
        cuda_version=cuda_version,
        cublas=cublas,
        cuda_driver=driver,
        vulkan_gpus=n_vk,
        vulkan_sdk=not vk_missing,
        vulkan_missing=vk_missing,
        vulkan_include=vk_include,
        vulkan_headers=vk_headers,
        glslc_lacks=lacks,
    )


def main(argv: list[str]) -> int:
    override = os.environ.get("CORRAL_LLAMA_BACKEND", "auto")
    machine = probe_machine()
    try:
        p = plan(machine, override, os.environ.get("CORRAL_CUDA_ARCHITECTURES", ""))
    except PlanError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 2
    version = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
    patch = (Path(__file__).resolve().parent.parent / "scripts" / "patch-llama.py").read_bytes()
    key = p.key(version, "{}.{}".format(*sys.version_info[:2]), patch)
    if "--shell" in argv:
        print(f"LLAMA_BACKEND={shlex.quote(p.backend)}")
        print(f"LLAMA_CMAKE_ARGS={shlex.quote(p.cmake_args_str)}")
        print(f"LLAMA_KEY={key}")
        print(f"LLAMA_REASON={shlex.quote(p.reason)}")
        print("LLAMA_ENV=" + shlex.quote(" ".join(f"{k}={v}" for k, v in sorted(p.env.items()))))
        print("LLAMA_WARNINGS=" + shlex.quote("\n".join(p.warnings)))
    elif "--json" in argv:
        print(
            json.dumps(
                {
                    **asdict(p),
                    "key": key,
                    "version": version,
                    "machine": {**asdict(machine), "cpu_flags": sorted(machine.cpu_flags)},
                }
            )
        )
    else:
        print(p.reason)
        for w in p.warnings:
            print("warning: " + w)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
