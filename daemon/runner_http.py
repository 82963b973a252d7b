"""A lean HTTP/1.1 client for the daemon's own runners: keep-alive connections on loopback.

A request to a runner is the daemon's fixed cost on every inference request (issue 18): through
aiohttp's ``ClientSession`` it built a request object, its headers and URL, went through the
connector's pool, timers and tracing, and parsed the answer into a response object, ~200 µs of
CPU per request on the development machine. Here a request is one pre-built head plus the body
in one write, and the answer is parsed by a small state machine as it arrives (Content-Length
or chunked bodies, as the runner's aiohttp server sends them): ~50 µs.

:class:`RunnerHTTP` is the pool of one runner (``host``, ``port``): :meth:`RunnerHTTP.request`
sends and waits for the answer's head, giving a :class:`Reply` whose body is read whole
(:meth:`Reply.read`) or as it arrives (:meth:`Reply.readany`). A reply read to its
end gives its connection back for the next request; one closed before (a client gone, a
cancelled task) closes the connection, which is how a runner learns to cancel the job. A broken
connection raises :class:`ConnectionError`. Use from the event loop thread only.

A kept-alive connection the runner closes as a request goes out on it (its keep-alive timer
fired in the same moment, e.g. a runner that was stopped or starved past it) fails before a
byte of an answer: the runner never read the request, so it goes again on a fresh connection
(HTTP's keep-alive race, RFC 9112 section 9.3.1; Go's net/http does the same). Nothing else is
retried, and nothing here has a timer: a loop busy for longer than any timeout (a flood on a
loaded machine) never fails a call by itself.
"""

from __future__ import annotations

import asyncio
from typing import cast

MAX_HEAD = 64 * 1024  # a runner's answer head is a few hundred bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses the answer to the request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = True  # no "Connection: close" seen, not broken, not abandoned
        self._buf = bytearray()
        self._state = "idle"  # head | length | size | data | trailer | done | idle
        self._left = 0  # bytes of the body (length) or of the chunk (data) still to come
        self._chunked = False
        self.status = 0
        self._head: asyncio.Future[None] | None = None
        self._pieces: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self.lost = False
        self.answered = False  # a byte of an answer arrived since the last send

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport instances)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._state in ("idle", "done"):
            self._fail(ConnectionError("runner sent data without a request"))
            return
        self.answered = True
        self._buf += data
        try:
            self._parse()
        except ValueError as e:
            self._fail(ConnectionError(f"bad answer from runner: {e}"))
            return
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        if self._state not in ("idle", "done") and self._error is None:
            self._fail(ConnectionError(f"runner closed the connection{f': {exc}' if exc else ''}"))

    # ---- the request in flight

    def send(self, data: bytes) -> asyncio.Future[None]:
        """Write one request; the future is done once the answer's head is parsed."""
        assert self.transport is not None
        self._state, self._buf, self._pieces = "head", bytearray(), []
        self._error, self.status, self.answered = None, 0, False
        self._head = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._head

    async def next_pieces(self) -> list[bytes]:
        """The body bytes that arrived since the last call (waits for some); [] at the end."""
        while not self._pieces and self._state != "done":
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        pieces, self._pieces = self._pieces, []
        return pieces

    @property
    def finished(self) -> bool:
        return self._state == "done" and not self._pieces

    def abandon(self) -> None:
        """The request is given up before its answer ended: the connection closes."""
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    # ---- parsing

    def _parse(self) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ValueError("answer head too long")
                    return
                self._read_head(bytes(buf[:end]))
                del buf[: end + 4]
            elif state == "length":
                if not buf:
                    return
                take = min(self._left, len(buf))
                self._pieces.append(bytes(buf[:take]))
                del buf[:take]
                self._left -= take
                if not self._left:
                    self._state = "done"
            elif state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                self._left = size
                self._state = "data" if size else "trailer"
            elif state == "data":
                if self._left:
                    if not buf:
                        return
                    take = min(self._left, len(buf))  # hand on what is there already
                    self._pieces.append(bytes(buf[:take]))
                    del buf[:take]
                    self._left -= take
                    if self._left:
                        return
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                del buf[:2]
                self._state = "size"
            elif state == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._state = "done"
            else:  # done: nothing may follow an answer
                if buf:
                    raise ValueError("data after the end of the answer")
                return

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        length: int | None = None
        self._chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                self._chunked = b"chunked" in value.lower()
            elif name == b"connection" and b"close" in value.lower():
                self.reusable = False
        if self._chunked:
            self._state = "size"
        elif length is not None:
            self._left = length
            self._state = "length" if length else "done"
        else:
            raise ValueError("answer without a length")  # the runner always sends one
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        self.reusable = False
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Reply:
    """A runner's answer whose head has arrived: ``status`` and the body to come. Read it to
    the end or :meth:`close` it (leaving ``async with`` does)."""

    __slots__ = ("status", "_conn", "_pool", "_closed")

    def __init__(self, conn: _Connection, pool: RunnerHTTP) -> None:
        self.status = conn.status
        self._conn = conn
        self._pool = pool
        self._closed = False

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last call (waits for some); b"" at the end."""
        got = await self._conn.next_pieces()
        if not got:
            self.close()
            return b""
        return got[0] if len(got) == 1 else b"".join(got)

    async def read(self) -> bytes:
        """The whole body."""
        parts: list[bytes] = []
        while got := await self._conn.next_pieces():
            parts += got
        self.close()
        return b"".join(parts)

    def close(self) -> None:
        """Done with the answer: its connection goes back to the pool when the answer was read
        to its end, else it closes (the runner cancels what it was doing for it)."""
        if self._closed:
            return
        self._closed = True
        if self._conn.finished and self._conn.reusable:
            self._pool._idle.append(self._conn)
        else:
            self._conn.abandon()

    async def __aenter__(self) -> Reply:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class RunnerHTTP:
    """Keep-alive connections to one runner at ``host``:``port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._host_header = f"Host: {host}:{port}\r\n".encode()
        self._idle: list[_Connection] = []
        self._closed = False

    async def request(self, method: str, path: str, body: bytes = b"") -> Reply:
        """Send ``method path`` with a JSON ``body`` and wait for the answer's head."""
        if self._closed:
            raise ConnectionError("runner client closed")
        head = (
            b"%s %s HTTP/1.1\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (
                method.encode(),
                path.encode(),
                self._host_header,
                len(body),
            )
        )
        while True:
            conn, reused = await self._connection()
            try:
                await conn.send(head + body)
            except ConnectionError:
                conn.abandon()
                if reused and not conn.answered:  # closed while idle: the request was not read
                    continue
                raise
            except BaseException:
                conn.abandon()
                raise
            return Reply(conn, self)

    async def _connection(self) -> tuple[_Connection, bool]:
        """A connection for the next request, and whether it is a kept-alive one."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as e:
            raise ConnectionError(f"cannot reach the runner: {e}") from e
        return conn, False

    def close(self) -> None:
        """Close the idle connections; later requests fail (those in flight end as they do)."""
        self._closed = True
        while self._idle:
            self._idle.pop().abandon()
