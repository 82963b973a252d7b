"""Ask the llama.cpp build what it can do, once: ``python -m corral.runner --probe`` in a child.

The daemon never loads llama.cpp itself, so it runs the probe in a child process (the same argv
its runners use) and reads one :class:`EngineProbe` JSON line. The answer is cached per engine
build: the key is the llama_cpp package's shared libraries (path, size, mtime) plus
``CUDA_VISIBLE_DEVICES`` and the other backends' device and driver selections (config's
``device_selection``),
so a reinstall or another device mask probes again. The cache holds what the engine *can* do (its
devices and backends); free memory always comes from the GPU probes. A GPU build that found no
device is not cached: the driver installed or the container given the GPU afterwards is seen at
the next start, not hidden by the first answer.

Contracts: :func:`probe_engine` never raises. A probe that cannot run (no llama_cpp, a library
that fails to load, a timeout) answers an EngineProbe with ``error`` set and no GPU device, so
the daemon offers no GPU rather than trusting paper; it is not cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec
import structlog

from corral.daemon.runners import RUNNER_ARGV
from corral.runner.protocol import EngineProbe, decode_probe, encode

log = structlog.get_logger(__name__)

PROBE_TIMEOUT = 120.0  # importing llama.cpp with CUDA can take a while on a cold disk


def engine_fingerprint(visible_devices: str | None, selection: str = "") -> str | None:
    """A key that changes when the llama_cpp libraries change; None when llama_cpp is absent."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    lib = Path(spec.origin).parent / "lib"
    parts = [str(visible_devices), selection]
    try:
        for f in sorted(lib.iterdir()):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


async def run_probe(
    argv: Sequence[str] = RUNNER_ARGV,
    env: dict[str, str] | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> EngineProbe:
    """Run the probe child and decode its line. Never raises."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "--probe",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        return EngineProbe(error=f"cannot start the engine probe: {exc}")
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return EngineProbe(error=f"the engine probe did not answer within {timeout:.0f} s")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return EngineProbe(error=f"the engine probe failed: {tail[0]}")
    try:
        return decode_probe(lines[-1])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return EngineProbe(error=f"the engine probe answered garbage: {exc}")


async def probe_engine(
    cache_dir: Path | None,
    visible_devices: str | None,
    argv: Sequence[str] = RUNNER_ARGV,
    selection: str = "",
) -> EngineProbe:
    """The engine's answer, from the cache when this build was probed before.

    ``selection``: Config.device_selection (the other backends' device and driver choices)."""
    key = engine_fingerprint(visible_devices, selection)
    path = cache_dir / f"engine-probe-{key}.json" if cache_dir is not None and key else None
    if path is not None:
        try:
            return decode_probe(path.read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass
    result = await run_probe(argv)
    if path is not None and result.error is None and not result.idle_gpu_backends():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(encode(result))
            tmp.replace(path)
        except OSError as exc:
            log.debug("engine probe not cached", path=str(path), error=str(exc))
    return result


def summary(engine: EngineProbe) -> dict[str, object]:
    """The probe as one log line's fields."""
    return {
        "gpu_offload": engine.gpu_offload,
        "devices": json.dumps([f"{d.name} ({d.backend}, {d.type})" for d in engine.devices]),
        "backend": engine.build.get("backend", "unknown"),
        **({"error": engine.error} if engine.error else {}),
    }
