"""The inference core shared by every route that generates or embeds (native /api/*, OpenAI
/v1/*, Anthropic /v1/messages, /v1/responses).

resolve the model (404) -> capability checks -> render the prompt (template errors) ->
``Supervisor.acquire`` (503 queue full, 499 cancelled, 500 load failure) -> the runner's NDJSON
``/completion`` lines as :class:`Delta` items and one final :class:`Done`.

:func:`completion_job` is an async context manager holding the lease, whose :meth:`Job.events`
yields those; the lease is released exactly once when the context exits (also when the client
went away). Thinking is split from content (:class:`ThinkingSplitter`), tool calls are parsed
(``toolcalls``), chat history is cut to the runner's context (:class:`ChatHistory`).

Length: over 900 lines since the tree was formatted with ruff; it does four jobs (transport,
output processing, history truncation, request assembly) and is being split by job (issue 24).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import secrets
import stat
import string
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web

from corral.daemon import gguf_info, model_inputs
from corral.daemon.api import auth
from corral.daemon.api import options as opts
from corral.daemon.api.errors import ApiError
from corral.daemon.api.keys import METRICS, STORE, SUPERVISOR
from corral.daemon.errors import NotFound
from corral.daemon.metrics import ModelSeries
from corral.daemon.models.store import ModelRecord
from corral.daemon.params import RequestOptions
from corral.daemon.prompt import templates, toolcalls
from corral.daemon.runners import GONE, RunnerProcess, looks_oom
from corral.daemon.timefmt import now_utc
from corral.runner import protocol

log = structlog.get_logger(__name__)


_enc = msgspec.json.Encoder()


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
    if key is not None:
        try:
            info = await gguf_info.read_info_async(record.model_path)
        except Exception as e:  # noqa: BLE001 - a non-GGUF layer has no metadata
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


# ---- runner I/O --------------------------------------------------------------------------------------


async def _refusal(resp: aiohttp.ClientResponse) -> ApiError:
    """A runner's non-200 answer as the client's error: the ``error`` of its JSON body (else the
    body, else the status), with 400 and 503 kept and any other status a 500."""
    text = (await resp.text()).strip()
    try:
        data = msgspec.json.decode(text)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
    except msgspec.DecodeError:
        pass
    return ApiError(
        resp.status if resp.status in (400, 503) else 500, text or f"runner answered {resp.status}"
    )


async def _gone_message(lease: Any, exc: BaseException) -> str:
    """The text for a runner that broke the connection: the runner's exit reason with its last
    stderr line when the lease knows it (waiting briefly for the exit to be noticed), else the
    connection error."""
    wait = getattr(lease, "wait_failure", None)
    if callable(wait):
        reason = await wait()
        if reason:
            return str(reason)
    hook = getattr(lease, "failure", None)
    value = hook() if callable(hook) else None
    if value:
        return str(value)
    return f"llama runner process has terminated: {exc}"


Events = AsyncGenerator[tuple[protocol.CompletionChunk | protocol.CompletionDone, bool], None]


def runner_lines(lease: Any, body: protocol.CompletionRequest) -> Events:
    """The runner's completion events, each with whether another one already arrived with it (a
    writer may then hold it back and send both in one write: fewer wake-ups per token for a
    client that fell behind). An error line or a broken connection raises ApiError.

    A streaming request to a runner process of ours goes in relay mode (the events come up its
    event pipe, :func:`_relayed`); otherwise they are the NDJSON lines of the HTTP response
    (:func:`_http_lines`). The generator is returned as it is, not re-yielded: no extra frame per
    token, and closing it closes the relay at once."""
    relay = getattr(lease, "relay", None)
    if relay is not None and body.stream:
        return _relayed(lease, relay, body)
    return _http_lines(lease, body)


async def _http_lines(lease: Any, body: protocol.CompletionRequest) -> Events:
    """The events as NDJSON lines of the ``/completion`` HTTP response."""
    url = f"{lease.base_url}/completion"
    try:
        async with lease.session.post(
            url, data=protocol.encode(body), headers={"Content-Type": "application/json"}
        ) as resp:
            if resp.status != 200:
                raise await _refusal(resp)
            rest = b""
            eof = False
            while not eof:
                data = await resp.content.readany()  # whatever has arrived; b"" at the end
                eof = not data
                # whole lines only; at the end also the last one (a non-streamed answer has no \n)
                *lines, rest = (rest + data + b"\n" * eof).split(b"\n")
                lines = [line for line in lines if line.strip()]
                for i, line in enumerate(lines):
                    ev = protocol.decode_completion_event(line)
                    if isinstance(ev, protocol.CompletionError):
                        raise ApiError(500, ev.error)
                    yield ev, i < len(lines) - 1
                    if isinstance(ev, protocol.CompletionDone):
                        return
    except (aiohttp.ClientError, ConnectionError) as e:
        raise ApiError(500, await _gone_message(lease, e)) from None
    except msgspec.DecodeError as e:
        raise ApiError(500, f"bad line from runner: {e}") from None
    raise ApiError(500, await _gone_message(lease, ConnectionError("stream ended without done")))


RELAY_END_GRACE = 5.0  # s: a relay job's HTTP handle ended; its events are in the pipe already


async def _relayed(
    lease: Any,
    relay: RunnerProcess,
    body: protocol.CompletionRequest,
) -> Events:
    """Relay mode: the events arrive in the queue :meth:`RunnerProcess.open_relay` gives; the
    HTTP request is the job's handle (a refusal's status and error, its end, and closing it
    cancels the job). Its end is put in the same queue, so one ``get`` per event waits for both."""
    relay_id, queue = relay.open_relay()
    handle_end = object()

    async def handle() -> ApiError | None:
        try:
            async with lease.session.post(
                f"{lease.base_url}/completion",
                data=protocol.encode(msgspec.structs.replace(body, relay=relay_id)),
                headers={"Content-Type": "application/json"},
            ) as resp:
                if resp.status != 200:
                    return await _refusal(resp)
                await resp.read()
                return None
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
                except (aiohttp.ClientError, ConnectionError) as e:
                    raise ApiError(500, await _gone_message(lease, e)) from None
                if refused is not None:
                    raise refused
                deadline = asyncio.get_running_loop().time() + RELAY_END_GRACE
                continue
            if ev is GONE:
                raise ApiError(
                    500, await _gone_message(lease, ConnectionError("stream ended without done"))
                )
            if isinstance(ev, protocol.CompletionError):
                raise ApiError(500, ev.error)
            if isinstance(ev, protocol.CompletionDone):
                # the handle ends by itself in a moment, keeping its connection for reuse
                _ending.add(task)
                task.add_done_callback(_ended)
                yield ev, not queue.empty()
                return
            yield ev, not queue.empty()
    finally:
        relay.close_relay(relay_id)
        if task not in _ending:
            task.cancel()  # closes the request: the runner cancels the job


_ending: set[asyncio.Future] = set()  # relay handles left to end after their done event


def _ended(task: asyncio.Future) -> None:
    _ending.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a late connection error is of no interest any more


async def runner_json(lease: Any, path: str, body: msgspec.Struct, kind: type[Any]) -> Any:
    try:
        async with lease.session.post(
            f"{lease.base_url}{path}",
            data=protocol.encode(body),
            headers={"Content-Type": "application/json"},
        ) as resp:
            if resp.status != 200:
                raise await _refusal(resp)
            return msgspec.json.decode(await resp.read(), type=kind)
    except (aiohttp.ClientError, ConnectionError) as e:
        raise ApiError(500, await _gone_message(lease, e)) from None


# ---- output processing ---------------------------------------------------------------------------


class ThinkingSplitter:
    """Splits model output into thinking and content at the template's thinking tags (Ollama's
    ``thinking.Parser`` states). Streaming-safe: text that may be the start of a tag split
    across chunks is held back until it is decided, and the whitespace after either tag is
    dropped also when it arrives in later chunks.

    States: ``looking`` (output so far is blank or a prefix of the opening tag), ``opened``
    (opening tag seen, only whitespace since), ``thinking``, ``closed`` (closing tag seen, only
    whitespace since), ``done`` (everything from here is content). When the prompt itself ends
    with the opening tag (most thinking templates), :meth:`add` is fed that tag first, so the
    model's output starts in ``opened``."""

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>") -> None:
        self.open, self.close = open_tag, close_tag
        self.state = "looking"
        self.buf = ""

    @property
    def thinking_over(self) -> bool:
        return self.state in ("closed", "done")

    def add(self, s: str) -> tuple[str, str]:
        """-> (thinking, content) released by this chunk."""
        self.buf += s
        thinking: list[str] = []
        content: list[str] = []
        while True:
            if self.state == "looking":
                t = self.buf.lstrip()
                if t.startswith(self.open):
                    self.buf = t[len(self.open) :]
                    self.state = "opened"
                    continue
                if self.open.startswith(t):  # blank, or maybe the tag: wait for more
                    break
                content.append(self.buf)
                self.buf, self.state = "", "done"
            elif self.state == "opened":
                t = self.buf.lstrip()
                self.buf = t
                if not t:
                    break
                self.state = "thinking"
                continue
            elif self.state == "thinking":
                i = self.buf.find(self.close)
                if i >= 0:
                    thinking.append(self.buf[:i])
                    rest = self.buf[i + len(self.close) :].lstrip()
                    self.buf = ""
                    self.state = "done" if rest else "closed"
                    content.append(rest)
                    break
                keep = next(
                    (
                        k
                        for k in range(min(len(self.close) - 1, len(self.buf)), 0, -1)
                        if self.buf.endswith(self.close[:k])
                    ),
                    0,
                )
                thinking.append(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
            elif self.state == "closed":
                t, self.buf = self.buf.lstrip(), ""
                if t:
                    content.append(t)
                    self.state = "done"
            else:
                content.append(self.buf)
                self.buf = ""
            break
        return "".join(thinking), "".join(content)

    def flush(self) -> tuple[str, str]:
        """What is held back at the end of the output: a partial closing tag is thinking, a
        partial opening tag is content, whitespace after a tag is dropped."""
        buf, self.buf = self.buf, ""
        if self.state == "thinking":
            return buf, ""
        if self.state == "looking":
            return "", buf
        return "", ""


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
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int
    total_duration: int
    load_duration: int
    tokens: list[int]


@dataclass
class Job:
    """One acquired completion. ``body`` is None for a load-only request."""

    model: Model
    lease: Any
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
        """:meth:`_events`, closed by :func:`completion_job` when the job's context ends: a
        writer that stops at Done leaves no generator for the event loop's finalizer (a
        self-pipe write and a task per request)."""
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
            async with contextlib.aclosing(runner_lines(self.lease, self.body)) as lines:
                async for ev, more in lines:
                    final = isinstance(ev, protocol.CompletionDone)
                    text = (
                        ev.content
                    )  # a chunk's text, or the whole text if the runner didn't stream
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
                    if not final:
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
                    if self.meter is not None:
                        self.meter(ev.eval_count)
                    if self.series is not None:
                        self.series.prompt_tokens.inc(ev.prompt_eval_count)
                        self.series.generated_tokens.inc(ev.eval_count)
                        self.series.duration.observe(time.monotonic() - self.started)
                    yield Done(
                        done_reason=ev.done_reason,
                        prompt_eval_count=ev.prompt_eval_count,
                        prompt_eval_duration=ev.prompt_eval_duration,
                        eval_count=ev.eval_count,
                        eval_duration=ev.eval_duration,
                        total_duration=int((time.monotonic() - self.started) * 1e9),
                        load_duration=self.load_duration,
                        tokens=ev.tokens,
                    )
        except ApiError as e:
            report = getattr(self.lease, "out_of_memory", None)
            if e.status == 500 and report is not None and looks_oom(e.message):
                report()  # a runner out of memory at run time: every runner unloads when idle
            if held is not None:  # what came before the error still reaches the client
                held.more, d, held = False, held, None
                yield d
            raise
        finally:
            if self.meter is not None and generated:  # cut short: charge what was sent
                self.meter(generated)

    async def result(self) -> tuple[Delta, Done]:
        """A non-streamed answer: the whole output as one Delta (content and thinking joined,
        every tool call and logprob) and the Done."""
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


# ---- chat history truncation -----------------------------------------------------------------------
# Tokens a tokenizer adds beyond what the text itself yields: BOS and EOS (add_special) and
# SentencePiece's dummy-prefix space (a one-byte "▁" that can be a token of its own), rounded up.

_ADDED_TOKENS = 4


def token_bound(text: str) -> int:
    """An upper bound on the tokens llama.cpp makes of ``text`` (with BOS), no tokenizer needed.

    Every token the tokenizer cuts from the text covers at least one byte of it: BPE and WPM
    pieces are merges of whole bytes, a parsed special token covers its own text, and
    SentencePiece's byte fallback (the tiny test model, llama 2, gemma) is the worst case, one
    token per byte. SentencePiece first escapes each space to "▁" (3 bytes) and falls back on the
    escaped bytes, so a vocabulary without a "▁" piece spends up to 3 tokens per space: hence 2
    extra per space. Tokens that cover no text are the ``_ADDED_TOKENS``. Not covered: UGM (T5)
    vocabularies, whose charsmap normalization can expand text (NFKC); no chat model uses one,
    and a wrong guess only means the runner truncates (num_keep + tail) instead of us."""
    return len(text.encode("utf-8", "surrogatepass")) + 2 * text.count(" ") + _ADDED_TOKENS


async def count_tokens(lease: Any, text: str) -> int:
    """The runner's token count for ``text`` as ``/completion`` would tokenize it (BOS added,
    special tokens parsed). One HTTP round trip."""
    body = protocol.TokenizeRequest(content=text, add_special=True, parse_special=True)
    res = await runner_json(lease, "/tokenize", body, protocol.TokenizeResponse)
    return len(res.tokens)


IMAGE_TAG = re.compile(r"\[img-(\d+)\]")  # the runner's image marker (runner/images.py)


async def image_tokens_of(model: Model) -> int:
    """The context positions one image takes with ``model``'s projector
    (:func:`model_inputs.image_tokens`); Ollama's 768 when the projector cannot be read (the
    runner then fails to load it anyway). 0 without a projector."""
    if not model.record.projectors:
        return 0
    try:
        info = await gguf_info.read_info_async(model.record.projectors[0])
    except Exception as e:  # noqa: BLE001 - an unreadable projector fails later, in the runner
        log.warning("api.projector_unreadable", model=model.record.name, error=str(e))
        return model_inputs.OLLAMA_IMAGE_TOKENS
    return model_inputs.image_tokens(info)


@dataclass(slots=True)
class ChatHistory:
    """A rendered chat that can be re-rendered without its oldest messages (Ollama's
    ``server/prompt.go chatPrompt``): :meth:`fit` is called once the runner, hence its context
    per slot, is known. Images count too: each ``[img-N]`` tag of a rendering (N below
    ``n_images``, as the runner reads them) costs ``image_tokens`` positions beside its text."""

    renderer: templates.Renderer
    messages: list[dict]
    tools: Sequence[dict] | None
    think: tuple[bool, str, bool]
    prompt: str  # the rendering of all of ``messages``
    image_tokens: int = 0  # positions per image (image_tokens_of)
    n_images: int = 0  # the request's images

    def _image_cost(self, text: str) -> int:
        """The positions the images of ``text`` take. The tag's own text is counted as well,
        a few tokens over, like the bound: the runner never has to cut a fitted prompt."""
        if not self.n_images:
            return 0
        return self.image_tokens * sum(
            1 for m in IMAGE_TAG.finditer(text) if int(m.group(1)) < self.n_images
        )

    def _render(self, start: int) -> str:
        """The system messages before ``start`` + ``messages[start:]``, rendered."""
        if start == 0:
            return self.prompt
        kept = [m for m in self.messages[:start] if m.get("role") == "system"]
        return render(self.renderer, kept + self.messages[start:], self.tools, think=self.think)

    async def fit(self, lease: Any) -> str:
        """The prompt with the fewest oldest non-system messages dropped so that it fits the
        slot with room for one generated token (the runner's own truncation limit, so it never
        cuts a prompt fitted here). System messages and the last message always stay; if the
        last message alone does not fit it is sent anyway and the runner truncates it.

        Cost: nothing but a length check when :func:`token_bound` of the whole prompt fits (the
        usual case); otherwise one ``/tokenize`` of the whole prompt and, when it is too long, a
        binary search over the first kept message, tokenizing only renderings whose bound does
        not already fit: O(log n) round trips where Ollama tokenizes up to n renderings. The
        search assumes a longer suffix never renders to fewer tokens (true of chat templates),
        which makes it pick Ollama's message: the oldest one from which every later one fits."""
        limit = lease.n_ctx - 1
        calls = 0

        async def fits(text: str) -> bool:
            nonlocal calls
            images = self._image_cost(text)
            if token_bound(text) + images <= limit:
                return True
            calls += 1
            return await count_tokens(lease, text) + images <= limit

        if await fits(self.prompt):
            if calls:
                log.debug("api.chat_fits", tokenize_calls=calls, n_ctx=lease.n_ctx)
            return self.prompt
        lo, hi = 1, len(self.messages) - 1  # hi: the last message is always kept
        best = None
        while lo < hi:
            mid = (lo + hi) // 2
            text = self._render(mid)
            if await fits(text):
                hi, best = mid, text
            else:
                lo = mid + 1
        prompt = best if best is not None else self._render(hi)  # best: the rendering of hi
        log.debug(
            "api.chat_truncated",
            dropped=sum(1 for m in self.messages[:hi] if m.get("role") != "system"),
            kept=len(self.messages) - hi,
            tokenize_calls=calls,
            n_ctx=lease.n_ctx,
        )
        return prompt


def resolve_think(
    model: Model, think: tuple[bool, str, bool], name: str, *, relaxed: bool = False
) -> tuple[bool, str, bool]:
    """The request's ``think`` against the model (Ollama 0.33): a thinking-capable model thinks
    when ``think`` is unset (it becomes set: templates see ``IsThinkSet``); asking a model
    without the capability to think is a 400, or (``relaxed``, the Anthropic route, whose
    clients send ``thinking`` to any model) quietly off."""
    if "thinking" in model.capabilities:
        return think if think[2] else (True, "", True)
    if think[0]:
        if relaxed:
            return False, "", False
        raise ApiError(400, f'"{name}" does not support thinking')
    return think


@dataclass(frozen=True, slots=True)
class Logprobs:
    """What a request asked for: ``enabled`` (``logprobs``) and ``top`` alternatives (0..20)."""

    enabled: bool = False
    top: int = 0


def check_logprobs(enabled: Any, top: Any) -> Logprobs:
    """``logprobs``/``top_logprobs`` as Ollama checks them: top outside 0..20 is a 400."""
    top = top or 0
    if (
        not isinstance(top, int)
        or isinstance(top, bool)
        or not 0 <= top <= protocol.MAX_TOP_LOGPROBS
    ):
        raise ApiError(400, f"top_logprobs must be between 0 and {protocol.MAX_TOP_LOGPROBS}")
    return Logprobs(bool(enabled), top)


@contextlib.asynccontextmanager
async def completion_job(
    app: web.Application,
    model: Model,
    *,
    options: RequestOptions,
    keep_alive: float | None,
    started: float,
    prompt: str | None,
    context: list[int] | None = None,
    fmt: Any = None,
    stream: bool = True,
    thinking: bool = False,
    tools: Sequence[dict] | None = None,
    renderer: templates.Renderer | None = None,
    shift: bool | None = None,
    truncate: bool | None = None,
    history: ChatHistory | None = None,
    logprobs: Logprobs = Logprobs(),
    images: list[bytes] | None = None,
) -> AsyncIterator[Job]:
    """Acquire a slot for ``model`` and yield the :class:`Job` (load-only when ``prompt`` is
    None). With ``history`` (a chat whose rendering is ``prompt``) and ``truncate`` not False,
    the oldest messages are dropped until the prompt fits the runner's slot. Releases the lease
    on exit, exactly once.

    ``thinking`` (the resolved think value) splits the output at the tags inferred from the
    model's template (none inferred: no split, as Ollama); a prompt ending with the opening tag
    means the output starts inside the thinking. A ``fmt`` grammar then applies only after the
    thinking (``format_after``)."""
    body = None
    tags = model.renderer().think_tags() if thinking else ("", "")
    splitter = ThinkingSplitter(*tags) if all(tags) else None
    if prompt is not None:
        body = protocol.CompletionRequest(
            prompt=prompt,
            tokens=context or None,
            options=options.sampling(),
            format=fmt,
            stream=stream,
            shift=shift,
            truncate=True if truncate is None else truncate,
            logprobs=logprobs.enabled,
            top_logprobs=logprobs.top if logprobs.enabled else 0,
            images=images or [],
        )
    lease = await app[SUPERVISOR].acquire(model.record, options, keep_alive, kind="completion")
    async with lease:
        if body is not None and history is not None and body.truncate:
            fitted = await history.fit(lease)
            if fitted is not body.prompt:
                body = msgspec.structs.replace(body, prompt=fitted)
        if splitter is not None and body is not None:
            opened = (body.prompt or "").rstrip().endswith(tags[0])
            if opened:
                splitter.add(tags[0])
            if fmt is not None:
                body = msgspec.structs.replace(
                    body, format_after=("" if opened else tags[0], tags[1])
                )
        job = Job(
            model,
            lease,
            started,
            int((time.monotonic() - started) * 1e9),
            body,
            series=app[METRICS].model(model.record.name),
            meter=auth.meter(),
        )
        job.thinking = splitter
        if tools and renderer is not None and renderer.supports_tools:
            job.tools = toolcalls.ToolCallParser(renderer.tool_call_tag(), tools)
        try:
            yield job
        finally:
            await job.close()


def render(
    renderer: templates.Renderer,
    messages: Sequence[dict],
    tools: Sequence[dict] | None,
    *,
    prompt: str = "",
    suffix: str = "",
    think: tuple[bool, str, bool] = (False, "", False),
    status: int = 500,
) -> str:
    try:
        return renderer.render(
            messages,
            tools,
            prompt=prompt,
            suffix=suffix,
            think=think[0],
            think_level=think[1],
            is_think_set=think[2],
        )
    except templates.TemplateError as e:
        raise ApiError(status, str(e)) from None


def parse_template(text: str) -> templates.GoTemplate:
    """A request's ``template`` override; a parse error is the client's: 400 (Ollama: 500)."""
    try:
        return templates.go_template(text)
    except templates.TemplateError as e:
        raise ApiError(400, str(e)) from None


# ---- /api/generate -------------------------------------------------------------------------------


def generate_prompt(
    model: Model,
    prompt: str,
    *,
    suffix: str = "",
    system: str | None = None,
    template: str | None = None,
    raw: bool = False,
    context: list[int] | None = None,
    think: tuple[bool, str, bool] = (False, "", False),
    n_images: int = 0,
) -> str | None:
    """The text sent to the runner for a generate request; None = load only (empty prompt).
    Not raw: [system (request or Modelfile)] + Modelfile MESSAGEs (unless ``context``) + one
    ``[img-N]`` user message per image + the user prompt, rendered with the request's or the
    model's template (FIM with ``suffix``). Raw: the prompt carries its own ``[img-N]``."""
    if not prompt and not suffix:
        return None
    if raw:
        return prompt
    renderer = parse_template(template) if template else model.renderer()
    system = system if system is not None else model.record.system
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    if not context:
        messages += model.record.messages
    messages += [{"role": "user", "content": f"[img-{i}]"} for i in range(n_images)]
    messages.append({"role": "user", "content": prompt})
    return render(renderer, messages, None, prompt=prompt, suffix=suffix, think=think)


def warn_ignored(model: str, keys: Sequence[str]) -> None:
    """One warning per request naming what it asked for that has no effect here."""
    if keys:
        log.warning("api.options_ignored", model=model, ignored=list(keys))


def debug_info(prompt: str) -> dict[str, Any]:
    """``_debug_info`` of a ``_debug_render_only`` answer (images are not counted yet)."""
    return {"rendered_template": prompt, "image_count": 0}


# ---- /api/chat -----------------------------------------------------------------------------------


def chat_messages(model: Model, messages: Sequence[dict]) -> list[dict]:
    """Modelfile MESSAGEs + request messages, with the Modelfile SYSTEM first when the request
    does not start with a system message."""
    msgs = list(model.record.messages) + list(messages)
    if model.record.system and (not messages or messages[0].get("role") != "system"):
        msgs.insert(0, {"role": "system", "content": model.record.system})
    return msgs


def tag_images(messages: list[dict]) -> tuple[list[dict], list[bytes]]:
    """Ollama's image tags: the request's images are numbered in order, and each becomes
    ``[img-N]`` in its message's content, replacing the next ``[img]`` there or else prefixed;
    the decoded bytes go to the runner beside the prompt (a bad base64 image is a 400)."""
    out: list[dict] = []
    images: list[bytes] = []
    for m in messages:
        data = opts.check_images(m.get("images"))
        if not data:
            out.append(m)
            continue
        content, prefix = m.get("content") or "", ""
        for blob in data:
            tag = f"[img-{len(images)}]"
            images.append(blob)
            if "[img]" in content:
                content = content.replace("[img]", tag, 1)
            else:
                prefix += tag
        out.append({**m, "content": prefix + content})
    return out, images


def message_dict(m: opts.Message) -> dict[str, Any]:
    """A native chat message as the templates read it: role lower-cased, content never None."""
    d = m.as_dict()
    d["role"] = (d.get("role") or "").lower()
    d["content"] = d.get("content") or ""
    return d


async def start_chat(
    app: web.Application,
    *,
    model_name: str,
    messages: list[dict],
    tools: list[dict] | None,
    options: dict[str, Any] | None,
    fmt: Any,
    keep_alive: float | None,
    think: tuple[bool, str, bool],
    stream: bool,
    started: float,
    shift: bool | None = None,
    truncate: bool | None = None,
    logprobs: Logprobs = Logprobs(),
    debug_render_only: bool = False,
    relaxed_think: bool = False,
    ignored: Sequence[str] = (),
) -> contextlib.AbstractAsyncContextManager[Job] | dict[str, Any]:
    """Validate and resolve a chat; returns the unload or ``_debug_render_only`` reply (a
    dict) or the job context. ``ignored``: request fields the caller's route does not honour,
    warned about with the ignored options."""
    model = await resolve(app, model_name, style="quoted")
    if not messages and keep_alive == 0:
        await app[SUPERVISOR].unload(model.record)
        return {
            "model": model_name,
            "created_at": now_utc(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": "unload",
            "done": True,
        }
    if "completion" not in model.capabilities:
        raise ApiError(400, f'"{model_name}" does not support chat')
    require(
        model,
        (["tools"] if tools else [])
        + (["vision"] if any(m.get("images") for m in messages) else []),
    )
    think = resolve_think(model, think, model_name, relaxed=relaxed_think)
    messages, images = tag_images(messages)
    merged = RequestOptions.build(model.record.parameters, options)
    warn_ignored(model_name, [*ignored, *opts.ignored_options(options)])
    prompt = history = None
    renderer = model.renderer()
    if messages:
        msgs = chat_messages(model, messages)
        prompt = render(renderer, msgs, tools, think=think)
        history = ChatHistory(
            renderer,
            msgs,
            tools,
            think,
            prompt,
            await image_tokens_of(model) if images else 0,
            len(images),
        )
    if debug_render_only:
        return {
            "model": model_name,
            "created_at": now_utc(),
            "message": {"role": "", "content": ""},
            "done": False,
            "_debug_info": debug_info(prompt or ""),
        }
    return completion_job(
        app,
        model,
        options=merged,
        keep_alive=keep_alive,
        started=started,
        prompt=prompt,
        fmt=fmt,
        stream=stream,
        thinking=think[0],
        tools=tools,
        renderer=renderer,
        shift=shift,
        truncate=truncate,
        history=history,
        logprobs=logprobs,
        images=images,
    )


def shorten(vec: list[float], dimensions: int | None) -> list[float]:
    """An embedding cut to ``dimensions`` and L2-normalised again (unset/too large: as is)."""
    if not dimensions or dimensions <= 0 or dimensions >= len(vec):
        return vec
    cut = vec[:dimensions]
    norm = math.sqrt(sum(v * v for v in cut)) or 1.0
    return [v / norm for v in cut]


async def embed_texts(
    app: web.Application,
    model: Model,
    inputs: list[str],
    *,
    options: dict[str, Any] | None,
    keep_alive: float | None,
    truncate: bool | None,
) -> tuple[protocol.EmbedResponse, int]:
    """Embeddings for ``inputs`` (loads the model even when empty) -> (response, load ns)."""
    started = time.monotonic()
    merged = RequestOptions.build(model.record.parameters, options)
    lease = await app[SUPERVISOR].acquire(model.record, merged, keep_alive, kind="embedding")
    async with lease:
        load = int((time.monotonic() - started) * 1e9)
        if not inputs:
            return protocol.EmbedResponse(embeddings=[], prompt_eval_count=0), load
        body = protocol.EmbedRequest(input=inputs, truncate=truncate is not False)
        resp = await runner_json(lease, "/embed", body, protocol.EmbedResponse)
        app[METRICS].model(model.record.name).prompt_tokens.inc(resp.prompt_eval_count)
        return resp, load
