"""``corral doctor``: what this machine is to corral, and what is wrong with it (with the fix).

It gathers, without a running daemon:
1. the llama.cpp build (backend, CMake flags, llama-cpp-python version, source patch) from the
   engine probe (``python -m corral.runner --probe``) and the install's record;
2. the CPU's instruction sets and the build plan ``daemon/buildplan.py`` derives for this machine;
3. GPUs as NVML sees them and as llama.cpp sees them, and which are usable (the engine gate);
4. host memory (cgroup-aware, as the scheduler sees it) and transparent huge pages: the kernel's
   mode and whether runners get them (``runners.huge_pages_usable``);
5. the model store: path, models, bytes; the saved prompt caches: size, cap, hit rate;
6. the effective ``OLLAMA_*`` / ``CORRAL_*`` values with their source (environment or default);
7. the policy file (``CORRAL_POLICY``): its tables and what applies to each model in the store;
8. problems, each with its fix.

:func:`collect` returns plain data (``--json`` prints it); :func:`render` makes the text.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
from pathlib import Path
from typing import Any

from corral.daemon import buildplan, engine_probe
from corral.daemon.config import Config
from corral.daemon.gpu import GpuReading, NvmlProbe, cgroup_limit, engine_verdict, host_memory
from corral.daemon.kvstats import read_totals, usage
from corral.daemon.models.store import Store
from corral.daemon.policy import PolicyError
from corral.daemon.policy import load as load_policy
from corral.daemon.runners import HUGE_PAGE_MALLOC, THP_SETTING, huge_pages_usable, thp_mode
from corral.runner.protocol import EngineProbe

GiB = 1024**3


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:
                pass
    return total


def _store(config: Config) -> dict[str, Any]:
    path = config.models
    manifests = path / "manifests"
    count = sum(1 for p in manifests.rglob("*") if p.is_file()) if manifests.is_dir() else 0
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # a store not made yet: can it be made?
    writable = os.access(existing, os.W_OK)
    return {
        "path": str(path),
        "exists": path.is_dir(),
        "writable": writable,
        "models": count,
        "bytes": _dir_size(path / "blobs") if path.is_dir() else 0,
    }


def _policy(config: Config) -> dict[str, Any]:
    """The policy file: its tables, and the keys that apply to each model of the store."""
    out: dict[str, Any] = {"path": None, "error": None, "tables": {}, "models": {}}
    if config.policy_path is None:
        return out
    out["path"] = str(config.policy_path)
    try:
        policy = load_policy(config.policy_path)
    except PolicyError as e:
        out["error"] = str(e)
        return out
    out["tables"] = {p: r.describe() for p, r in policy.rules}
    try:
        names = [r.name for r in Store(config.models).list()]
    except OSError:
        names = []
    for n in names:
        rule = policy.rule_for(n).describe()
        if rule:
            out["models"][n] = rule
    return out


def _kv_cache(config: Config) -> dict[str, Any]:
    """The saved prompt caches: where, how big against the cap, and what they did (the totals
    the daemon keeps beside them)."""
    path = config.kv_cache_path
    files, size = usage(path)
    totals = read_totals(path)
    return {
        "path": str(path),
        "enabled": config.kv_cache_size > 0,
        "files": files,
        "bytes": size,
        "cap_bytes": config.kv_cache_size,
        "memory_bytes": config.kv_cache_memory,
        "hit_rate": totals.hit_rate,
        **{k: getattr(totals, k) for k in totals.__struct_fields__},
    }


def _huge_pages(setting: Path, libc: str | None) -> dict[str, Any]:
    libc = platform.libc_ver()[0] if libc is None else libc
    return {
        "setting": str(setting),
        "mode": thp_mode(setting),
        "libc": libc or "unknown",
        "runners_get_huge_pages": huge_pages_usable(setting, libc),
    }


def _huge_page_problem(thp: dict[str, Any]) -> dict[str, str] | None:
    """Linux without huge pages for the runners: the fix for its THP mode and C library."""
    if thp["mode"] is None or thp["runners_get_huge_pages"]:
        return None  # not Linux (no THP setting), or all is well
    cost = (
        "CPU runners' weights sit in 4 KiB pages (decode measured 15-30% slower than "
        "in 2 MiB pages)"
    )
    if thp["mode"] == "madvise":  # only glibc's malloc is asked (GLIBC_TUNABLES)
        return {
            "problem": f"transparent huge pages are [madvise] but the C library is "
            f"{thp['libc']}, whose malloc does not ask for them: {cost}",
            "fix": f"echo always > {thp['setting']} (as root; every process then gets huge "
            "pages), or run corral on a glibc system",
        }
    return {
        "problem": f"transparent huge pages are [{thp['mode']}]: {cost}",
        "fix": f"echo madvise > {thp['setting']} (as root; transparent_hugepage=madvise on "
        "the kernel command line keeps it across reboots)",
    }


def _read_nvml(nv: NvmlProbe) -> tuple[list[GpuReading], tuple[int, tuple[str, ...]] | None]:
    """One NVML session for the GPU listing and the build plan's compute capabilities."""
    try:
        return nv.gpu_readings(), nv.compute_capabilities()
    finally:
        nv.close()


