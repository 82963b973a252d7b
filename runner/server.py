"""The runner's HTTP API (aiohttp), in front of an engine (real or fake).

Contract (docs/DESIGN.md "Runner HTTP API"): JSON bodies are the msgspec structs of
``corral.runner.protocol``. ``/completion`` streams NDJSON lines, each a tagged CompletionEvent,
the last one ``done`` or ``error``. A client that disconnects cancels its job (handler
cancellation is on), which frees the slot at the engine's next step. While draining (SIGTERM),
new work is refused with 503.

Relay mode (``CompletionRequest.relay`` = id, streaming, when the runner was started by the
daemon): the events do not go through this HTTP response but up the event pipe, written by the
decode thread itself, one write per step for all sequences (:class:`PipeRelay`): the step's
text chunks as ONE ``RelayStep`` line (the engine hands them over in one ``relay_chunks`` call),
any other event (a first token, logprobs, a done) as a ``Relay`` line after it. That takes the event
loop out of the per-token path: no wake-up of this process's loop thread and one write per step
instead of one per stream, so the two decode threads lose fewer time slices to the HTTP side on
a machine with as many cores as threads.
The HTTP request stays open as the job's handle: it ends (``{}``) once the job's last event is
in the pipe, and closing it cancels the job.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from aiohttp import web

from corral.runner.common import BadRequest, EngineLike
from corral.runner.protocol import (
    CompletionChunk,
    CompletionDone,
    CompletionError,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbedRequest,
    ErrorResponse,
    Health,
    Relay,
    RelayStep,
    TokenizeRequest,
    TokenizeResponse,
    encode,
)

log = structlog.get_logger(__name__)

NDJSON = "application/x-ndjson"
# A completion this small (prompt characters + tokens, no images, no format grammar) is
# submitted on the event loop, not in an executor thread: the hop there and back is two thread
# wake-ups per request, dearest when the runner idled before it (fake engine, tiny requests 0.8
# ms apart, load 5: runner CPU 330 -> 190 us per request). Longer prompts keep the hop: Gemma
# 3's 262k-token vocabulary tokenizes ~0.5 us per character, which would stall the loop.
INLINE_SUBMIT = 256


def _inline(req: CompletionRequest) -> bool:
    """Whether ``engine.submit(req)`` is cheap enough to run on the event loop."""
    size = len(req.prompt or "") + len(req.tokens or ())
    return size <= INLINE_SUBMIT and not req.images and req.format is None


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unexpected exceptions become JSON 500s; HTTP errors (404, 405) keep their status."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return RunnerServer._json(ErrorResponse(error=e.reason), e.status)
    except Exception as e:
        log.exception("runner request failed", path=request.path)
        return RunnerServer._json(ErrorResponse(error=f"{type(e).__name__}: {e}"), 500)


class _Mailbox:
    """Events from the engine's decode thread to the event loop. One decode step emits a token
    for every running sequence; they cross over with ONE loop wake-up (the first event of a burst
    schedules the delivery, later ones join it), not one self-pipe write and GIL hand-off each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: collections.deque[tuple[asyncio.Queue, Any]] = collections.deque()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, event: Any) -> None:  # any thread; never blocks
        with self._lock:
            self._items.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    def _deliver(self) -> None:  # on the loop
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._scheduled = False
        for queue, event in items:
            queue.put_nowait(event)


