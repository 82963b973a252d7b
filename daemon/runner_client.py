"""The daemon's one face of a runner process: every call to a runner and what its refusals mean.

:class:`RunnerClient` owns the runner's HTTP API of docs/DESIGN.md as the daemon uses it
(Ollama's ``LlamaServer`` in ``llm/server.go`` is the model): :meth:`~RunnerClient.completion`
(relay mode through the runner's event pipe, or the NDJSON lines of the HTTP response),
:meth:`~RunnerClient.tokenize`, :meth:`~RunnerClient.embed` and :meth:`~RunnerClient.health`.
Nothing else in the daemon builds a runner URL or decodes a runner's answer.

Refusals and failures become domain errors (``daemon/errors.py``; the api layer gives them their
status): a runner's 400 is :class:`InvalidRequest`, its 503 :class:`Busy`, any other refusal, an
``error`` event, a broken connection or a bad line :class:`Failed`, whose text is the runner's
exit reason when it died (the lease's ``failure`` hook waits briefly for it).

:meth:`RunnerClient.cancel` (DELETE /api/requests/{id}) ends the call in progress at once and
every later one with :class:`Cancelled`: a relayed stream gets a sentinel in its queue, an HTTP
answer is closed; either way the runner's job is closed and cancelled there. ``tokens`` counts
the completion chunks received (about one per token) for GET /api/requests.

The calls go through :class:`~corral.daemon.runner_http.RunnerHTTP`, the runner's pool of
keep-alive connections (one per runner, owned by the supervisor): a request's fixed cost is one
write and a small parser, not an aiohttp client request (issue 18).

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
from corral.daemon.runners import GONE, RunnerProcess
from corral.runner import protocol

Events = AsyncGenerator[tuple[protocol.CompletionChunk | protocol.CompletionDone, bool], None]
FailureHook = Callable[[], Awaitable[str | None]]

RELAY_END_GRACE = 5.0  # s: a relay job's HTTP handle ended; its events are in the pipe already
_T = TypeVar("_T")


class RunnerClient:
    """Talks to one runner for one lease. ``process`` (the daemon's own child) enables relay
    mode for streaming completions; ``failure`` gives the client-facing reason a runner that
    broke a connection is gone (None when it is not known to be gone)."""

    __slots__ = ("http", "process", "_failure", "tokens", "_cancelled", "_stop")

    def __init__(
        self,
        http: RunnerHTTP,
        *,
        process: RunnerProcess | None = None,
        failure: FailureHook | None = None,
    ) -> None:
        self.http = http
        self.process = process
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

    def completion(self, body: protocol.CompletionRequest) -> Events:
        """The runner's completion events, each with whether another one already arrived with
        it (a writer may then hold it back and send both in one write: fewer wake-ups per token
        for a client that fell behind). An error event or a broken connection raises
        :class:`Failed`, a refusal the error of its status (module docstring).

        A streaming request to a runner process of ours goes in relay mode (the events come up
        its event pipe); otherwise they are the NDJSON lines of the HTTP response. The generator
        is returned as it is: no extra frame per token, and closing it closes the relay at once."""
        if self.process is not None and body.stream:
            return self._relayed(self.process, body)
        return self._http_lines(body)

    async def complete(self, body: protocol.CompletionRequest) -> protocol.CompletionDone:
        """A completion the runner answers whole (``body.stream`` False): its one final record,
        ``content`` the whole text. Refusals, error records and broken connections raise as
        in :meth:`completion`. One round trip, no generator (a tiny request's fixed cost)."""
        assert not body.stream
        data = await self._round_trip("/completion", body)
        if not data.strip():
            raise await self._gone(ConnectionError("stream ended without done"))
        ev = _event(data.strip())
        if not isinstance(ev, protocol.CompletionDone):
            raise Failed("runner answered a whole completion with a chunk")
        return ev

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
        return msgspec.json.decode(await self._round_trip(path, body), type=kind)

    async def _round_trip(self, path: str, body: msgspec.Struct) -> bytes:
        """POST ``body`` and read the whole answer; a refusal raises its error, a broken
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
        return data

    async def _gone(self, exc: BaseException) -> CorralError:
        """A runner that broke the connection: its exit reason with its last stderr line when
        known (the hook waits briefly for the exit to be noticed), else the connection error;
        :class:`Cancelled` when the connection was closed because the request was cancelled."""
        if self._cancelled is not None:
            return Cancelled(self._cancelled)
        reason = await self._failure() if self._failure is not None else None
        return Failed(reason or f"llama runner process has terminated: {exc}")

    async def _http_lines(self, body: protocol.CompletionRequest) -> Events:
        """The events as NDJSON lines of the ``/completion`` HTTP response."""
        try:
            async with await self.http.request(
                "POST", "/completion", protocol.encode(body)
            ) as reply:
                if reply.status != 200:
                    raise refusal(reply.status, await reply.read())
                self._watch(reply.close)
                rest = b""
                eof = False
                while not eof:
                    data = await reply.readany()  # whatever has arrived; b"" at the end
                    eof = not data
                    # whole lines only; at the end also the last one (a non-streamed answer has
                    # no \n)
                    *lines, rest = (rest + data + b"\n" * eof).split(b"\n")
                    lines = [line for line in lines if line.strip()]
                    for i, line in enumerate(lines):
                        ev = _event(line)
                        if isinstance(ev, protocol.CompletionDone):
                            yield ev, i < len(lines) - 1
                            return
                        self.tokens += 1
                        yield ev, i < len(lines) - 1
        except ConnectionError as e:
            raise await self._gone(e) from None
        finally:
            self._stop = None
        raise await self._gone(ConnectionError("stream ended without done"))

    async def _relayed(self, relay: RunnerProcess, body: protocol.CompletionRequest) -> Events:
        """Relay mode: the events arrive in the queue :meth:`RunnerProcess.open_relay` gives;
        the HTTP request is the job's handle (a refusal's status and error, its end, and closing
        it cancels the job). Its end is put in the same queue, so one ``get`` per event waits
        for both."""
        if self._cancelled is not None:
            raise Cancelled(self._cancelled)
        relay_id, queue = relay.open_relay()
        handle_end = object()
        cancelled = object()
        self._stop = lambda: queue.put_nowait(cancelled)

        async def handle() -> CorralError | None:
            try:
                async with await self.http.request(
                    "POST",
                    "/completion",
                    protocol.encode(msgspec.structs.replace(body, relay=relay_id)),
                ) as reply:
                    data = await reply.read()
                return refusal(reply.status, data) if reply.status != 200 else None
            finally:
                queue.put_nowait(handle_end)

        task = asyncio.ensure_future(handle())
        deadline: float | None = None
        try:
            while True:
                if deadline is None:
                    ev = await queue.get()
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            ev = await queue.get()
                    except TimeoutError:
                        ev = GONE
                if ev is handle_end:
                    try:
                        refused = task.result()
                    except ConnectionError as e:
                        raise await self._gone(e) from None
                    if refused is not None:
                        raise refused
                    deadline = asyncio.get_running_loop().time() + RELAY_END_GRACE
                    continue
                if ev is cancelled:
                    raise Cancelled(self._cancelled or "request cancelled")
                if ev is GONE:
                    raise await self._gone(ConnectionError("stream ended without done"))
                if isinstance(ev, protocol.CompletionError):
                    raise Failed(ev.error)
                if isinstance(ev, protocol.CompletionDone):
                    # the handle ends by itself in a moment, keeping its connection for reuse
                    _ending.add(task)
                    task.add_done_callback(_ended)
                    yield ev, not queue.empty()
                    return
                self.tokens += 1
                yield ev, not queue.empty()
        finally:
            self._stop = None
            relay.close_relay(relay_id)
            if task not in _ending:
                task.cancel()  # closes the request: the runner cancels the job


def _event(line: bytes) -> protocol.CompletionChunk | protocol.CompletionDone:
    """One NDJSON line of a ``/completion`` answer; an error record or a line that is not one
    raises :class:`Failed`."""
    try:
        ev = protocol.decode_completion_event(line)
    except msgspec.DecodeError as e:
        raise Failed(f"bad line from runner: {e}") from None
    if isinstance(ev, protocol.CompletionError):
        raise Failed(ev.error)
    return ev


def refusal(status: int, body: bytes) -> CorralError:
    """A runner's non-200 answer as a domain error: the ``error`` of its JSON body (else the
    body, else the status); 413 too large for the runner (:class:`TooLarge`), any other 4xx
    the client's (:class:`InvalidRequest`), 503 try later (:class:`Busy`), any other status
    :class:`Failed`: a runner's refusal never surfaces as a 500."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = msgspec.json.decode(text)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
    except msgspec.DecodeError:
        pass
    text = text or f"runner answered {status}"
    if status == 413:
        return TooLarge(f"request too large for the model runner ({text})")
    if 400 <= status < 500:
        return InvalidRequest(text)
    if status == 503:
        return Busy(text)
    return Failed(text)


_ending: set[asyncio.Future[CorralError | None]] = set()  # relay handles left to end after done


def _ended(task: asyncio.Future[CorralError | None]) -> None:
    _ending.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a late connection error is of no interest any more


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
