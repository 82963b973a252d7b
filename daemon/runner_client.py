"""The daemon's one face of a runner process: every call to a runner and what its refusals mean.

:class:`RunnerClient` owns the runner's protocol as the daemon uses it (Ollama's ``LlamaServer``
in ``llm/server.go`` is the model): :meth:`~RunnerClient.completion` and
:meth:`~RunnerClient.complete` through the runner's request pipe (a Submit line on its stdin,
the events up its event pipe: :class:`~corral.daemon.runners.RequestPipe`), and
:meth:`~RunnerClient.tokenize`, :meth:`~RunnerClient.embed` and :meth:`~RunnerClient.health`
over its HTTP API. Nothing else in the daemon builds a runner URL or decodes a runner's answer.

Refusals and failures become domain errors (``daemon/errors.py``; the api layer gives them their
status): a runner's 400 (an HTTP status or a Refused line's) is :class:`InvalidRequest`, its 503
:class:`Busy`, any other refusal, an ``error`` event, a broken connection or a bad line
:class:`Failed`, whose text is the runner's exit reason when it died (the lease's ``failure``
hook waits briefly for it). Every completion ends exactly once: its done, its error or refusal,
the event pipe's end (the runner died) or a cancel.

:meth:`RunnerClient.cancel` (DELETE /api/requests/{id}) ends the call in progress at once and
every later one with :class:`Cancelled`: a completion gets a sentinel in its queue (and the
runner a Cancel line), an HTTP answer is closed. ``tokens`` counts the completion chunks received
(about one per token) for GET /api/requests.

The HTTP calls go through :class:`~corral.daemon.runner_http.RunnerHTTP`, the runner's pool of
keep-alive connections (one per runner, owned by the supervisor): one write and a small parser,
not an aiohttp client request (issue 18).

:class:`RunnerLease` is what a route holds while it uses a runner: the supervisor's ``Lease`` and
the API tests' fake both implement it, so nothing probes a lease for what it can do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol, TypeVar, runtime_checkable

import msgspec

from corral.daemon.errors import (
    Busy,
    Cancelled,
    CorralError,
    Failed,
    InvalidRequest,
    TooLarge,
)
from corral.daemon.runner_http import RunnerHTTP
from corral.daemon.runners import GONE, BadLine, RequestPipe
from corral.runner import protocol

Events = AsyncGenerator[tuple[protocol.CompletionChunk | protocol.CompletionDone, bool], None]
FailureHook = Callable[[], Awaitable[str | None]]

_T = TypeVar("_T")
_CANCELLED = object()  # put in a completion's queue by RunnerClient.cancel


class RunnerClient:
    """Talks to one runner for one lease: completions through ``pipe`` (the runner process's
    request pipe), the rest over ``http``; ``failure`` gives the client-facing reason a runner
    that broke off is gone (None when it is not known to be gone)."""

    __slots__ = ("http", "pipe", "_failure", "tokens", "_cancelled", "_stop")

    def __init__(
        self, http: RunnerHTTP, pipe: RequestPipe, *, failure: FailureHook | None = None
    ) -> None:
        self.http = http
        self.pipe = pipe
        self._failure = failure
        self.tokens = 0  # completion chunks received (~ tokens)
        self._cancelled: str | None = None
        self._stop: Callable[[], None] | None = None  # ends the call in progress

    def cancel(self, message: str) -> None:
        """End the call in progress and refuse later ones with ``Cancelled(message)``."""
        if self._cancelled is None:
            self._cancelled = message
            if self._stop is not None:
                self._stop()

    def _watch(self, stop: Callable[[], None]) -> None:
        """``stop`` ends the call in progress on :meth:`cancel`; a client cancelled already
        raises at once."""
        if self._cancelled is not None:
            raise Cancelled(self._cancelled)
        self._stop = stop

    @property
    def base_url(self) -> str:
        return f"http://{self.http.host}:{self.http.port}"

    async def completion(self, body: protocol.CompletionRequest) -> Events:
        """The runner's completion events, each with whether another one already arrived with
        it (a writer may then hold it back and send both in one write: fewer wake-ups per token
        for a client that fell behind). An error event, a refusal or the runner's end raises
        (module docstring); leaving early (closing the generator) cancels the runner's job."""
        pipe = self.pipe
        relay_id, queue = self._open()
        ended = False  # the runner ended the job (done, error, refusal, its own end)
        try:
            pipe.submit(relay_id, body)
            while True:
                ev = await queue.get()
                if type(ev) is protocol.CompletionChunk:
                    self.tokens += 1
                    yield ev, not queue.empty()
                    continue
                ended = _ends(ev)
                if type(ev) is protocol.CompletionDone:
                    yield ev, not queue.empty()
                    return
                raise await self._ended(ev)
        finally:
            self._stop = None
            pipe.close(relay_id, cancel=not ended)

    async def complete(self, body: protocol.CompletionRequest) -> protocol.CompletionDone:
        """A completion the runner answers whole (``body.stream`` False): its one final record,
        ``content`` the whole text. Refusals, error records and the runner's end raise as in
        :meth:`completion`. No generator (a tiny request's fixed cost)."""
        assert not body.stream
        pipe = self.pipe
        relay_id, queue = self._open()
        ev: object = None
        try:
            pipe.submit(relay_id, body)
            ev = await queue.get()
            while type(ev) is protocol.CompletionChunk:  # a whole answer has none; skipped
                ev = await queue.get()
        finally:
            self._stop = None
            pipe.close(relay_id, cancel=not _ends(ev))
        if type(ev) is protocol.CompletionDone:
            return ev
        raise await self._ended(ev)

    def _open(self) -> tuple[int, asyncio.Queue]:
        """A completion's id and queue, which :meth:`cancel` ends with a sentinel; a client
        cancelled already raises at once."""
        if self._cancelled is not None:
            raise Cancelled(self._cancelled)
        relay_id, queue = self.pipe.open()
        self._stop = lambda: queue.put_nowait(_CANCELLED)
        return relay_id, queue

    async def _ended(self, ev: object) -> CorralError:
        """The error of a completion's last event when it is not a done."""
        if ev is _CANCELLED:
            return Cancelled(self._cancelled or "request cancelled")
        if ev is GONE:
            return await self._gone(ConnectionError("stream ended without done"))
        if isinstance(ev, protocol.CompletionError):
            return Failed(ev.error)
        if isinstance(ev, protocol.Refused):
            return refused(ev.status, ev.error)
        if isinstance(ev, BadLine):
            return Failed(ev.error)
        return Failed(f"unexpected event from runner: {type(ev).__name__}")

    async def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """``text`` as the runner tokenizes it (by default as ``/completion`` would: BOS added,
        special tokens parsed). One HTTP round trip."""
        body = protocol.TokenizeRequest(
            content=text, add_special=add_special, parse_special=parse_special
        )
        return (await self._post("/tokenize", body, protocol.TokenizeResponse)).tokens

    async def embed(self, body: protocol.EmbedRequest) -> protocol.EmbedResponse:
        return await self._post("/embed", body, protocol.EmbedResponse)

    async def health(self, timeout: float) -> protocol.Health | None:
        """The runner's ``/health``; None when it does not answer well within ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                async with await self.http.request("GET", "/health") as reply:
                    data = await reply.read()
            if reply.status != 200:
                return None
            return msgspec.json.decode(data, type=protocol.Health)
        except (TimeoutError, msgspec.DecodeError, OSError):
            return None

    # ---- internals

    async def _post(self, path: str, body: msgspec.Struct, kind: type[_T]) -> _T:
        """POST ``body`` and decode the whole answer; a refusal raises its error, a broken
        connection :meth:`_gone`'s."""
        try:
            async with await self.http.request("POST", path, protocol.encode(body)) as reply:
                self._watch(reply.close)
                data = await reply.read()
        except ConnectionError as e:
            raise await self._gone(e) from None
        finally:
            self._stop = None
        if reply.status != 200:
            raise refusal(reply.status, data)
        return msgspec.json.decode(data, type=kind)

    async def _gone(self, exc: BaseException) -> CorralError:
        """A runner that broke off: its exit reason with its last stderr line when known (the
        hook waits briefly for the exit to be noticed), else the connection error;
        :class:`Cancelled` when the call was ended because the request was cancelled."""
        if self._cancelled is not None:
            return Cancelled(self._cancelled)
        reason = await self._failure() if self._failure is not None else None
        return Failed(reason or f"llama runner process has terminated: {exc}")


