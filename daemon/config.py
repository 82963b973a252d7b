"""The daemon's configuration: one frozen :class:`Config` built from the environment.

This is the ONLY module of corral that reads ``os.environ`` (``Config.from_env()``); every other
module receives the ``Config`` (or values taken from it). Parsing follows Ollama's ``envconfig``
rules (shared/reference/ollama-scheduler.md §1):

* every value is whitespace-trimmed, then leading/trailing ``"``/``'`` characters are trimmed;
* booleans: empty -> default; Go ``strconv.ParseBool`` spellings; anything else -> **true**;
* unsigned integers: empty -> default; base-10 digits only; anything else -> warning + default;
* durations (keep-alive, load timeout): Go duration syntax, else integer seconds, else
  warning + default. Keep-alive < 0 means forever; load timeout <= 0 means no timeout. "Forever"
  is ``math.inf`` seconds everywhere in corral.

A bad value never raises: a structlog warning names the variable, the value and the default used.

Pure helpers shared with the API: :func:`parse_go_duration` (strict Go syntax, raises with Go's
message), :func:`parse_duration` (env rule), :func:`keep_alive_from_json` (the request field),
:func:`format_duration` (Go's ``Duration.String``).

Length: over 900 lines because every variable the daemon reads is here with its parsing and its
default, beside the one reader of the environment; split, the env rule would be spread again.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
import structlog

from corral.daemon.human import go_quote

log = structlog.get_logger(__name__)

TRACE = 5  # same value as corral.daemon.logging.TRACE (stdlib has no TRACE level)

FOREVER = math.inf
DEFAULT_KEEP_ALIVE = 300.0
DEFAULT_LOAD_TIMEOUT = 300.0
DEFAULT_MAX_QUEUE = 512
DEFAULT_MAX_BODY = 32 << 20  # CORRAL_MAX_BODY: bytes of a request body (blob uploads excepted)
DEFAULT_HEADER_TIMEOUT = 10.0  # CORRAL_HEADER_TIMEOUT
DEFAULT_BODY_TIMEOUT = 60.0  # CORRAL_BODY_TIMEOUT
DEFAULT_IDLE_TIMEOUT = 75.0  # CORRAL_IDLE_TIMEOUT
DEFAULT_PORT = 11434
DEFAULT_PREDICT_LIMIT = 10  # CORRAL_PREDICT_LIMIT: generated tokens per request <= 10 x num_ctx
DEFAULT_PRIORITY_AGING = 30.0
DEFAULT_KV_CACHE_SIZE = 8 << 30  # CORRAL_KV_CACHE_SIZE: saved prompt caches on disk (all models)
DEFAULT_KV_CACHE_MEMORY = 2 << 30  # CORRAL_KV_CACHE_MEMORY: of them, kept in the page cache
# CORRAL_SPARE_RUNNER: spare runners kept with the llama engine (docs/DESIGN.md "Spare runner"):
# two, so a load that follows another within a spare's warm-up (~0.5 s quiet) finds one warm
DEFAULT_SPARE_RUNNERS = 2
MAX_SPARE_RUNNERS = 8  # more is refused (each is a process of ~64 MiB, doing nothing)

# Appended to every OLLAMA_ORIGINS list, in this order (17 entries).
DEFAULT_ORIGINS: tuple[str, ...] = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for port in ("", ":*")
        for scheme in ("http", "https")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)


# --------------------------------------------------------------------------------------------
# Durations (pure)

_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MAX_NS = (1 << 63) - 1
_NUM = re.compile(r"([0-9]*)(?:\.([0-9]*))?")
_UNIT = re.compile(r"[^0-9.]*")
_INT = re.compile(r"[+-]?[0-9]+")
_UINT = re.compile(r"[0-9]+")


# What else chooses the devices llama.cpp sees, besides CUDA_VISIBLE_DEVICES (the engine probe's
# cache key covers them): Vulkan's device mask and driver (ICD) files, ROCm's device masks.
DEVICE_VARIABLES = (
    "GGML_VK_VISIBLE_DEVICES",
    "VK_DRIVER_FILES",
    "VK_ICD_FILENAMES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
)


def _parse_go_duration_ns(s: str) -> int:
    """Go's ``time.ParseDuration`` returning integer nanoseconds; ValueError with Go's text."""
    orig = s
    neg = False
    if s[:1] in ("+", "-"):
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if s == "":
        raise ValueError(f"time: invalid duration {go_quote(orig)}")
    total = 0
    while s:
        m = _NUM.match(s)
        assert m is not None  # the pattern matches the empty string
        whole, frac = m.group(1), m.group(2)
        if whole == "" and not frac:
            raise ValueError(f"time: invalid duration {go_quote(orig)}")
        s = s[m.end() :]
        unit = _UNIT.match(s).group()  # type: ignore[union-attr]
        if unit == "":
            raise ValueError(f"time: missing unit in duration {go_quote(orig)}")
        if unit not in _NS:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {go_quote(orig)}")
        s = s[len(unit) :]
        scale = _NS[unit]
        v = int(whole or "0") * scale
        if frac:
            v += int(frac) * scale // (10 ** len(frac))
        total += v
        if total > (1 << 63):
            raise ValueError(f"time: invalid duration {go_quote(orig)}")
    if neg:
        return -total
    if total > _MAX_NS:
        raise ValueError(f"time: invalid duration {go_quote(orig)}")
    return total


def parse_go_duration(s: str) -> float:
    """Strict Go duration syntax (``5m``, ``1h2m3s``, ``1.5h``, ``-1m``, ``0``) -> seconds.

    Raises ``ValueError`` carrying Go's message, e.g. ``time: missing unit in duration "300"``
    (the API returns that text with status 400 for a string ``keep_alive`` without a unit).
    """
    return _parse_go_duration_ns(s) / 1e9


def parse_duration(value: str | None) -> float | None:
    """Ollama's environment duration rule: Go duration, else integer seconds, else ``None``.

    The result keeps its sign (callers decide what negative means); ``None`` = unparsable/empty.
    """
    if value is None:
        return None
    try:
        return parse_go_duration(value)
    except ValueError:
        pass
    if _INT.fullmatch(value):
        return float(int(value))
    return None


_GO_TYPE_NAMES = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}


def keep_alive_from_json(value: Any) -> float | None:
    """The request ``keep_alive`` field (Ollama's ``api.Duration``) -> seconds, inf = forever.

    ``None``/absent -> ``None`` (use the runner's sticky value or the default). A number is
    seconds (fractions allowed); a string must be a Go duration (``"300"`` is an error). Negative
    -> ``math.inf``. Raises ``ValueError`` with Ollama's message for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        name = _GO_TYPE_NAMES.get(type(value), type(value).__name__)
        raise ValueError(f"Unsupported type: '{name}'")
    seconds = float(value) if not isinstance(value, str) else parse_go_duration(value)
    if math.isnan(seconds):
        raise ValueError("Unsupported type: 'float64'")
    return FOREVER if seconds < 0 else seconds


def _frac(v: int, digits: int) -> tuple[str, int]:
    """Split ``v`` into (".ddd" without trailing zeros or "", v // 10**digits)."""
    p = 10**digits
    rest = v % p
    text = "" if rest == 0 else "." + str(rest).rjust(digits, "0").rstrip("0")
    return text, v // p


def format_duration(seconds: float) -> str:
    """Go's ``time.Duration.String`` for ``seconds`` (``5m0s``, ``1h2m3s``, ``500ms``, ``0s``).

    ``math.inf`` (forever) prints as Go prints ``math.MaxInt64`` ns:
    ``2562047h47m16.854775807s``, like Ollama's start-up config log line.
    """
    if math.isinf(seconds):
        ns = _MAX_NS if seconds > 0 else -_MAX_NS
    else:
        ns = max(-_MAX_NS, min(_MAX_NS, round(seconds * 1e9)))
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < 1_000_000_000:
        if u < 1_000:
            return f"{sign}{u}ns"
        if u < 1_000_000:
            f, w = _frac(u, 3)
            return f"{sign}{w}{f}\u00b5s"
        f, w = _frac(u, 6)
        return f"{sign}{w}{f}ms"
    f, secs = _frac(u, 9)
    out = f"{secs % 60}{f}s"
    mins = secs // 60
    if mins:
        out = f"{mins % 60}m{out}"
        hours = mins // 60
        if hours:
            out = f"{hours}h{out}"
    return sign + out


# --------------------------------------------------------------------------------------------
# Field parsers (pure; ``warn`` is called with a reason when the default is used)


def trim_var(raw: str | None) -> str:
    """Ollama's ``Var``: strip whitespace, then strip leading/trailing quote characters."""
    if raw is None:
        return ""
    return raw.strip().strip("\"'")


def parse_bool(value: str, default: bool = False) -> bool:
    """Go ``strconv.ParseBool``; empty -> default; unparsable -> True (Ollama's rule)."""
    if value == "":
        return default
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return True


def parse_optional_bool(value: str) -> bool | None:
    """``BoolWithDefault`` with an unset default: empty -> None, else :func:`parse_bool`."""
    return None if value == "" else parse_bool(value)


def parse_uint(value: str) -> int | None:
    """Base-10 unsigned 64-bit integer, or None when empty or invalid (``-1``, ``0x10``, ``8G``)."""
    if not _UINT.fullmatch(value):
        return None
    n = int(value)
    return n if n < (1 << 64) else None


def log_level_from_debug(value: str) -> int:
    """OLLAMA_DEBUG -> stdlib logging level.

    Ollama: a true bool -> DEBUG; else a non-zero integer n -> slog level -4n (2 -> TRACE,
    -1 -> WARN, -2 -> ERROR); anything else -> INFO.
    """
    if value == "":
        return logging.INFO
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return logging.DEBUG
    n = int(value) if _INT.fullmatch(value) else 0
    if n == 0:
        return logging.INFO
    if n >= 2:
        return TRACE
    return min(logging.CRITICAL, logging.INFO - 10 * n)


class HostAddr(msgspec.Struct, frozen=True):
    """OLLAMA_HOST resolved as Ollama's ``envconfig.Host``."""

    scheme: str = "http"
    host: str = "127.0.0.1"  # without brackets; "" = all interfaces
    port: int = DEFAULT_PORT
    path: str = ""

    @property
    def hostport(self) -> str:
        return _join_host_port(self.host, self.port)

    @property
    def url(self) -> str:
        """``scheme://host:port[/path]`` exactly as Ollama prints it (``http://:1234`` too)."""
        return f"{self.scheme}://{self.hostport}" + (f"/{self.path}" if self.path else "")


def _join_host_port(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host_port(hostport: str) -> tuple[str, str] | None:
    """Go ``net.SplitHostPort``; None on error (missing port, too many colons, bad brackets)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or end + 1 >= len(hostport) or hostport[end + 1] != ":":
            return None
        host, port = hostport[1:end], hostport[end + 2 :]
        if "[" in host or "]" in host:
            return None
    else:
        i = hostport.rfind(":")
        if i < 0:
            return None
        host, port = hostport[:i], hostport[i + 1 :]
        if ":" in host or "[" in host or "]" in host:
            return None
    if "[" in port or "]" in port:
        return None
    return host, port


def _parse_ip(s: str) -> str | None:
    if "%" in s:  # Go's ParseIP has no zones
        return None
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        return None


def parse_host(value: str, warn=None) -> HostAddr:
    """OLLAMA_HOST (already trimmed by :func:`trim_var`) -> :class:`HostAddr`."""
    s = value.strip()
    default_port = str(DEFAULT_PORT)
    if "://" in s:
        scheme, hostport = s.split("://", 1)
        if scheme == "http":
            default_port = "80"
        elif scheme == "https":
            default_port = "443"
    else:
        scheme, hostport = "http", s
        if s == "ollama.com":
            scheme, hostport = "https", "ollama.com:443"
    hostport, _, path = hostport.partition("/")
    split = _split_host_port(hostport)
    if split is None:
        host, port = "127.0.0.1", default_port
        ip = _parse_ip(hostport.strip("[]"))
        if ip is not None:
            host = ip
        elif hostport != "":
            host = hostport
    else:
        host, port = split
    if not _INT.fullmatch(port) or not 0 <= int(port) <= 65535:
        if warn is not None:
            warn(f"invalid port {port!r}, using default {default_port}")
        port = default_port
    return HostAddr(scheme=scheme, host=host, port=int(port), path=path)


def client_host(addr: HostAddr) -> HostAddr:
    """Where a local client connects: unspecified (``0.0.0.0``, ``::``, empty) -> loopback."""
    host = addr.host
    if host == "":
        host = "127.0.0.1"
    else:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and ip.is_unspecified:
            host = "127.0.0.1" if ip.version == 4 else "::1"
    return msgspec.structs.replace(addr, host=host)


def parse_origins(value: str) -> tuple[str, ...]:
    """OLLAMA_ORIGINS: the user's comma-separated list (untrimmed) then the 17 defaults."""
    user = value.split(",") if value != "" else []
    return (*user, *DEFAULT_ORIGINS)


# --------------------------------------------------------------------------------------------
# The Config


class SimulatedGpu(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry of CORRAL_SIMULATE_GPUS, in bytes (see :func:`parse_simulated_gpus`)."""

    id: str
    total: int
    free: int
    name: str = "Simulated GPU"
    library: str = "cuda"
    integrated: bool = False


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}
_SIM_FIELDS = ("id", "name", "total", "free", "library", "integrated")


def parse_size(value: Any) -> int:
    """Bytes from a number or a size string (``"24GiB"``, ``"8 GB"``, ``"512MiB"``, ``"1.5GB"``).
    Raises ValueError saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m is None:
            raise ValueError(
                f"{value!r} is not a size (bytes, or a number with B, KB, MB, GB, "
                "TB, KiB, MiB, GiB or TiB)"
            )
        value = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()]
    if value < 0 or value != value:
        raise ValueError(f"{value!r} is not a size")
    return int(value)


def parse_simulated_gpus(spec: str | Sequence[Any]) -> tuple[SimulatedGpu, ...]:
    """CORRAL_SIMULATE_GPUS: a JSON list (or the list itself) of objects with ``total`` (bytes or
    a size string) and optional ``free`` (default: total), ``id`` (default: the index), ``name``,
    ``library`` (default ``cuda``) and ``integrated``. Items already parsed pass through.

    The one parser of the variable. Raises ValueError naming the item and the field
    (``CORRAL_SIMULATE_GPUS[1].free: ...``); ``corral serve`` stops with it.
    """
    where = "CORRAL_SIMULATE_GPUS"
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON: {e}") from None
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"{where}: expected a JSON list of GPUs, got {type(spec).__name__}")
    out: list[SimulatedGpu] = []
    for i, item in enumerate(spec):
        at = f"{where}[{i}]"
        if isinstance(item, SimulatedGpu):
            out.append(item)
            continue
        if not isinstance(item, dict):
            raise ValueError(f"{at}: expected an object, got {item!r}")
        unknown = sorted(set(item) - set(_SIM_FIELDS))
        if unknown:
            raise ValueError(f"{at}.{unknown[0]}: unknown field (known: {', '.join(_SIM_FIELDS)})")
        if item.get("total") is None:
            raise ValueError(f"{at}.total: missing")
        sizes = {}
        for key in ("total", "free"):
            if item.get(key) is not None:
                try:
                    sizes[key] = parse_size(item[key])
                except ValueError as e:
                    raise ValueError(f"{at}.{key}: {e}") from None
        total = sizes["total"]
        free = sizes.get("free", total)
        if total <= 0:
            raise ValueError(f"{at}.total: must be more than 0")
        if free > total:
            raise ValueError(f"{at}.free: {free} is more than total {total}")
        for key in ("id", "name", "library"):
            if item.get(key) is not None and not isinstance(item[key], (str, int)):
                raise ValueError(f"{at}.{key}: expected a string, got {item[key]!r}")
        integrated = item.get("integrated", False)
        if not isinstance(integrated, bool):
            raise ValueError(f"{at}.integrated: expected true or false, got {integrated!r}")
        out.append(
            SimulatedGpu(
                id=str(item.get("id", i)),
                total=total,
                free=free,
                name=str(item.get("name") or f"Simulated GPU {i}"),
                library=str(item.get("library") or "cuda").lower(),
                integrated=integrated,
            )
        )
    return tuple(out)


def _cache_dir(env: Mapping[str, str]) -> Path | None:
    xdg = (env.get("XDG_CACHE_HOME") or "").strip()
    if xdg:
        return Path(xdg) / "corral"
    home = (env.get("HOME") or "").strip()
    return Path(home) / ".cache" / "corral" if home else None


SUMMARY_VARS = (
    "OLLAMA_HOST",
    "OLLAMA_ORIGINS",
    "OLLAMA_MODELS",
    "OLLAMA_KEEP_ALIVE",
    "OLLAMA_LOAD_TIMEOUT",
    "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_MAX_QUEUE",
    "OLLAMA_SCHED_SPREAD",
    "OLLAMA_GPU_OVERHEAD",
    "OLLAMA_CONTEXT_LENGTH",
    "OLLAMA_FLASH_ATTENTION",
    "OLLAMA_KV_CACHE_TYPE",
    "OLLAMA_DEBUG",
    "OLLAMA_NOPRUNE",
    "CORRAL_LOG_FORMAT",
    "CORRAL_EVENT_LOOP",
    "CORRAL_RUNNER_ENGINE",
    "CORRAL_DEFAULT_MODEL",
    "CORRAL_PREDICT_LIMIT",
    "CORRAL_POLICY",
    "CORRAL_PRIORITY_AGING",
    "CORRAL_KV_CACHE_DIR",
    "CORRAL_KV_CACHE_SIZE",
    "CORRAL_KV_CACHE_MEMORY",
    "CORRAL_SPARE_RUNNER",
    *("CORRAL_API_KEYS_FILE", "CORRAL_METRICS_AUTH", "CORRAL_TLS_CERT", "CORRAL_TLS_KEY"),
    "CORRAL_MAX_BODY",
    "CORRAL_HEADER_TIMEOUT",
    "CORRAL_BODY_TIMEOUT",
    "CORRAL_IDLE_TIMEOUT",
    "CORRAL_MAX_CLIENT_CONNECTIONS",
)


class Secret(str):
    """A string that never shows in a repr (the Config's, a traceback's): OLLAMA_API_KEY."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


def parse_tls(host: HostAddr, cert: str, key: str) -> tuple[Path | None, Path | None, str | None]:
    """CORRAL_TLS_CERT / CORRAL_TLS_KEY against OLLAMA_HOST's scheme -> (cert, key, error).
    HTTPS needs both files and an ``https://`` OLLAMA_HOST; any other mix is an error that
    stops ``corral serve`` (a daemon meant to be private must not come up in plain text)."""
    if not cert and not key:
        if host.scheme == "https":
            return None, None, "OLLAMA_HOST is https://: set CORRAL_TLS_CERT and CORRAL_TLS_KEY"
        return None, None, None
    if not cert or not key:
        missing = "CORRAL_TLS_KEY" if cert else "CORRAL_TLS_CERT"
        return None, None, f"{missing} is not set (HTTPS needs a certificate and its key)"
    if host.scheme != "https":
        return None, None, "CORRAL_TLS_CERT is set: OLLAMA_HOST must start with https://"
    return Path(cert).expanduser(), Path(key).expanduser(), None


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Everything corral reads from the environment, parsed once. Defaults live here.

    Durations are seconds (float); ``math.inf`` = forever / no timeout.
    """

    # OLLAMA_HOST
    host: HostAddr = HostAddr()
    # OLLAMA_ORIGINS (user entries first, then DEFAULT_ORIGINS)
    origins: tuple[str, ...] = DEFAULT_ORIGINS
    # OLLAMA_MODELS
    models: Path = Path("~/.ollama/models").expanduser()
    # OLLAMA_KEEP_ALIVE: default idle time before unload; 0 = at once when idle; inf = never
    keep_alive: float = DEFAULT_KEEP_ALIVE
    # OLLAMA_LOAD_TIMEOUT: stall timeout while a runner loads; inf = none
    load_timeout: float = DEFAULT_LOAD_TIMEOUT
    # OLLAMA_MAX_LOADED_MODELS: 0 = auto (3 x max(#GPUs, 1), decided by the scheduler)
    max_loaded_models: int = 0
    # OLLAMA_NUM_PARALLEL: slots per runner; stored as max(value, 1)
    num_parallel: int = 1
    # OLLAMA_MAX_QUEUE: requests allowed to wait (all of them, also those for a loaded model)
    max_queue: int = DEFAULT_MAX_QUEUE
    # OLLAMA_SCHED_SPREAD
    sched_spread: bool = False
    # OLLAMA_GPU_OVERHEAD: bytes reserved per GPU
    gpu_overhead: int = 0
    # OLLAMA_CONTEXT_LENGTH: default num_ctx; 0 = automatic tier by VRAM
    context_length: int = 0
    # OLLAMA_FLASH_ATTENTION: None = auto, True = on, False = off
    flash_attention: bool | None = None
    # OLLAMA_KV_CACHE_TYPE lower-cased; "" = f16
    kv_cache_type: str = ""
    # OLLAMA_DEBUG as a stdlib logging level (TRACE = 5)
    log_level: int = logging.INFO
    # OLLAMA_NOPRUNE
    noprune: bool = False
    # CUDA_VISIBLE_DEVICES as given (None = unset); passed through to runners
    cuda_visible_devices: str | None = None
    # the other backends' device and driver selections that are set (DEVICE_VARIABLES, "NAME=value"
    # joined by ";"): part of the engine probe's cache key
    device_selection: str = ""
    # CORRAL_LOG_FORMAT
    log_format: Literal["text", "json"] = "text"
    # CORRAL_EVENT_LOOP: the daemon's event loop; "auto" = uvloop where it is installed (a core
    # dependency except on Windows, which it does not support), else asyncio's own
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # CORRAL_SIMULATE_GPUS: None = probe real devices; () = simulate a machine without GPUs
    simulate_gpus: tuple[SimulatedGpu, ...] | None = None
    # A value `corral serve` must not start with (a bad CORRAL_SIMULATE_GPUS: probing the real
    # GPUs instead would hide the typo); serve stops with this message. Client commands ignore it.
    startup_error: str | None = None
    # CORRAL_RUNNER_ENGINE
    runner_engine: Literal["llama", "fake"] = "llama"
    # CORRAL_FAKE_KNOBS: JSON object handed to fake runners (None = defaults)
    fake_knobs: dict[str, Any] | None = None
    # CORRAL_LLAMA_BACKEND: the build the install chose (auto|cpu|cuda|hip|metal|vulkan), and
    # CORRAL_CUDA_ARCHITECTURES: its CUDA targets; for `doctor`'s "plan for this machine"
    llama_backend: str = "auto"
    cuda_architectures: str = ""
    # names of the variables of env_summary() that the environment sets (the rest are defaults)
    env_set: frozenset[str] = frozenset()
    # XDG_CACHE_HOME/corral (else ~/.cache/corral): the engine probe's cache; None = no cache
    cache_dir: Path | None = None
    # CORRAL_DEFAULT_MODEL: the name under which `corral serve` imports (and preloads) the
    # embedded model; "" disables it. Unset: only into a store that holds no other model.
    default_model: str = "gemma3:270m"
    # True when CORRAL_DEFAULT_MODEL names a model (import and preload whatever the store holds)
    default_model_explicit: bool = False
    # CORRAL_PREDICT_LIMIT: a generation ends (done_reason "length") after this many times
    # num_ctx generated tokens, whatever num_predict asks (Ollama's 10); 0 = no limit
    predict_limit: int = DEFAULT_PREDICT_LIMIT
    # CORRAL_POLICY: the operator's policy file (daemon/policy.py); None = no policy
    policy_path: Path | None = None
    # CORRAL_PRIORITY_AGING: seconds a waiting request needs to move up one priority class
    priority_aging: float = DEFAULT_PRIORITY_AGING
    # CORRAL_KV_CACHE_DIR: where runners save their slots' prompt caches when they stop
    # (None: OLLAMA_MODELS/kvcache, beside the store; docs/DESIGN.md "Saved prompt caches")
    kv_cache_dir: Path | None = None
    # CORRAL_KV_CACHE_SIZE: the directory's cap in bytes (sizes with units too); 0 = no saving
    kv_cache_size: int = DEFAULT_KV_CACHE_SIZE
    # CORRAL_KV_CACHE_MEMORY: saved bytes left in the page cache (the rest is dropped from memory)
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY
    # CORRAL_SPARE_RUNNER: how many runner processes are kept started ahead, their imports done,
    # for the next loads (docs/DESIGN.md "Spare runner"); true = DEFAULT_SPARE_RUNNERS, false
    # = 0; None (unset) = DEFAULT_SPARE_RUNNERS for the llama engine, 0 for the fake one (whose
    # start costs nothing worth hiding)
    spare_runner: int | None = None
    # CORRAL_MAX_BODY (bytes or a size like 64MiB): longest request body; over it a 413.
    # Blob uploads (POST /api/blobs/:digest) stream to disk and are not bounded. 0 = no limit
    max_body: int = DEFAULT_MAX_BODY
    # Slow clients (durations as OLLAMA_KEEP_ALIVE's; <= 0 = none). CORRAL_HEADER_TIMEOUT: a
    # request's line and headers must be in this long after its first byte, else the connection
    # is closed. CORRAL_BODY_TIMEOUT: its body this long after its handler started, else a 408
    # (a blob upload: may not pause this long). Writing a response is never timed.
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    # CORRAL_IDLE_TIMEOUT: an idle keep-alive connection is closed after this
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    # CORRAL_MAX_CLIENT_CONNECTIONS: open connections per client address; each request on one
    # beyond it is a 429 with Retry-After. 0 = no cap (a flood meets OLLAMA_MAX_QUEUE's 503s)
    max_client_connections: int = 0

    # ---- exposure: API keys and TLS (issue 19; daemon/apikeys.py, daemon/api/auth.py) ----
    # CORRAL_API_KEYS_FILE: the key file; None = no keys, every client is let in (Ollama's way)
    api_keys_file: Path | None = None
    # CORRAL_METRICS_AUTH: GET /metrics needs a key (any scope) too; default open for scrapers
    metrics_auth: bool = False
    # CORRAL_TLS_CERT / CORRAL_TLS_KEY: PEM certificate chain and private key (HTTPS); both or
    # neither, and only with OLLAMA_HOST=https://... (see parse_tls)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # OLLAMA_API_KEY: what the `corral` client verbs send as `Authorization: Bearer`
    api_key: Secret = Secret("")

    @property
    def spare_runners(self) -> int:
        """How many spare runners `corral serve` keeps (CORRAL_SPARE_RUNNER, else by engine)."""
        if self.spare_runner is not None:
            return self.spare_runner
        return DEFAULT_SPARE_RUNNERS if self.runner_engine == "llama" else 0

    @property
    def kv_cache_path(self) -> Path:
        """The saved prompt caches' directory (CORRAL_KV_CACHE_DIR, else beside the store)."""
        return self.kv_cache_dir if self.kv_cache_dir is not None else self.models / "kvcache"

    @property
    def bind_host(self) -> str | None:
        """Host to listen on (no brackets); None = all interfaces (``OLLAMA_HOST=:1234``)."""
        return self.host.host or None

    @property
    def bind_port(self) -> int:
        return self.host.port

    @property
    def base_url(self) -> str:
        """OLLAMA_HOST as Ollama prints it, e.g. ``http://127.0.0.1:11434``."""
        return self.host.url

    @property
    def client_url(self) -> str:
        """URL a local client uses to reach this daemon (unspecified host -> loopback)."""
        return client_host(self.host).url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build the Config from ``environ`` (``os.environ`` when None). Never raises."""
        env = os.environ if environ is None else environ

        def var(name: str) -> str:
            return trim_var(env.get(name))

        def warn(name: str, value: str, default: Any, reason: str | None = None) -> None:
            log.warning(
                "invalid environment variable, using default",
                variable=name,
                value=value,
                default=default,
                **({"reason": reason} if reason else {}),
            )

        def spares(name: str) -> int | None:
            s = var(name)
            if s == "":
                return None
            words = {"t": DEFAULT_SPARE_RUNNERS, "true": DEFAULT_SPARE_RUNNERS, "f": 0, "false": 0}
            n = parse_uint(s) if s.lower() not in words else words[s.lower()]
            if n is None or n > MAX_SPARE_RUNNERS:
                warn(name, s, "by engine", f"a count from 0 to {MAX_SPARE_RUNNERS}, true or false")
                return None
            return n

        def uint(name: str, default: int) -> int:
            s = var(name)
            if s == "":
                return default
            n = parse_uint(s)
            if n is None:
                warn(name, s, default)
                return default
            return n

        def limit(name: str, default: float) -> float:
            d = duration(name, default)
            return FOREVER if d is None or d <= 0 else d

        def duration(name: str, default: float) -> float | None:
            s = var(name)
            if s == "":
                return default
            d = parse_duration(s)
            if d is None:
                warn(name, s, format_duration(default))
                return default
            return d

        host_raw = var("OLLAMA_HOST")
        host = parse_host(host_raw, warn=lambda r: warn("OLLAMA_HOST", host_raw, None, r))

        models_raw = var("OLLAMA_MODELS")
        if models_raw:
            models = Path(models_raw)
        else:
            home = env.get("HOME") or os.path.expanduser("~")
            models = Path(home) / ".ollama" / "models"

        keep_alive = duration("OLLAMA_KEEP_ALIVE", DEFAULT_KEEP_ALIVE)
        assert keep_alive is not None
        if keep_alive < 0:
            keep_alive = FOREVER
        load_timeout = duration("OLLAMA_LOAD_TIMEOUT", DEFAULT_LOAD_TIMEOUT)
        assert load_timeout is not None
        if load_timeout <= 0:
            load_timeout = FOREVER

        log_format = var("CORRAL_LOG_FORMAT").lower() or "text"
        if log_format not in ("text", "json"):
            warn("CORRAL_LOG_FORMAT", log_format, "text")
            log_format = "text"

        event_loop = var("CORRAL_EVENT_LOOP").lower() or "auto"
        if event_loop not in ("auto", "uvloop", "asyncio"):
            warn("CORRAL_EVENT_LOOP", event_loop, "auto")
            event_loop = "auto"

        engine = var("CORRAL_RUNNER_ENGINE").lower() or "llama"
        if engine not in ("llama", "fake"):
            warn("CORRAL_RUNNER_ENGINE", engine, "llama")
            engine = "llama"

        simulate: tuple[SimulatedGpu, ...] | None = None
        startup_error: str | None = None
        sim_raw = (env.get("CORRAL_SIMULATE_GPUS") or "").strip()
        if sim_raw:
            try:
                simulate = parse_simulated_gpus(sim_raw)
            except ValueError as e:
                startup_error = str(e)

        knobs: dict[str, Any] | None = None
        knobs_raw = (env.get("CORRAL_FAKE_KNOBS") or "").strip()
        if knobs_raw:
            try:
                knobs = msgspec.json.decode(knobs_raw, type=dict[str, Any])
            except msgspec.DecodeError as e:
                warn("CORRAL_FAKE_KNOBS", knobs_raw, None, str(e))

        policy_raw = var("CORRAL_POLICY")
        aging = duration("CORRAL_PRIORITY_AGING", DEFAULT_PRIORITY_AGING)
        if aging is None or aging <= 0 or math.isinf(aging):
            warn("CORRAL_PRIORITY_AGING", var("CORRAL_PRIORITY_AGING"), "30s", "must be > 0")
            aging = DEFAULT_PRIORITY_AGING

        keys_file = var("CORRAL_API_KEYS_FILE")
        tls_cert, tls_key, tls_error = parse_tls(
            host, var("CORRAL_TLS_CERT"), var("CORRAL_TLS_KEY")
        )
        startup_error = startup_error or tls_error

        default_model = (
            env["CORRAL_DEFAULT_MODEL"].strip() if "CORRAL_DEFAULT_MODEL" in env else "gemma3:270m"
        )

        def size(name: str, default: int) -> int:
            s = var(name)
            if s == "":
                return default
            try:
                return parse_size(s)
            except ValueError as e:
                warn(name, s, default, str(e))
                return default

        kv_dir_raw = var("CORRAL_KV_CACHE_DIR")

        return cls(
            host=host,
            origins=parse_origins(var("OLLAMA_ORIGINS")),
            models=models,
            keep_alive=keep_alive,
            load_timeout=load_timeout,
            max_loaded_models=uint("OLLAMA_MAX_LOADED_MODELS", 0),
            num_parallel=max(uint("OLLAMA_NUM_PARALLEL", 1), 1),
            max_queue=uint("OLLAMA_MAX_QUEUE", DEFAULT_MAX_QUEUE),
            sched_spread=parse_bool(var("OLLAMA_SCHED_SPREAD")),
            gpu_overhead=uint("OLLAMA_GPU_OVERHEAD", 0),
            context_length=uint("OLLAMA_CONTEXT_LENGTH", 0),
            flash_attention=parse_optional_bool(var("OLLAMA_FLASH_ATTENTION")),
            kv_cache_type=var("OLLAMA_KV_CACHE_TYPE").lower(),
            log_level=log_level_from_debug(var("OLLAMA_DEBUG")),
            noprune=parse_bool(var("OLLAMA_NOPRUNE")),
            cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
            device_selection=";".join(f"{v}={env[v]}" for v in DEVICE_VARIABLES if v in env),
            log_format=log_format,  # type: ignore[arg-type]
            event_loop=event_loop,  # type: ignore[arg-type]
            simulate_gpus=simulate,
            startup_error=startup_error,
            runner_engine=engine,  # type: ignore[arg-type]
            fake_knobs=knobs,
            cache_dir=_cache_dir(env),
            llama_backend=var("CORRAL_LLAMA_BACKEND").lower() or "auto",
            cuda_architectures=var("CORRAL_CUDA_ARCHITECTURES"),
            env_set=frozenset(k for k in SUMMARY_VARS if k in env),
            default_model=default_model,
            default_model_explicit=bool(default_model) and "CORRAL_DEFAULT_MODEL" in env,
            predict_limit=uint("CORRAL_PREDICT_LIMIT", DEFAULT_PREDICT_LIMIT),
            policy_path=Path(policy_raw).expanduser() if policy_raw else None,
            priority_aging=aging,
            kv_cache_dir=Path(kv_dir_raw).expanduser() if kv_dir_raw else None,
            kv_cache_size=size("CORRAL_KV_CACHE_SIZE", DEFAULT_KV_CACHE_SIZE),
            kv_cache_memory=size("CORRAL_KV_CACHE_MEMORY", DEFAULT_KV_CACHE_MEMORY),
            spare_runner=spares("CORRAL_SPARE_RUNNER"),
            api_keys_file=Path(keys_file).expanduser() if keys_file else None,
            metrics_auth=parse_bool(var("CORRAL_METRICS_AUTH")),
            tls_cert=tls_cert,
            tls_key=tls_key,
            api_key=Secret(var("OLLAMA_API_KEY")),
            max_body=size("CORRAL_MAX_BODY", DEFAULT_MAX_BODY),
            header_timeout=limit("CORRAL_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT),
            body_timeout=limit("CORRAL_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT),
            idle_timeout=limit("CORRAL_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT),
            max_client_connections=uint("CORRAL_MAX_CLIENT_CONNECTIONS", 0),
        )

    def env_summary(self) -> dict[str, str]:
        """The values as Ollama logs them at start-up (``server config env=...``)."""
        return {
            "OLLAMA_HOST": self.base_url,
            "OLLAMA_ORIGINS": ",".join(self.origins),
            "OLLAMA_MODELS": str(self.models),
            "OLLAMA_KEEP_ALIVE": format_duration(self.keep_alive),
            "OLLAMA_LOAD_TIMEOUT": format_duration(self.load_timeout),
            "OLLAMA_MAX_LOADED_MODELS": str(self.max_loaded_models),
            "OLLAMA_NUM_PARALLEL": str(self.num_parallel),
            "OLLAMA_MAX_QUEUE": str(self.max_queue),
            "OLLAMA_SCHED_SPREAD": str(self.sched_spread).lower(),
            "OLLAMA_GPU_OVERHEAD": str(self.gpu_overhead),
            "OLLAMA_CONTEXT_LENGTH": str(self.context_length),
            "OLLAMA_FLASH_ATTENTION": ""
            if self.flash_attention is None
            else str(self.flash_attention).lower(),
            "OLLAMA_KV_CACHE_TYPE": self.kv_cache_type,
            "OLLAMA_DEBUG": logging.getLevelName(self.log_level),
            "OLLAMA_NOPRUNE": str(self.noprune).lower(),
            "CORRAL_LOG_FORMAT": self.log_format,
            "CORRAL_EVENT_LOOP": self.event_loop,
            "CORRAL_RUNNER_ENGINE": self.runner_engine,
            "CORRAL_DEFAULT_MODEL": self.default_model if self.default_model_explicit else "",
            "CORRAL_PREDICT_LIMIT": str(self.predict_limit),
            "CORRAL_POLICY": str(self.policy_path or ""),
            "CORRAL_PRIORITY_AGING": format_duration(self.priority_aging),
            "CORRAL_KV_CACHE_DIR": str(self.kv_cache_path),
            "CORRAL_KV_CACHE_SIZE": str(self.kv_cache_size),
            "CORRAL_KV_CACHE_MEMORY": str(self.kv_cache_memory),
            "CORRAL_SPARE_RUNNER": str(self.spare_runners),
            "CORRAL_API_KEYS_FILE": str(self.api_keys_file or ""),
            "CORRAL_METRICS_AUTH": str(self.metrics_auth).lower(),
            "CORRAL_TLS_CERT": str(self.tls_cert or ""),
            "CORRAL_TLS_KEY": str(self.tls_key or ""),
            "CORRAL_MAX_BODY": str(self.max_body),
            "CORRAL_HEADER_TIMEOUT": format_duration(self.header_timeout),
            "CORRAL_BODY_TIMEOUT": format_duration(self.body_timeout),
            "CORRAL_IDLE_TIMEOUT": format_duration(self.idle_timeout),
            "CORRAL_MAX_CLIENT_CONNECTIONS": str(self.max_client_connections),
        }
