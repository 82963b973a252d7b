"""The one RFC 3339 formatter: Go's RFC3339Nano as encoding/json writes a time.Time."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from corral.daemon.timefmt import now_utc, rfc3339


@pytest.fixture
def local_zone(monkeypatch):
    """Set the process's local time zone (a POSIX TZ string: no tz database needed)."""

    def set_zone(tz: str) -> None:
        monkeypatch.setenv("TZ", tz)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def test_local_time_trims_zeros_and_has_offset(local_zone) -> None:
    local_zone("CET-1")
    text = rfc3339(1_700_000_000.5)
    assert text == "2023-11-14T23:13:20.5+01:00"
    assert rfc3339(1_700_000_000.0) == "2023-11-14T23:13:20+01:00"
    assert datetime.fromisoformat(text).timestamp() == 1_700_000_000.5


def test_local_time_on_a_utc_machine_ends_in_z(local_zone) -> None:
    """Go writes a zero offset as Z (layout Z07:00): never +00:00."""
    local_zone("UTC0")
    assert rfc3339(1_700_000_000.5) == "2023-11-14T22:13:20.5Z"


def test_utc_ends_in_z_and_trims_zeros() -> None:
    assert rfc3339(1_700_000_000.25, utc=True) == "2023-11-14T22:13:20.25Z"
    assert rfc3339(1_700_000_000.0, utc=True) == "2023-11-14T22:13:20Z"
    assert rfc3339(1_700_000_000.000123, utc=True) == "2023-11-14T22:13:20.000123Z"


def test_now_utc_is_the_same_format() -> None:
    text = now_utc()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z", text)
    assert not re.search(r"\.\d*0Z$", text)
