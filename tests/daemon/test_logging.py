"""structlog set-up: key=value lines by default, JSON lines with the switch; stdlib loggers
(aiohttp's) go through the same renderer."""

from __future__ import annotations

import io
import json
import logging

import structlog

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
