"""The one RFC 3339 formatter: every time corral writes into a response.

Ollama's times are Go ``time.Time`` values written by ``encoding/json``, i.e. ``RFC3339Nano``:
fraction digits with trailing zeros dropped (no fraction at all on a whole second), ``Z`` for UTC
(``created_at``) and the local offset for local times (``modified_at``, ``expires_at``) - also
``Z`` when that offset is zero (Go's ``Z07:00`` layout: a machine on UTC never writes ``+00:00``).
Python has microseconds, so at most six digits.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

_second: tuple[int, str] = (-1, "")  # (epoch second, its "YYYY-MM-DDTHH:MM:SS")


def _join(head: str, micros: int, zone: str) -> str:
    frac = f"{micros:06d}".rstrip("0")
    return f"{head}.{frac}{zone}" if frac else f"{head}{zone}"


def rfc3339(epoch: float, *, utc: bool = False) -> str:
    """``epoch`` (seconds) as RFC3339Nano, local time with its offset unless ``utc``."""
    when = datetime.fromtimestamp(epoch, UTC)
    if not utc:
        when = when.astimezone()
    text = when.isoformat(timespec="seconds")  # ...T14:09:12+02:00 / +00:00
    head, zone = text[:19], text[19:]
    return _join(head, when.microsecond, "Z" if utc or zone == "+00:00" else zone)


def now_utc() -> str:
    """Now, UTC (``created_at``). The date part is formatted once per second: this runs for
    every streamed line."""
    global _second
    sec, us = divmod(time.time_ns() // 1000, 1_000_000)
    if _second[0] != sec:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return _join(_second[1], us, "Z")