def _problems(
    build: dict[str, Any],
    engine: EngineProbe,
    gpu_note: str | None,
    store: dict[str, Any],
    want: buildplan.BuildPlan | None,
    thp: dict[str, Any],
    policy: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    if policy is not None and policy["error"]:
        out.append(
            {
                "problem": f"the policy file cannot be used: {policy['error']}",
                "fix": "correct that line (`corral serve` refuses to start with it)",
            }
        )
    if engine.error:
        out.append(
            {
                "problem": f"llama.cpp cannot be loaded: {engine.error}",
                "fix": "reinstall: ./dev install (or scripts/install-llama.sh in your venv)",
            }
        )
    if gpu_note:
        out.append(
            {
                "problem": gpu_note,
                "fix": "rebuild llama.cpp for the GPU (CORRAL_LLAMA_BACKEND), or for a GPU build "
                "that finds no device check the driver (nvidia-smi, vulkaninfo) and "
                "CUDA_VISIBLE_DEVICES",
            }
        )
    info = engine.system_info
    if "AMX_INT8 = 1" in info:
        out.append(
            {
                "problem": "llama.cpp was built with AMX, whose matmul crashes on some CPUs",
                "fix": "reinstall with scripts/install-llama.sh (AMX is always off there)",
            }
        )
    if want is not None and build.get("cmake_args") and build["cmake_args"] != want.cmake_args_str:
        out.append(
            {
                "problem": "the installed llama.cpp was built for another machine or plan "
                f"({build.get('backend')}) than this one ({want.backend})",
                "fix": "run ./dev install (it rebuilds for this machine)",
            }
        )
    if not store["writable"]:
        out.append(
            {
                "problem": f"the model store {store['path']} is not writable",
                "fix": "set OLLAMA_MODELS to a writable folder or fix its owner",
            }
        )
    huge = _huge_page_problem(thp)
    if huge is not None:
        out.append(huge)
    return out


async def collect(
    config: Config,
    engine: EngineProbe | None = None,
    nvml: Any = None,
    thp_setting: Path = THP_SETTING,
    libc: str | None = None,
) -> dict[str, Any]:
    """Everything ``corral doctor`` reports, as plain data. Never raises for a missing part.

    NVML is asked once (``nvml``: a fake ``pynvml`` for tests), for the GPU listing and the
    build plan alike. ``thp_setting`` / ``libc``: the kernel's THP file and the C library
    (None: ``platform.libc_ver``), injectable for tests.
    """
    if engine is None:
        engine = await engine_probe.probe_engine(
            config.cache_dir, config.cuda_visible_devices, selection=config.device_selection
        )
    nv = NvmlProbe(visible_devices=config.cuda_visible_devices, nvml=nvml)
    readings, nvidia = await asyncio.to_thread(_read_nvml, nv)
    machine = await asyncio.to_thread(buildplan.probe_machine, nvidia)
    try:
        want: buildplan.BuildPlan | None = buildplan.plan(
            machine, config.llama_backend, config.cuda_architectures
        )
    except buildplan.PlanError:
        want = None
    libraries, gpu_note = engine_verdict(readings, engine)
    thp = await asyncio.to_thread(_huge_pages, thp_setting, libc)
    total, available = host_memory()
    limit = cgroup_limit()
    store = await asyncio.to_thread(_store, config)
    policy = await asyncio.to_thread(_policy, config)
    kv_cache = await asyncio.to_thread(_kv_cache, config)
    x86 = [
        opt.removeprefix("GGML_")
        for opt, need in buildplan.X86_OPTIONS
        if all(f in machine.cpu_flags for f in need)
    ]
    if "amx_int8" in machine.cpu_flags:
        x86.append("AMX (not used)")
    build = dict(engine.build)
    env_rows = {
        k: {"value": v, "source": "environment" if k in config.env_set else "default"}
        for k, v in config.env_summary().items()
    }
    return {
        "build": {
            "backend": build.get("backend", "unknown"),
            "cmake_args": build.get("cmake_args", ""),
            "llama_cpp_python": engine.llama_cpp_python,
            "patch_sha256": build.get("patch_sha256", ""),
            "gpu_offload": engine.gpu_offload,
            "system_info": engine.system_info,
            "plan_for_this_machine": want.reason if want else None,
        },
        "cpu": {
            "model": _cpu_model(),
            "arch": machine.arch,
            "os": machine.os,
            "instruction_sets": x86,
            "cores": os.cpu_count(),
        },
        "gpus": {
            "nvml": [
                {
                    "id": g.id,
                    "name": g.name,
                    "total": g.total,
                    "free": g.free,
                    "library": g.library,
                    "usable": libraries is None or g.library in libraries,
                }
                for g in readings
            ],
            "engine": [
                {
                    "name": d.name,
                    "description": d.description,
                    "type": d.type,
                    "backend": d.backend,
                    "total": d.total,
                    "free": d.free,
                }
                for d in engine.devices
            ],
            "toolkits": {"nvcc": machine.nvcc, "hipcc": machine.hipcc},
        },
        "memory": {
            "total": total,
            "available": available,
            "cgroup_limit": limit[0] if limit else None,
            "cgroup_current": limit[1] if limit else None,
        },
        "huge_pages": thp,
        "store": store,
        "kv_cache": kv_cache,
        "environment": env_rows,
        "policy": policy,
        "problems": _problems(build, engine, gpu_note, store, want, thp, policy),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


def render(r: dict[str, Any]) -> str:
    b, c, g, m, s = r["build"], r["cpu"], r["gpus"], r["memory"], r["store"]
    lines = [
        "build",
        f"  backend            {b['backend']} (llama-cpp-python {b['llama_cpp_python'] or '?'}, "
        f"gpu offload {'yes' if b['gpu_offload'] else 'no'})",
        f"  cmake flags        {b['cmake_args'] or '(not recorded: not installed by ./dev)'}",
        f"  source patch       {b['patch_sha256'][:16] or '-'}",
        f"  compiled features  {b['system_info'] or '-'}",
        f"  this machine wants {b['plan_for_this_machine'] or '-'}",
        "cpu",
        f"  {c['model']} ({c['arch']}, {c['cores']} cores): "
        f"{' '.join(c['instruction_sets']) or '-'}",
        "gpus",
    ]
    if not g["nvml"]:
        lines.append("  nvml   no NVIDIA GPU")
    for d in g["nvml"]:
        lines.append(
            f"  nvml   {d['id']}: {d['name']} {_gib(d['total'])} total, {_gib(d['free'])} "
            f"free: {'usable' if d['usable'] else 'NOT usable by this build'}"
        )
    for d in g["engine"]:
        lines.append(
            f"  engine {d['name']}: {d['description']} ({d['backend']}, {d['type']}) "
            f"{_gib(d['total'])}"
        )
    tk = g["toolkits"]
    lines.append(f"  toolkits: nvcc {tk['nvcc'] or 'no'}, hipcc {tk['hipcc'] or 'no'}")
    cg = f", cgroup limit {_gib(m['cgroup_limit'])}" if m["cgroup_limit"] is not None else ""
    lines += [
        "memory",
        f"  {_gib(m['total'])} total, {_gib(m['available'])} available{cg}",
        "huge pages",
        f"  {_render_huge_pages(r['huge_pages'])}",
        "store",
        f"  {s['path']}: {s['models']} models, {_gib(s['bytes'])}"
        f"{'' if s['exists'] else ' (does not exist yet)'}"
        f"{'' if s['writable'] else ' (NOT writable)'}",
        "saved prompt caches",
        f"  {_render_kv_cache(r['kv_cache'])}",
        "environment",
    ]
    for k, v in r["environment"].items():
        lines.append(f"  {k}={v['value']} ({v['source']})")
    lines += ["policy", *_render_policy(r["policy"])]
    lines.append("problems")
    if not r["problems"]:
        lines.append("  none")
    for p in r["problems"]:
        lines.append(f"  - {p['problem']}\n    fix: {p['fix']}")
    return "\n".join(lines)


def _render_policy(p: dict[str, Any]) -> list[str]:
    if p["path"] is None:
        return ["  none (CORRAL_POLICY is not set)"]
    if p["error"]:
        return [f"  {p['path']}: NOT usable (see problems)"]
    lines = [f"  {p['path']}: {len(p['tables'])} tables"]
    for pattern, keys in p["tables"].items():
        lines.append(f'  [models."{pattern}"] {_keys(keys)}')
    for name, keys in p["models"].items():
        lines.append(f"  applies to {name}: {_keys(keys)}")
    return lines


def _keys(keys: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in keys.items()) or "(nothing)"


def _render_kv_cache(kv: dict[str, Any]) -> str:
    if not kv["enabled"]:
        return f"off (CORRAL_KV_CACHE_SIZE=0); {kv['path']}: {_gib(kv['bytes'])}"
    rate = kv["hit_rate"]
    hits = (
        "no cold start yet"
        if rate is None
        else f"hit rate {rate:.0%} ({kv['restores']} restored of "
        f"{kv['restores'] + kv['misses']} cold starts, {kv['restored_tokens']} tokens)"
    )
    return (
        f"{kv['path']}: {kv['files']} prefixes, {_gib(kv['bytes'])} of {_gib(kv['cap_bytes'])}"
        f" (up to {_gib(kv['memory_bytes'])} in memory); {kv['saves']} saved; {hits}"
    )


def _render_huge_pages(thp: dict[str, Any]) -> str:
    if thp["mode"] is None:
        return f"no transparent huge pages here ({thp['setting']} not readable)"
    gets = (
        f"runners get them (GLIBC_TUNABLES={HUGE_PAGE_MALLOC})"
        if thp["runners_get_huge_pages"]
        else "runners do NOT get them"
    )
    return f"transparent huge pages [{thp['mode']}], C library {thp['libc']}: {gets}"


def main(config: Config, as_json: bool) -> str:
    report = asyncio.run(collect(config))
    return json.dumps(report, indent=2) if as_json else render(report)