class PipeRelay:
    """Completion events of relay-mode jobs, written up the event pipe (``write``): :meth:`chunks`
    (the engine's ``relay_chunks``, once per step) takes a step's text chunks as one RelayStep
    line, :meth:`put` (decode thread) any other event as a Relay line; :meth:`flush` (the
    engine's ``after_emit``) writes the burst at once, RelayStep lines first, then runs the end
    callbacks of the jobs that finished in it, so a job's HTTP handle ends only after its last
    event is in the pipe. A RelayStep line with nothing else queued (the usual step: text only,
    the engine emits its other events after handing the chunks over) is written at once: one
    encode and one write per step, no flush."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._steps: list[bytes] = []
        self._lines: list[bytes] = []
        self._ended: list[Callable[[], None]] = []

    def chunks(self, ids: list[int], texts: list[str]) -> None:
        line = encode(RelayStep(ids=ids, content=texts))
        with self._lock:
            if self._lines:  # events queued before the step's text: flush writes it first
                self._steps.append(line)
            else:
                self._write(line + b"\n")

    def put(
        self,
        relay_id: int,
        event: CompletionChunk | CompletionDone | CompletionError,
        on_end: Callable[[], None],
    ) -> None:
        line = encode(Relay(id=relay_id, event=event))
        with self._lock:
            self._lines.append(line)
            if not isinstance(event, CompletionChunk):
                self._ended.append(on_end)

    def flush(self) -> None:
        with self._lock:
            if not self._lines:
                return
            lines = self._steps + self._lines
            self._steps, self._lines = [], []
            ended, self._ended = self._ended, []
            lines.append(b"")
            self._write(b"\n".join(lines))  # under the lock: bursts reach the pipe in order
        for end in ended:
            end()


class RunnerServer:
    """Owns the aiohttp app; ``draining`` and ``inflight`` are read by the shutdown sequence."""

    def __init__(self, engine: EngineLike, relay: PipeRelay | None = None) -> None:
        self.engine = engine
        self.relay = relay
        if relay is not None:
            engine.after_emit = relay.flush
            engine.relay_chunks = relay.chunks
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._embed_lock = asyncio.Lock()
        self._mailbox: _Mailbox | None = None
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_errors])
        app.router.add_get("/health", self.health)
        app.router.add_post("/completion", self.completion)
        app.router.add_post("/embed", self.embed)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        self.app = app

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()

    # -- helpers -----------------------------------------------------------------------------

    def _enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    @staticmethod
    def _json(obj: Any, status: int = 200) -> web.Response:
        return web.Response(body=encode(obj), status=status, content_type="application/json")

    def _error(self, status: int, message: str) -> web.Response:
        return self._json(ErrorResponse(error=message), status)

    async def _body(self, request: web.Request, typ: type) -> Any:
        try:
            return msgspec.json.decode(await request.read(), type=typ)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadRequest(str(e)) from None

    # -- routes ------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return self._json(
            Health(
                status="draining" if self.draining else "ok",
                slots_total=self.engine.parallel,
                slots_busy=self.engine.busy(),
                queued=self.engine.queued(),
                kv_used=self.engine.kv_used(),
                kv_total=self.engine.n_ctx,
            )
        )

    async def completion(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return self._error(503, "runner is shutting down")
        self._enter()
        try:
            return await self._completion(request)
        finally:
            self._leave()

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if self._mailbox is None:
            self._mailbox = _Mailbox(loop)
        mailbox = self._mailbox

        try:
            req = await self._body(request, CompletionRequest)
            relay = self.relay if req.relay and req.stream else None
            if relay is not None:
                relay_id = req.relay

                def emit(event: Any) -> None:  # decode thread: the event goes up the pipe
                    relay.put(relay_id, event, ended)

                def ended() -> None:  # after the job's last event was written
                    mailbox.put(queue, None)
            else:

                def emit(event: Any) -> None:  # decode thread
                    mailbox.put(queue, event)

            if _inline(req):
                job = self.engine.submit(req, emit)
            else:
                job = await loop.run_in_executor(None, self.engine.submit, req, emit)
        except BadRequest as e:
            return self._error(400, str(e))
        try:
            if relay is not None:
                await queue.get()
                return web.Response(body=b"{}", content_type="application/json")
            if not req.stream:
                while True:
                    event = await queue.get()
                    if isinstance(event, CompletionDone):
                        return self._json(event)
                    if isinstance(event, CompletionError):
                        return self._error(500, event.error)
            resp = web.StreamResponse(headers={"Content-Type": NDJSON})
            await resp.prepare(request)
            end = False
            while not end:
                # everything queued for this stream goes out in one write (a client that fell
                # behind gets several tokens per chunk instead of one wake-up per token)
                lines: list[bytes] = []
                while True:
                    event = await queue.get() if not lines else queue.get_nowait()
                    lines.append(encode(event))
                    end = isinstance(event, CompletionDone | CompletionError)
                    if end or queue.empty():
                        break
                lines.append(b"")
                await resp.write(b"\n".join(lines))
            await resp.write_eof()
            return resp
        finally:
            # 1. normal end: the job is finished, cancel is a no-op; 2. client gone (handler
            # cancelled or write failed): the engine frees the slot at its next step.
            job.cancel()

    async def embed(self, request: web.Request) -> web.Response:
        if self.draining:
            return self._error(503, "runner is shutting down")
        self._enter()
        try:
            req = await self._body(request, EmbedRequest)
            async with self._embed_lock:
                resp = await asyncio.get_running_loop().run_in_executor(
                    None, self.engine.embed, req.input, req.truncate
                )
            return self._json(resp)
        except BadRequest as e:
            return self._error(400, str(e))
        finally:
            self._leave()

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            req = await self._body(request, TokenizeRequest)
        except BadRequest as e:
            return self._error(400, str(e))
        tokens = self.engine.tokenize(req.content, req.add_special, req.parse_special)
        return self._json(TokenizeResponse(tokens=tokens))

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            req = await self._body(request, DetokenizeRequest)
            content = self.engine.detokenize(req.tokens)
        except BadRequest as e:
            return self._error(400, str(e))
        return self._json(DetokenizeResponse(content=content))
