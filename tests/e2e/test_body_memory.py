"""A burst of large bodies against a real ``corral serve``: its memory stays bounded (issue 19).

Ten clients at once each send a body many times ``CORRAL_MAX_BODY`` to /api/chat, half with a
``Content-Length`` (refused before reading) and half chunked (refused once past the limit); each
sends its whole body whatever the daemon answers, as a hostile client would. Every one gets a
413, and the daemon's resident memory (psutil, sampled all along) grows by less than the bodies
could make it: a few times the limit per client, not the body. ``bench/bodies.py`` runs the same
burst with 200 MB bodies and the default limit and prints the figures.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import start_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MiB = 1 << 20
CHUNK = b"x" * MiB


async def send_body(port: int, path: str, size: int, chunked: bool) -> int:
    """POST a ``size``-byte JSON-looking body on its own connection, all of it (unless the
    daemon closes the connection first); -> the response's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n".encode()
    )
    status = asyncio.ensure_future(reader.readline())
    try:
        sent = 0
        while sent < size:
            n = min(len(CHUNK), size - sent)
            data = CHUNK[:n] if n < len(CHUNK) else CHUNK
            writer.write(f"{n:x}\r\n".encode() + data + b"\r\n" if chunked else data)
            await writer.drain()
            sent += n
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except ConnectionError:
        pass  # the daemon stopped reading: the answer is already there
    try:
        line = await asyncio.wait_for(status, 60)
        return int(line.split()[1])
    finally:
        writer.close()


class PeakRss:
    """The highest resident set size of a process, sampled every few milliseconds in a thread
    (``with PeakRss(pid) as p: ...; p.peak``), and the one at the start (``p.start``)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


async def burst(port: int, clients: int, size: int) -> list[int]:
    """``clients`` bodies of ``size`` bytes at once, alternately with Content-Length and
    chunked; -> their statuses."""
    return list(
        await asyncio.gather(
            *(send_body(port, "/api/chat", size, chunked=i % 2 == 1) for i in range(clients))
        )
    )


async def test_a_burst_of_large_bodies_keeps_memory_bounded(tmp_path: Path) -> None:
    limit, size, clients = 2 * MiB, 32 * MiB, 10
    with start_daemon(tmp_path, CORRAL_MAX_BODY=str(limit)) as d:
        port = int(d.url.rsplit(":", 1)[1])
        # warm up: the first requests load modules and fill pools that stay
        assert await burst(port, 2, 2 * limit) == [413, 413]
        with PeakRss(d.proc.pid) as rss:
            statuses = await burst(port, clients, size)
        assert statuses == [413] * clients
        grown = rss.peak - rss.start
        # the bodies were 320 MiB; reading them whole (as before) grew the daemon by more than
        # that. Now each client costs at most a few times the limit.
        assert grown < clients * 3 * limit + 32 * MiB, f"grew {grown / MiB:.0f} MiB"
