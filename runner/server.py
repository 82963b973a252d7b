"""The runner's two faces in front of an engine (real or fake): the request pipe and HTTP.

The request pipe (docs/DESIGN.md "Request pipe"; the daemon's completions): the runner's stdin
after its LaunchSpec carries ``Submit`` and ``Cancel`` lines, read on the event loop
(:class:`PipeReader`, :meth:`RunnerServer.pipe_line`); a request's events go up the event pipe,
written by the decode thread itself, one write per step for all sequences (:class:`PipeRelay`):
the step's text chunks as ONE ``RelayStep`` line (the engine hands them over in one
``relay_chunks`` call), any other event (a first token, logprobs, a done, a whole answer) as a
``Relay`` line after it; a request that is not started gets one ``Refused`` line. The event loop
wakes once per request (its line) and never per token or for the answer: no HTTP request, no
answer write from the loop, no wake-up of the loop by the decode thread.

The HTTP API (docs/DESIGN.md "Runner HTTP API": direct clients, and the daemon's embeddings,
tokenize and health): JSON bodies are the msgspec structs of ``corral.runner.protocol``.
``/completion`` streams NDJSON lines, each a tagged CompletionEvent, the last one ``done`` or
``error``. A client that disconnects cancels its job (handler cancellation is on), which frees
the slot at the engine's next step. While draining (SIGTERM), new work is refused with 503 (a
piped request with Refused 503).
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from aiohttp import web

from corral.runner.common import BadRequest, EngineLike, Job
from corral.runner.protocol import (
    MAX_REQUEST,
    Cancel,
    CompletionChunk,
    CompletionDone,
    CompletionError,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbedRequest,
    ErrorResponse,
    Health,
    Refused,
    Relay,
    RelayStep,
    Submit,
    TokenizeRequest,
    TokenizeResponse,
    decode_pipe_request,
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
    """Completion events of the request pipe's jobs, written up the event pipe (``write``):
    :meth:`chunks` (the engine's ``relay_chunks``, once per step) takes a step's text chunks as
    one RelayStep line, :meth:`put` (decode thread) any other event as a Relay line; :meth:`flush`
    (the engine's ``after_emit``) writes the burst at once, RelayStep lines first, then runs the
    end callbacks of the jobs that finished in it (their last event is in the pipe). A RelayStep
    line with nothing else queued (the usual step: text only, the engine emits its other events
    after handing the chunks over) is written at once: one encode and one write per step, no
    flush. :meth:`refuse` writes a request's Refused line (any thread)."""

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

    def refuse(self, relay_id: int, status: int, error: str) -> None:
        line = encode(Refused(id=relay_id, status=status, error=error)) + b"\n"
        with self._lock:
            self._write(line)


class PipeReader(asyncio.Protocol):
    """The runner's stdin after the LaunchSpec line, on the event loop: whole lines to
    ``on_line`` (set once the server exists: :meth:`start`; none come before Ready), EOF to
    ``on_eof`` (the daemon is gone). A line may arrive in many reads (a request with images)."""

    def __init__(self, on_eof: Callable[[], None], rest: bytes = b"") -> None:
        self.on_line: Callable[[bytes], None] | None = None
        self._on_eof = on_eof
        self._parts: list[bytes] = []  # the line in progress, as read (joined once, at its end)
        self._early: list[bytes] = []  # lines before start (by the protocol, none)
        self.data_received(rest)  # what followed the LaunchSpec line in its read

    def data_received(self, data: bytes) -> None:
        if b"\n" not in data:
            if data:
                self._parts.append(data)
            return
        lines = data.split(b"\n")
        if self._parts:  # the end of a line that came in pieces: one copy of it
            self._parts.append(lines[0])
            lines[0] = b"".join(self._parts)
        rest = lines.pop()
        self._parts = [rest] if rest else []
        for line in lines:
            self._line(line)

    def start(self, on_line: Callable[[bytes], None]) -> None:
        """Lines go to ``on_line`` from now on, starting with any that came before."""
        self.on_line = on_line
        early, self._early = self._early, []
        for line in early:
            on_line(line)

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        if self.on_line is None:
            self._early.append(line)
            return
        self.on_line(line)

    def eof_received(self) -> bool:
        self._on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # a read error: the daemon's end is as good as gone
            self._on_eof()


# what a piped job's table holds before engine.submit returned (off the loop) / once it was
# cancelled meanwhile
_SUBMITTING = object()
_CANCELLED = object()
_LINE_ID = re.compile(rb'"id"\s*:\s*(\d+)')


class RunnerServer:
    """Owns the aiohttp app and the request pipe's jobs (``relay``: their events' way up the
    event pipe); ``draining`` and ``inflight`` are read by the shutdown sequence."""

    def __init__(self, engine: EngineLike, relay: PipeRelay | None = None) -> None:
        self.engine = engine
        self.relay = relay
        if relay is not None:
            engine.after_emit = relay.flush
            engine.relay_chunks = relay.chunks
        self.draining = False
        self._http_inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # the request pipe's jobs by id, until their last event is in the pipe or the daemon
        # cancels them: written by the loop and (at a job's end) the decode thread
        self._piped: dict[int, Any] = {}
        self._piped_lock = threading.Lock()
        self._piped_waiter: asyncio.Event | None = None  # wait_idle's, while it waits
        self._loop: asyncio.AbstractEventLoop | None = None
        self._embed_lock = asyncio.Lock()
        self._mailbox: _Mailbox | None = None
        app = web.Application(client_max_size=MAX_REQUEST, middlewares=[_errors])
        app.router.add_get("/health", self.health)
        app.router.add_post("/completion", self.completion)
        app.router.add_post("/embed", self.embed)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        self.app = app

    @property
    def inflight(self) -> int:
        """Requests started and not ended: HTTP ones and the request pipe's."""
        return self._http_inflight + len(self._piped)

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()
        while self._piped:
            # the decode thread sets it when it ends the last piped job and sees a waiter
            self._piped_waiter = waiter = asyncio.Event()
            if self._piped:
                await waiter.wait()
        self._piped_waiter = None

    # -- the request pipe (on the event loop) ------------------------------------------------

    def pipe_line(self, line: bytes) -> None:
        """One line of the request pipe: a Submit or a Cancel."""
        assert self.relay is not None
        try:
            msg = decode_pipe_request(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            found = _LINE_ID.search(line)  # refuse it by its id if it has one
            log.error("bad request line", error=str(e), line=line[:200])
            if found:
                self.relay.refuse(int(found.group(1)), 400, f"bad request line: {e}")
            return
        if isinstance(msg, Cancel):
            self._cancel_piped(msg.id)
        else:
            self._submit_piped(msg)

    def _submit_piped(self, msg: Submit) -> None:
        relay = self.relay
        assert relay is not None
        relay_id, req = msg.id, msg.request
        if self.draining:
            relay.refuse(relay_id, 503, "runner is shutting down")
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        piped, lock = self._piped, self._piped_lock

        def emit(event: Any) -> None:  # decode thread: the event goes up the pipe
            relay.put(relay_id, event, ended)

        def ended() -> None:  # decode thread, after the job's last event was written
            with lock:
                piped.pop(relay_id, None)
            self._wake_idle()

        piped[relay_id] = _SUBMITTING
        if _inline(req):
            self._piped_submitted(relay_id, req, emit)
        else:
            self._loop.run_in_executor(None, self._piped_submitted, relay_id, req, emit)

    def _piped_submitted(self, relay_id: int, req: CompletionRequest, emit: Any) -> None:
        """engine.submit for a piped request (on the loop, or an executor thread for a big
        one): the job is kept for a cancel, or refused, or cancelled if a cancel came meanwhile."""
        relay = self.relay
        assert relay is not None
        try:
            job = self.engine.submit(req, emit, relay_id)
        except BadRequest as e:
            self._piped_refused(relay_id, 400, str(e))
            return
        except Exception as e:  # an engine bug: the daemon's request fails, the runner lives
            log.exception("piped request failed", id=relay_id)
            self._piped_refused(relay_id, 500, f"{type(e).__name__}: {e}")
            return
        with self._piped_lock:
            state = self._piped.get(relay_id)
            if state is _CANCELLED:
                del self._piped[relay_id]
            elif state is _SUBMITTING:  # not ended already
                self._piped[relay_id] = job
        if state is _CANCELLED:
            job.cancel()
            self._wake_idle()

    def _piped_refused(self, relay_id: int, status: int, error: str) -> None:
        with self._piped_lock:
            self._piped.pop(relay_id, None)
        assert self.relay is not None
        self.relay.refuse(relay_id, status, error)
        self._wake_idle()

    def _cancel_piped(self, relay_id: int) -> None:
        with self._piped_lock:
            job = self._piped.pop(relay_id, None)
            if job is _SUBMITTING:  # submit still running off the loop: it cancels the job
                self._piped[relay_id] = _CANCELLED
        if isinstance(job, Job):
            job.cancel()
            self._wake_idle()

    def _wake_idle(self) -> None:
        """wait_idle's waiter, once no piped job is left (any thread; read after the pop: a
        waiter set before it is seen, one set after it sees the table empty)."""
        waiter = self._piped_waiter
        if waiter is not None and not self._piped and self._loop is not None:
            self._loop.call_soon_threadsafe(waiter.set)

    # -- helpers -----------------------------------------------------------------------------

    def _enter(self) -> None:
        self._http_inflight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._http_inflight -= 1
        if self._http_inflight == 0:
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

        def emit(event: Any) -> None:  # decode thread
            mailbox.put(queue, event)

        try:
            req = await self._body(request, CompletionRequest)
            if _inline(req):
                job = self.engine.submit(req, emit)
            else:
                job = await loop.run_in_executor(None, self.engine.submit, req, emit)
        except BadRequest as e:
            return self._error(400, str(e))
        try:
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
