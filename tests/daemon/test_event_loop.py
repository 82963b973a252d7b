"""The daemon's event loop (``CORRAL_EVENT_LOOP``, ``boot.loop_factory``): uvloop where it is
installed unless asyncio's own is asked for; asyncio's where uvloop is missing (Windows)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from structlog.testing import capture_logs

from corral.daemon.boot import loop_factory

uvloop = pytest.importorskip("uvloop")  # a core dependency except on Windows


def test_auto_and_uvloop_run_on_uvloop() -> None:
    for choice in ("auto", "uvloop"):
        factory = loop_factory(choice)
        assert factory is uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            assert runner.run(_loop_module()) == "uvloop"


def test_asyncio_runs_on_asyncios_own_loop() -> None:
    assert loop_factory("asyncio") is None
    with asyncio.Runner(loop_factory=loop_factory("asyncio")) as runner:
        assert runner.run(_loop_module()) == "asyncio"


def test_without_uvloop_the_daemon_runs_on_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where uvloop is not installed: auto falls back quietly, an explicit uvloop says so."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    with capture_logs() as logs:
        assert loop_factory("auto") is None
    assert logs == []
    with capture_logs() as logs:
        assert loop_factory("uvloop") is None
    assert [e["log_level"] for e in logs] == ["warning"]


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
