"""A fake ``pynvml`` module: the few NVML calls corral makes, over a scripted device list.

Use ``FakeNvml(devices=[FakeDevice(...)])`` as the ``nvml=`` argument of ``NvmlProbe`` or put
it in ``sys.modules["pynvml"]``. It keeps NVML's real ordering rules: every call except
``nvmlInit`` fails with ``NVMLError`` (uninitialised) before init and after the last shutdown.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field


class NVMLError(Exception):
    def __init__(self, value: int = 999, text: str = "Unknown Error") -> None:
        super().__init__(text)
        self.value = value


NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_DRIVER_NOT_LOADED = 9


@dataclass
class FakeDevice:
    name: str = "NVIDIA GeForce RTX 4090"
    total: int = 24 * 1024**3
    free: int | None = None
    uuid: str = ""
    fail_memory: bool = False
    capability: tuple[int, int] = (8, 9)


@dataclass
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class FakeNvml:
    devices: list[FakeDevice] = field(default_factory=list)
    init_error: NVMLError | None = None
    names_as_bytes: bool = False
    init_calls: int = 0
    shutdown_calls: int = 0
    _refs: int = 0

    NVMLError = NVMLError

    def module(self) -> types.ModuleType:
        """This fake as a module object (for sys.modules["pynvml"])."""
        mod = types.ModuleType("pynvml")
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetName",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetUUID",
            "nvmlDeviceGetCudaComputeCapability",
        ):
            setattr(mod, name, getattr(self, name))
        mod.NVMLError = NVMLError
        return mod

    def _check(self) -> None:
        if self._refs <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED, "Uninitialized")

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error
        self._refs += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.shutdown_calls += 1
        self._refs -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._check()
        if not 0 <= index < len(self.devices):
            raise NVMLError(2, "Invalid Argument")
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str | bytes:
        self._check()
        return handle.name.encode() if self.names_as_bytes else handle.name

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        self._check()
        return handle.uuid or f"GPU-{self.devices.index(handle):08d}-fake"

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeDevice) -> tuple[int, int]:
        self._check()
        return handle.capability

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> _Memory:
        self._check()
        if handle.fail_memory:
            raise NVMLError(15, "GPU is lost")
        free = handle.total if handle.free is None else handle.free
        return _Memory(total=handle.total, free=free, used=handle.total - free)
