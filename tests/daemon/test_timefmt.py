"""The one RFC 3339 formatter: Go's RFC3339Nano as encoding/json writes a time.Time."""

from __future__ import annotations

import re
from datetime import datetime

from corral.daemon.timefmt import now_utc, rfc3339


def test_local_time_trims_zeros_and_has_offset() -> None:
    text = rfc3339(1_700_000_000.5)
    assert re.fullmatch(r"2023-11-\d\dT\d\d:\d\d:20\.5[+-]\d\d:\d\d", text)
    assert "." not in rfc3339(1_700_000_000.0)
    assert datetime.fromisoformat(text).timestamp() == 1_700_000_000.5


def test_utc_ends_in_z_and_trims_zeros() -> None:
    assert rfc3339(1_700_000_000.25, utc=True) == "2023-11-14T22:13:20.25Z"
    assert rfc3339(1_700_000_000.0, utc=True) == "2023-11-14T22:13:20Z"
    assert rfc3339(1_700_000_000.000123, utc=True) == "2023-11-14T22:13:20.000123Z"


def test_now_utc_is_the_same_format() -> None:
    text = now_utc()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z", text)
    assert not re.search(r"\.\d*0Z$", text)
