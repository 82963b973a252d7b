"""The saved prompt caches' totals, kept beside them for ``corral doctor``.

Runners report what their saved prompt cache did (``KvCacheReport`` on the event pipe); the
supervisor counts it in /metrics and adds it here, to ``<CORRAL_KV_CACHE_DIR>/stats.json``, which
outlives the daemon, so `corral doctor` (no daemon needed) can show the hit rate: of the
requests that found no usable prefix in their runner's own slots (cold starts), the share the
saved cache restored. The directory's size is read from the files themselves.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import msgspec
import structlog

from corral.runner.protocol import KvCacheReport

log = structlog.get_logger(__name__)

STATS_FILE = "stats.json"
COUNTS = tuple(f for f in KvCacheReport.__struct_fields__ if f != "version")


class KvCacheTotals(msgspec.Struct, kw_only=True):
    saves: int = 0
    saved_bytes: int = 0
    restores: int = 0
    restored_tokens: int = 0
    restored_bytes: int = 0
    misses: int = 0
    dropped: int = 0
    failed_saves: int = 0

    @property
    def hit_rate(self) -> float | None:
        """restores / (restores + misses); None before any cold start."""
        n = self.restores + self.misses
        return self.restores / n if n else None


def read_totals(directory: Path) -> KvCacheTotals:
    """The totals saved in ``directory`` (zeros when there are none or they cannot be read)."""
    try:
        return msgspec.json.decode((directory / STATS_FILE).read_bytes(), type=KvCacheTotals)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return KvCacheTotals()


def usage(directory: Path) -> tuple[int, int]:
    """(files, bytes) of the saved prefixes under ``directory`` (every key's subdirectory)."""
    n = total = 0
    with contextlib.suppress(OSError):
        for sub in directory.iterdir():
            with contextlib.suppress(OSError):
                for p in sub.glob("*.kv"):
                    with contextlib.suppress(OSError):
                        total += p.stat().st_size
                        n += 1
    return n, total


class KvCacheStats:
    """The daemon's running totals (None directory: the cache is off, nothing is written)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.totals = read_totals(directory) if directory is not None else KvCacheTotals()

    def add(self, report: KvCacheReport) -> None:
        for f in COUNTS:
            setattr(self.totals, f, getattr(self.totals, f) + getattr(report, f))
        if self.directory is None:
            return
        path = self.directory / STATS_FILE
        tmp = path.with_name(f"{STATS_FILE}.tmp{os.getpid()}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(msgspec.json.encode(self.totals))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk costs the doctor's figures, nothing else
            log.debug("prompt cache totals not written", error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()
