"""Response helpers shared by the route modules: a JSON response and a lazily started stream.

:class:`LazyStream` is every streamed answer (NDJSON of generate/chat/pull/push/create, SSE of
``/v1``): its headers go out with the first frame, so a handler that fails before that still
answers with a real status; after it, the handler reports a late error as a last frame.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
from aiohttp import web

NDJSON = "application/x-ndjson"
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_enc = msgspec.json.Encoder()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=_enc.encode(obj), status=status, content_type="application/json", charset="utf-8"
    )


# the answer a handler sent itself (:func:`send_json`): what the error middleware keeps when
# something fails in the tidying up after it (a second answer would corrupt the connection)
SENT: web.RequestKey[web.StreamResponse] = web.RequestKey("corral.sent", web.StreamResponse)


async def send_json(request: web.Request, obj: Any, status: int = 200) -> web.Response:
    """:func:`json_response`, sent at once: the client has its answer while the handler tidies
    up (releases the runner slot, closes the job) and the middlewares write the request's log
    line and count it. What a request costs after its answer is then off the client's path: a
    client sending one request after another waits for it only when it is faster than that
    tidying up (issue 18). A client gone meanwhile is not an error here (as with aiohttp's
    own write of a returned response)."""
    response = json_response(obj, status)
    request[SENT] = response
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.prepare(request)
        await response.write_eof()
    return response


class LazyStream:
    """Frames ``prefix + payload + suffix``; the response (with ``headers``) is prepared at the
    first one. ``gone`` turns true when the client closed the connection; later frames are
    dropped (the handler then stops, or lets its work finish). Never raises on a closed
    connection."""

    def __init__(
        self,
        request: web.Request,
        headers: dict[str, str],
        *,
        prefix: bytes = b"",
        suffix: bytes = b"\n",
    ) -> None:
        self.request = request
        self.headers = headers
        self.prefix, self.suffix = prefix, suffix
        self.response: web.StreamResponse | None = None
        self.gone = False
        self._held: list[bytes] = []

    @classmethod
    def ndjson(cls, request: web.Request) -> LazyStream:
        """One JSON value per line."""
        return cls(request, {"Content-Type": NDJSON})

    @property
    def started(self) -> bool:
        """Whether the headers (200) went out or a frame is held for them: an error must then be
        a frame."""
        return self.response is not None or bool(self._held)

    async def write(self, payload: bytes, *, hold: bool = False) -> None:
        """Send one frame. ``hold``: the caller has the next frame at hand; this one waits and
        goes out with it in one write."""
        if self.gone:
            return
        frame = self.prefix + payload + self.suffix
        if hold:
            self._held.append(frame)
            return
        if self._held:  # per token the usual case is none: no list, no join
            self._held.append(frame)
            frame = b"".join(self._held)
            self._held.clear()
        await self._send(frame)

    async def _flush(self) -> None:
        frames = b"".join(self._held)
        self._held.clear()
        await self._send(frames)

    async def _send(self, frames: bytes) -> None:
        try:
            if self.response is None:
                self.response = web.StreamResponse(headers=self.headers)
                await self.response.prepare(self.request)
            await self.response.write(frames)
        except (ConnectionError, RuntimeError):
            self.gone = True

    async def send(self, obj: Any) -> None:
        """``write`` of ``obj`` as JSON."""
        await self.write(_enc.encode(obj))

    @classmethod
    def sse(cls, request: web.Request) -> LazyStream:
        """Unnamed server-sent events: each frame is ``data: <payload>`` (OpenAI's streams)."""
        return cls(request, _SSE, prefix=b"data: ", suffix=b"\n\n")

    @classmethod
    def events(cls, request: web.Request) -> LazyStream:
        """Named server-sent events (:meth:`event`), as the Anthropic and Responses APIs send."""
        return cls(request, _SSE, suffix=b"")

    async def event(self, name: str, obj: Any, *, hold: bool = False) -> None:
        """One ``event: name`` / ``data: <json>`` server-sent event (``hold``: as :meth:`write`)."""
        await self.write(
            b"event: " + name.encode() + b"\ndata: " + _enc.encode(obj) + b"\n\n", hold=hold
        )

    async def flush(self) -> None:
        """Send the held frames now, if any."""
        if self._held and not self.gone:
            await self._flush()

    async def finish(self) -> web.StreamResponse:
        """End the stream (held frames go out first); at least one frame must have been written."""
        await self.flush()
        assert self.response is not None
        if not self.gone:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.response.write_eof()
        return self.response
