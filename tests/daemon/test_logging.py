"""structlog set-up: key=value lines by default, JSON lines with the switch; stdlib loggers
(aiohttp's) go through the same renderer."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from corral.daemon import logging as corral_logging


def _configure(json_mode: bool) -> io.StringIO:
    out = io.StringIO()
    corral_logging.configure(level=logging.INFO, json=json_mode, stream=out)
    return out


def teardown_function() -> None:
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_key_value_by_default():
    out = _configure(False)
    structlog.get_logger("t").info("runner ready", pid=12, model="tiny:latest")
    line = out.getvalue().strip()
    assert 'event="runner ready"' in line and "pid=12" in line and "model=tiny:latest" in line
    assert "level=info" in line


def test_json_switch_and_stdlib_records():
    out = _configure(True)
    structlog.get_logger("t").warning("queue full", queued=512)
    logging.getLogger("aiohttp.server").error("boom %s", "x")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "queue full" and first["queued"] == 512 and first["level"] == "warning"
    assert second["event"] == "boom x" and second["level"] == "error"


def test_level_filters_debug():
    out = _configure(False)
    structlog.get_logger("t").debug("hidden")
    assert out.getvalue() == ""


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(alphabet=st.sampled_from("ab =\\\"\n\t'{}é"), max_size=12),
    st.lists(st.text(max_size=3), max_size=3),
)
_KEYS = st.text(alphabet=st.sampled_from("abz_.-0"), min_size=1, max_size=6)


@given(
    st.dictionaries(
        st.one_of(_KEYS, st.sampled_from(["timestamp", "level", "event"])), _VALUES, max_size=6
    )
)
def test_the_daemons_logfmt_writes_what_structlogs_does(event: dict) -> None:
    """Logfmt (checks each key once) renders every line as structlog's LogfmtRenderer."""
    order = ["timestamp", "level", "event"]
    ours = corral_logging.Logfmt(key_order=order)
    theirs = structlog.processors.LogfmtRenderer(key_order=order)
    for _ in range(2):  # the second time the keys are known
        assert ours(None, "info", dict(event)) == theirs(None, "info", dict(event))


def test_the_daemons_logfmt_refuses_a_key_with_a_space_as_structlogs_does() -> None:
    ours = corral_logging.Logfmt(key_order=["event"])
    for _ in range(2):
        with pytest.raises(ValueError, match="Invalid key"):
            ours(None, "info", {"event": "x", "a b": 1})
