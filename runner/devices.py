"""What the llama.cpp build in this environment can do: ``python -m corral.runner --probe``.

Asks llama.cpp's backend registry for its devices (name, description, type, backend, total and
free memory), whether GPU offload is supported, and the CPU features the build was compiled with
(``llama_print_system_info``). No model is loaded; the answer is one :class:`EngineProbe`.

With ``runner/engine.py``, ``runner/images.py`` and ``runner/kvcache.py``, the only modules that
import ``llama_cpp``: the daemon never does (it runs this in a child process and reads the JSON
line).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import sys
from pathlib import Path

from corral.runner.protocol import EngineDevice, EngineProbe

# enum ggml_backend_dev_type (ggml/include/ggml-backend.h), in order
_DEV_TYPES = ("cpu", "gpu", "igpu", "accel", "meta")


def _bind(lib: ctypes.CDLL) -> None:
    dev_t = ctypes.c_void_p
    lib.ggml_backend_dev_count.argtypes = []
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = dev_t
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, fn).argtypes = [dev_t]
        getattr(lib, fn).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [dev_t]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [
        dev_t,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_backend_reg.argtypes = [dev_t]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_name.restype = ctypes.c_char_p
    lib.ggml_backend_reg_count.argtypes = []
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_reg_get.restype = ctypes.c_void_p


# enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5


class _BackendLog:
    """Collects what llama.cpp logs at warning or error level while its backends look for
    devices (the registry is built on first use, inside :func:`probe`), still forwarding every
    line to stderr. The ctypes callback is kept referenced for as long as it is installed."""

    def __init__(self, llama_cpp) -> None:
        self.lines: list[str] = []
        self._partial = ""
        self._keep = False
        self._callback = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        chunk = _text(text)
        sys.stderr.write(chunk)
        if level != _LOG_CONT:
            self._keep = level in (_LOG_WARN, _LOG_ERROR)
        if self._keep:
            self._partial += chunk
            *done, self._partial = self._partial.split("\n")
            self.lines += [line.strip() for line in done if line.strip()]


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", errors="replace") if raw else ""


def build_record() -> dict[str, str]:
    """What scripts/install-llama.sh wrote next to this environment about the build, if any."""
    path = Path(sys.prefix) / "corral-llama-build.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def probe() -> EngineProbe:
    """Load llama.cpp (no model) and describe it. Never raises: a failure is in ``error``."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    try:
        import llama_cpp
        from llama_cpp._ggml import libggml

        _bind(libggml)
        log = _BackendLog(llama_cpp)
        llama_cpp.llama_backend_init()
        backends = [
            _text(libggml.ggml_backend_reg_name(libggml.ggml_backend_reg_get(i)))
            for i in range(libggml.ggml_backend_reg_count())
        ]
        devices = []
        for i in range(libggml.ggml_backend_dev_count()):
            dev = libggml.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            libggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            kind = libggml.ggml_backend_dev_type(dev)
            reg = libggml.ggml_backend_dev_backend_reg(dev)
            devices.append(
                EngineDevice(
                    name=_text(libggml.ggml_backend_dev_name(dev)),
                    description=_text(libggml.ggml_backend_dev_description(dev)).strip(),
                    type=_DEV_TYPES[kind] if 0 <= kind < len(_DEV_TYPES) else "unknown",  # type: ignore[arg-type]
                    backend=_text(libggml.ggml_backend_reg_name(reg)) if reg else "",
                    total=int(total.value),
                    free=int(free.value),
                )
            )
        return EngineProbe(
            llama_cpp_python=version,
            gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
            devices=devices,
            system_info=_text(llama_cpp.llama_print_system_info()).strip(),
            build=build_record(),
            backends=backends,
            backend_errors=log.lines[-8:],
        )
    except Exception as exc:  # no llama_cpp, a library that fails to load: say so, run CPU-less
        return EngineProbe(
            llama_cpp_python=version, build=build_record(), error=f"{type(exc).__name__}: {exc}"
        )
