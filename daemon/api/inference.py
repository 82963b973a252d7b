"""The inference core shared by every route that generates or embeds (native /api/*, OpenAI
/v1/*, Anthropic /v1/messages, /v1/responses): the model a request names and what comes back.

* :func:`resolve` the model (404) and :func:`require` its capabilities (400);
* :class:`Generation`: one acquired completion, whose :meth:`Generation.events` turns the runner's
  events (``lease.runner.completion``, :mod:`corral.daemon.runner_client`) into :class:`Delta`
  items (thinking split off by :class:`~corral.daemon.prompt.thinking.ThinkingSplitter`, tool
  calls parsed by ``toolcalls``) and one final :class:`Done`;
* :func:`embedding`: embeddings through a lease.

How a request becomes a Generation (checks, prompt rendering, history truncation, the slot) is
:mod:`corral.daemon.api.prepare`; how bytes travel to and from a runner is the runner client's.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import stat
import string
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from corral.daemon import gguf_info
from corral.daemon.api import auth
from corral.daemon.api.errors import ApiError
from corral.daemon.api.keys import METRICS, STORE, SUPERVISOR
from corral.daemon.errors import CorralError, Failed, NotFound
from corral.daemon.metrics import ModelSeries
from corral.daemon.models.store import ModelRecord
from corral.daemon.params import RequestOptions
from corral.daemon.prompt import templates, toolcalls
from corral.daemon.prompt.thinking import ThinkingSplitter
from corral.daemon.runner_client import RunnerLease
from corral.runner import protocol
from corral.scheduler.estimate import is_out_of_memory

log = structlog.get_logger(__name__)


# ---- models and capabilities ---------------------------------------------------------------------


@dataclass(slots=True)
class Model:
    record: ModelRecord
    info: gguf_info.GGUFInfo | None
    capabilities: list[str]

    def renderer(self, override: str | None = None) -> templates.Renderer:
        """The Go TEMPLATE (or ``override``), else the GGUF's Jinja template with the model's
        real ``bos_token``/``eos_token``, else ``{{ .Prompt }}``."""
        info = self.info
        if info is None:
            return templates.for_model(override or self.record.template)
        return templates.for_model(
            override or self.record.template,
            info.chat_template,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
        )


# id(record) -> (record, its GGUF's stat key or None, info, capabilities): the facts of the
# records the store handed out lately (it hands out the same object while the manifest is
# unchanged), so a request reads them with one stat of the GGUF instead of parsing anything.
_facts: dict[int, tuple[ModelRecord, tuple | None, gguf_info.GGUFInfo | None, list[str]]] = {}
_FACTS_KEPT = 256


def _blob_key(path: Path | None) -> tuple | None:
    """The GGUF's identity and version (device, inode, size, mtime), None when it is not a
    regular file. One stat."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


async def model_facts(record: ModelRecord) -> tuple[gguf_info.GGUFInfo | None, list[str]]:
    """The model's GGUF facts (None for a missing or non-GGUF layer) and its capabilities, as
    inference, /api/show and /api/tags all read them."""
    key = _blob_key(record.model_path)
    hit = _facts.get(id(record))
    if hit is not None and hit[0] is record and hit[1] == key:
        return hit[2], hit[3]
    info = None
    if key is not None and record.model_path is not None:
        try:
            info = await gguf_info.read_info_async(record.model_path)
        except Exception as e:  # a non-GGUF layer has no metadata
            log.warning("api.gguf_unreadable", model=record.name, error=str(e))
    caps = templates.capabilities(
        info,
        template=record.template,
        has_projector=bool(record.projectors),
        declared=record.config.capabilities,
    )
    if len(_facts) >= _FACTS_KEPT:
        _facts.clear()
    _facts[id(record)] = (record, key, info, caps)
    return info, caps


async def resolve(app: web.Application, name: str, *, style: str) -> Model:
    """The model ``name`` with its GGUF facts. ``style`` picks Ollama's not-found text:
    ``"quoted"`` -> ``model 'x' not found`` (generate/chat), else the store's
    ``model "x" not found, try pulling it first`` (embed, scheduler)."""
    try:
        record = app[STORE].resolve(name)
    except NotFound:
        if style == "quoted":
            raise ApiError(404, f"model '{name}' not found") from None
        raise
    return Model(record, *await model_facts(record))


def require(model: Model, caps: Sequence[str]) -> None:
    """400 naming each capability of ``caps`` the model lacks (one line each, Ollama's text)."""
    missing = [c for c in caps if c not in model.capabilities]
    if missing:
        raise ApiError(
            400, "\n".join(f"{model.record.full_name} does not support {c}" for c in missing)
        )


