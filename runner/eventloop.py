"""The event loop the daemon and every runner run on (``CORRAL_EVENT_LOOP``; a runner inherits
the daemon's setting through its environment). Shared by both sides, so it lives beside
``protocol`` as the one other runner module the daemon may import; like ``protocol`` it imports
nothing else of ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``CORRAL_EVENT_LOOP`` = ``choice`` (``auto``, ``uvloop``,
    ``asyncio``; lower case; anything else counts as ``auto``): uvloop's unless ``choice`` is
    ``asyncio`` or uvloop is not installed (Windows, which it does not support), else None
    (asyncio's own). A request's fixed cost is mostly the loop's, in the daemon and in the
    runner: its transports, callbacks, timers and wake-ups from other threads cost about half
    as much CPU on uvloop (issue 18; ``bench/daemon_overhead`` measures both). Imports uvloop
    when it is chosen; says nothing (the caller warns where it should); never raises."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
