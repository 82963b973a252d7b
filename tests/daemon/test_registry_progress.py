"""Progress throttling of pulls/pushes: at most one report per interval, and a held-back report
still goes out when the transfer goes quiet (a stalled download shows how far it got)."""

from __future__ import annotations

import asyncio

from corral.daemon.models.registry import _Throttle


async def test_held_back_report_is_sent_after_the_interval():
    seen: list[int] = []
    arrived = asyncio.Event()

    async def progress(msg: dict) -> None:
        seen.append(msg["completed"])
        if msg["completed"] == 3:
            arrived.set()

    t = _Throttle(progress, interval=0.05)
    await t({"completed": 1})
    await t({"completed": 2})  # within the interval: held back ...
    await t({"completed": 3})  # ... and replaced by the newer one
    assert seen == [1]
    await asyncio.wait_for(arrived.wait(), 5)  # ... which is sent although nothing else happens
    assert seen == [1, 3]
    t.close()


async def test_close_drops_the_held_back_report():
    seen: list[int] = []

    async def progress(msg: dict) -> None:
        seen.append(msg["completed"])

    t = _Throttle(progress, interval=0.05)
    await t({"completed": 1})
    await t({"completed": 2})
    t.close()
    await t({"completed": 9}, force=True)
    await asyncio.sleep(0.1)
    assert seen == [1, 9]