# ---- output processing ---------------------------------------------------------------------------


_ID_CHARS = string.ascii_lowercase + string.digits


def tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(8))


@dataclass(slots=True)
class Delta:
    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    more: bool = False  # another event follows at once: its frame may go out with the next one
    logprobs: list[protocol.TokenLogprob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.thinking or self.tool_calls or self.logprobs)


@dataclass(slots=True)
class Done:
    done_reason: str
    prompt_eval_count: int  # the whole prompt, as Ollama counts it
    prompt_eval_cached_count: int  # of which the runner's prompt cache held (not evaluated)
    prompt_eval_duration: int  # evaluating the rest
    eval_count: int
    eval_duration: int
    total_duration: int
    load_duration: int
    tokens: list[int]


@dataclass
class Generation:
    """One acquired completion: the runner's events turned into what a route writes (thinking
    split off, tool calls parsed, metrics observed). ``body`` is None for a load-only request."""

    model: Model
    lease: RunnerLease
    started: float
    load_duration: int
    body: protocol.CompletionRequest | None
    thinking: ThinkingSplitter | None = None
    tools: toolcalls.ToolCallParser | None = None
    series: ModelSeries | None = None  # the model's metrics: TTFT, inter-token, tokens
    meter: auth.Meter | None = None  # the request's API key: charged the generated tokens
    _open: AsyncGenerator[Delta | Done, None] | None = field(default=None, init=False, repr=False)

    def _process(self, text: str) -> Delta:
        d = Delta()
        if self.thinking is not None:
            d.thinking, text = self.thinking.add(text)
        if self.tools is not None and text:
            calls, text = self.tools.add(text)
            if calls:
                d.tool_calls = [{"id": tool_call_id(), **c} for c in calls]
        d.content = text
        return d

    def _flush(self) -> Delta:
        d = Delta()
        if self.thinking is not None:
            d.thinking, text = self.thinking.flush()
            if text:
                d2 = self._process(text)
                d.content, d.tool_calls = d2.content, d2.tool_calls
        if self.tools is not None:
            d.content += self.tools.flush()
        return d

    def _sent(self, last: float) -> float:
        """Metrics for a piece about to reach the client: TTFT (first), else inter-token."""
        now = time.monotonic()
        if self.series is not None:
            if last:
                self.series.itl.observe(now - last)
            else:
                self.series.ttft.observe(now - self.started)
        return now

    def events(self) -> AsyncGenerator[Delta | Done, None]:
        """:meth:`_events`, closed by :func:`~corral.daemon.api.prepare.completion_job` when the
        job's context ends: a writer that stops at Done leaves no generator for the event loop's
        finalizer (a self-pipe write and a task per request)."""
        self._open = self._events()
        return self._open

    async def close(self) -> None:
        """Close the generator :meth:`events` gave, if any (its runner stream ends with it)."""
        if self._open is not None:
            await self._open.aclose()

    async def _events(self) -> AsyncGenerator[Delta | Done, None]:
        """The deltas of the output (thinking split off, tool calls parsed, each token's
        logprobs with the delta of the runner chunk that reported it), then one Done.

        ``Delta.more`` tells a writer it may hold the delta's frame for the next one. A delta is
        therefore yielded only once it is known whether another one follows at once: while
        runner events are already queued it is kept here, and goes out with ``more`` False as
        soon as the queue is empty, also when the queued events produced nothing (text the
        tool-call parser or the thinking splitter holds back) - a writer never waits on a frame
        for output that is not coming."""
        assert self.body is not None
        last = 0.0
        held: Delta | None = None
        generated = 0  # chunks until the final record counts (a stream cut short is charged)
        try:
            async with contextlib.aclosing(self.lease.runner.completion(self.body)) as lines:
                async for ev, more in lines:
                    text = ev.content  # a chunk's text, or the whole text if not streamed
                    d = self._process(text) if text else Delta()
                    if ev.logprobs:
                        d.logprobs = ev.logprobs
                    if d:
                        if d.content or d.thinking or d.tool_calls:
                            last = self._sent(last)
                        if held is not None:
                            held.more = True
                            yield held
                        held = d
                    if not isinstance(ev, protocol.CompletionDone):
                        generated += 1
                        if not more and held is not None:
                            held.more, d, held = False, held, None
                            yield d
                        continue
                    if held is not None:
                        held.more, d, held = True, held, None
                        yield d
                    d = self._flush()
                    if d:
                        last = self._sent(last)
                        d.more = True
                        yield d
                    generated = 0  # the final count replaces the chunks'
                    yield self._done(ev)
        except CorralError as e:
            self._failed(e)
            if held is not None:  # what came before the error still reaches the client
                held.more, d, held = False, held, None
                yield d
            raise
        finally:
            if self.meter is not None and generated:  # cut short: charge what was sent
                self.meter(generated)

    def _done(self, ev: protocol.CompletionDone) -> Done:
        """The final record: the key charged, the model's metrics, the durations."""
        if self.meter is not None:
            self.meter(ev.eval_count)
        if self.series is not None:
            evaluated = ev.prompt_eval_count - ev.prompt_eval_cached_count
            self.series.prompt_tokens.inc(evaluated)
            self.series.generated_tokens.inc(ev.eval_count)
            self.series.duration.observe(time.monotonic() - self.started)
        return Done(
            done_reason=ev.done_reason,
            prompt_eval_count=ev.prompt_eval_count,
            prompt_eval_cached_count=ev.prompt_eval_cached_count,
            prompt_eval_duration=ev.prompt_eval_duration,
            eval_count=ev.eval_count,
            eval_duration=ev.eval_duration,
            total_duration=int((time.monotonic() - self.started) * 1e9),
            load_duration=self.load_duration,
            tokens=ev.tokens,
        )

    def _failed(self, e: CorralError) -> None:
        if isinstance(e, Failed) and is_out_of_memory(e.message):
            self.lease.out_of_memory()  # at run time: every runner unloads when idle

    async def result(self) -> tuple[Delta, Done]:
        """A non-streamed answer: the whole output as one Delta (content and thinking joined,
        every tool call and logprob) and the Done.

        A request the runner answers whole (not streamed) takes one round trip
        (:meth:`RunnerClient.complete`), its text processed as :meth:`events` would (the
        same Delta and Done), without the two generators of a stream: a tiny request's fixed
        cost (issue 18)."""
        assert self.body is not None
        if not self.body.stream:
            return await self._answered_whole(self.body)
        content: list[str] = []
        thinking: list[str] = []
        whole = Delta()
        async for ev in self.events():
            if isinstance(ev, Done):
                whole.content, whole.thinking = "".join(content), "".join(thinking)
                return whole, ev
            content.append(ev.content)
            thinking.append(ev.thinking)
            whole.tool_calls += ev.tool_calls
            whole.logprobs += ev.logprobs
        raise ApiError(500, "runner ended without a final record")

    async def _answered_whole(self, body: protocol.CompletionRequest) -> tuple[Delta, Done]:
        """:meth:`result` of a request the runner answers whole: its text processed as
        :meth:`_events` processes a final record's (the same Delta, metrics and Done)."""
        try:
            final = await self.lease.runner.complete(body)
        except CorralError as e:
            self._failed(e)
            raise
        whole = self._process(final.content) if final.content else Delta()
        last = self._sent(0.0) if whole else 0.0
        rest = self._flush()
        if rest:
            self._sent(last)
            whole.content += rest.content
            whole.thinking += rest.thinking
            whole.tool_calls += rest.tool_calls
        if final.logprobs:
            whole.logprobs = list(final.logprobs)
        return whole, self._done(final)