def _ends(ev: object) -> bool:
    """Whether the runner ended its job with ``ev`` (else the daemon cancels it there)."""
    return ev is not None and ev is not _CANCELLED and type(ev) not in _GOING_ON


_GOING_ON = (protocol.CompletionChunk, BadLine)


def refusal(status: int, body: bytes) -> CorralError:
    """A runner's non-200 HTTP answer as a domain error: :func:`refused` with the ``error`` of
    its JSON body (else the body, else the status)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = msgspec.json.decode(text)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
    except msgspec.DecodeError:
        pass
    return refused(status, text)


def refused(status: int, text: str) -> CorralError:
    """A runner's refusal (an HTTP status or a Refused line) as a domain error: 413 too large
    for the runner (:class:`TooLarge`), any other 4xx the client's (:class:`InvalidRequest`),
    503 try later (:class:`Busy`), any other status :class:`Failed`: a runner's refusal never
    surfaces as a 500."""
    text = text or f"runner answered {status}"
    if status == 413:
        return TooLarge(f"request too large for the model runner ({text})")
    if 400 <= status < 500:
        return InvalidRequest(text)
    if status == 503:
        return Busy(text)
    return Failed(text)


@runtime_checkable
class RunnerLease(Protocol):
    """A granted runner slot as a route holds it (``Supervisor.acquire``'s ``Lease``, the API
    tests' fake): leaving the ``async with`` releases it exactly once."""

    @property
    def runner_id(self) -> str: ...
    @property
    def n_ctx(self) -> int:
        """The runner's context per slot."""
        ...

    @property
    def load_duration(self) -> float:
        """Seconds from acquire() to the grant."""
        ...

    @property
    def runner(self) -> RunnerClient: ...
    def out_of_memory(self) -> None:
        """The request failed with an out-of-memory error at run time (Ollama's rule: every
        runner unloads when idle)."""
        ...

    async def __aenter__(self) -> RunnerLease: ...
    async def __aexit__(self, *exc: object) -> None: ...
