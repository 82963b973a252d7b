"""Peak resident memory of ``corral serve`` during ten concurrent 200 MB request bodies.

    .venv/bin/python bench/bodies.py [--size-mb 200] [--clients 10]

Starts a daemon (default CORRAL_MAX_BODY, empty store), sends the burst to /api/chat three times
(all with Content-Length, all chunked, half and half); every client sends its whole body. Prints
the daemon's RSS before each burst, its peak during it and the statuses. The machine's load is
printed too: the figures are memory, not time, but a loaded machine drains sockets slower.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_note
from tests.e2e.conftest import start_daemon
from tests.e2e.test_body_memory import PeakRss, send_body

MiB = 1 << 20


async def main(size: int, clients: int) -> None:
    print(load_note())
    with tempfile.TemporaryDirectory() as tmp, start_daemon(Path(tmp)) as d:
        port = int(d.url.rsplit(":", 1)[1])
        await asyncio.gather(*(send_body(port, "/api/chat", 2 * MiB, c) for c in (False, True)))
        for name, chunked in (
            ("Content-Length", [False] * clients),
            ("chunked", [True] * clients),
            ("half and half", [i % 2 == 1 for i in range(clients)]),
        ):
            with PeakRss(d.proc.pid) as rss:
                statuses = await asyncio.gather(
                    *(send_body(port, "/api/chat", size, c) for c in chunked)
                )
            print(
                f"{clients} x {size / 1e6:.0f} MB, {name:>14}: idle {rss.start / MiB:6.1f} MiB, "
                f"peak {rss.peak / MiB:6.1f} MiB (+{(rss.peak - rss.start) / MiB:.1f} MiB), "
                f"statuses {sorted(set(statuses))}"
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--clients", type=int, default=10)
    a = ap.parse_args()
    asyncio.run(main(a.size_mb * 1_000_000, a.clients))