# ---- embeddings ----------------------------------------------------------------------------------


def shorten(vec: list[float], dimensions: int | None) -> list[float]:
    """An embedding cut to ``dimensions`` and L2-normalised again (unset/too large: as is)."""
    if not dimensions or dimensions <= 0 or dimensions >= len(vec):
        return vec
    cut = vec[:dimensions]
    norm = math.sqrt(sum(v * v for v in cut)) or 1.0
    return [v / norm for v in cut]


@contextlib.asynccontextmanager
async def embedding(
    app: web.Application,
    model: Model,
    inputs: list[str],
    *,
    options: dict[str, Any] | None,
    keep_alive: float | None,
    truncate: bool | None,
) -> AsyncIterator[tuple[protocol.EmbedResponse, int]]:
    """Embeddings for ``inputs`` (loads the model even when empty) -> (response, load ns),
    given while the slot is still held: a route sends its answer inside (``send_json``) and
    the slot is released after it, off the client's path."""
    started = time.monotonic()
    merged = RequestOptions.build(model.record.parameters, options)
    lease = await app[SUPERVISOR].acquire(model.record, merged, keep_alive, kind="embedding")
    async with lease:
        load = int((time.monotonic() - started) * 1e9)
        if not inputs:
            yield protocol.EmbedResponse(embeddings=[], prompt_eval_count=0), load
            return
        body = protocol.EmbedRequest(input=inputs, truncate=truncate is not False)
        resp = await lease.runner.embed(body)
        app[METRICS].model(model.record.name).prompt_tokens.inc(resp.prompt_eval_count)
        yield resp, load
