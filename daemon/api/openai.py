"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Requests are translated into the inference core (``prepare``, ``inference``) the way Ollama's OpenAI
middleware does (reference §3): temperature and top_p default to 1.0, max_tokens ->
num_predict, response_format -> format, content parts -> one message each. Streams are SSE
(``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``). Errors use OpenAI's shape (the error middleware
does that for every path under /v1/); an error after the stream started is a last
``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from corral.daemon.api import auth, prepare
from corral.daemon.api import inference as core
from corral.daemon.api import options as opts
from corral.daemon.api.errors import ApiError, as_api_error, openai_body
from corral.daemon.api.keys import STORE
from corral.daemon.api.middleware import LOG_MODEL
from corral.daemon.api.responses import LazyStream, json_response, send_json
from corral.daemon.errors import CorralError, NotFound
from corral.daemon.params import RequestOptions
from corral.daemon.prompt.thinking import NO_THINK, Think

_enc = msgspec.json.Encoder()
FINGERPRINT = "fp_ollama"


# ---- request shapes ------------------------------------------------------------------------------
# What Ollama's openai.*Request structs declare: a body is checked against its schema (a wrong
# type is a 400 naming the field, as Go's ShouldBindJSON), and the handlers read the typed value.
# Only the names of fields present that have no effect here come from the JSON object (a warning).


class _ImageUrl(msgspec.Struct):
    url: str = ""


class _Part(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    image_url: str | _ImageUrl | None = None


class _Function(msgspec.Struct):
    name: str = ""
    arguments: str | dict[str, Any] | None = None


class _ToolCall(msgspec.Struct):
    function: _Function
    id: str | None = None
    type: str | None = None


class _Message(msgspec.Struct):
    role: str = ""
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _JsonSchema(msgspec.Struct):
    schema: dict[str, Any] | None = None


class _ResponseFormat(msgspec.Struct):
    type: str = ""
    json_schema: _JsonSchema | None = None


class _Reasoning(msgspec.Struct):
    effort: str | None = None


class _Sampling(msgspec.Struct):
    model: str = ""
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: opts.Int64 | None = None
    max_completion_tokens: opts.Int64 | None = None  # wins over max_tokens
    seed: opts.Int64 | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[_Message] | None = None
    response_format: _ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None  # checked against Tool by convert(); the
    #                                             templates read the client's JSON
    reasoning_effort: str | None = None
    reasoning: _Reasoning | None = None
    logprobs: bool | None = None
    top_logprobs: opts.Int64 | None = None
    n: opts.Int64 | None = None
    debug_render_only: bool = msgspec.field(default=False, name="_debug_render_only")


class CompletionRequest(_Sampling):
    prompt: Any = ""
    suffix: str | None = None
    logprobs: opts.Int64 | None = None  # legacy API: the number of alternatives (0..20)
    n: opts.Int64 | None = None


# Request fields of the OpenAI APIs that are accepted and have no effect here; a request that
# sets one gets them named in one warning (``n`` > 1 is refused instead: see _check_n).
_IGNORED_FIELDS = (
    "tool_choice",
    "logit_bias",
    "parallel_tool_calls",
    "user",
    "service_tier",
    "best_of",
    "echo",
    "prediction",
    "store",
    "metadata",
    "modalities",
    "audio",
)


def ignored(body: dict[str, Any], fields: tuple[str, ...] = _IGNORED_FIELDS) -> list[str]:
    """The ``fields`` (accepted, without effect) a request body sets, for the warning."""
    return [k for k in fields if body.get(k) is not None]


def _check_n(n: int | None) -> None:
    """One choice per request: ``n`` > 1 would silently get one, so it is a 400."""
    if n is not None and n != 1:
        raise ApiError(400, f"n must be 1 (this server returns one choice per request), got {n}")


class EmbeddingRequest(msgspec.Struct):
    model: str = ""
    input: Any = None
    dimensions: opts.Int64 | None = None
    encoding_format: str | None = None


def _body(raw: bytes, schema: type[msgspec.Struct]) -> tuple[dict[str, Any], Any]:
    """The request object (``null`` = ``{}``) and its typed form as ``schema``."""
    data = opts.decode_json(raw)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ApiError(400, "invalid request body: expected a JSON object")
    data = opts.fold_keys(data, schema)
    return data, opts.convert(data, schema)


async def read_typed(
    request: web.Request, schema: type[msgspec.Struct], missing: tuple[int, str]
) -> tuple[dict[str, Any], Any]:
    """(the body as JSON, the body as ``schema``). Its model name goes into the request log;
    an empty one is ``ApiError(*missing)`` (Ollama's text differs per route)."""
    data, typed = _body(await request.read(), schema)
    request[LOG_MODEL] = typed.model
    if not typed.model:
        raise ApiError(*missing)
    return data, typed


def _streaming(body: _Sampling) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage): usage chunks only when streaming."""
    stream = body.stream is True
    return stream, stream and body.stream_options is not None and body.stream_options.include_usage


def _options(body: _Sampling, *, top_p_zero_is_default: bool = False) -> dict[str, Any]:
    """OpenAI sampling fields -> Ollama options (temperature/top_p default 1.0); the schema has
    typed them (``stop``: a string or a list of strings)."""
    o: dict[str, Any] = {}
    max_tokens = (
        body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    )
    if max_tokens is not None:
        o["num_predict"] = max_tokens
    for key in ("seed", "frequency_penalty", "presence_penalty"):
        if getattr(body, key) is not None:
            o[key] = getattr(body, key)
    o["temperature"] = 1.0 if body.temperature is None else body.temperature
    top_p = body.top_p
    o["top_p"] = 1.0 if top_p is None or (top_p_zero_is_default and top_p == 0) else top_p
    if body.stop is not None:
        o["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    return o


def _format(response_format: _ResponseFormat | None) -> Any:
    kind = response_format.type if response_format is not None else ""
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        assert response_format is not None
        schema = response_format.json_schema.schema if response_format.json_schema else None
        return schema if isinstance(schema, dict) else None
    return None


_EFFORT = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
    "ultra": "max",
}


def _think(body: ChatCompletionRequest) -> Think:
    effort = body.reasoning_effort
    if effort is None and body.reasoning is not None:
        effort = body.reasoning.effort
    if effort is None:
        return NO_THINK
    if effort not in _EFFORT:
        raise ApiError(400, f"invalid reasoning value: {json.dumps(effort)}")
    return opts.parse_think(_EFFORT[effort])


def image_data(url: Any) -> str:
    """The base64 data of an image URL (a string, ``{"url"}`` or :class:`_ImageUrl`): only data
    URLs are taken."""
    url = (
        url.url if isinstance(url, _ImageUrl) else url.get("url") if isinstance(url, dict) else url
    )
    if not isinstance(url, str):
        raise ApiError(400, "invalid image input")
    if url.startswith(("http://", "https://")):
        raise ApiError(
            400, "image URLs are not currently supported, please use base64 encoded data instead"
        )
    head, sep, data = url.partition(";base64,")
    if not sep or head not in _IMAGE_URI_TYPES:
        raise ApiError(400, "invalid image input")
    try:
        base64.b64decode(data, validate=True)
    except ValueError:  # binascii.Error
        raise ApiError(400, "invalid image input") from None
    return data


# Ollama's accepted data-URI heads (anything else, including other image types, is invalid)
_IMAGE_URI_TYPES = frozenset(
    {"data:image/jpeg", "data:image/jpg", "data:image/png", "data:image/webp", "data:"}
)


def chat_messages(messages: list[_Message] | None) -> list[dict[str, Any]]:
    """OpenAI messages -> native messages (each content part becomes its own message)."""
    if not messages:
        raise ApiError(400, "[] is too short - 'messages'")
    out: list[dict[str, Any]] = []
    names_by_id: dict[str, str] = {}
    for m in messages:
        role = m.role.lower()
        content = m.content
        calls = []
        for c in m.tool_calls or []:
            fn = c.function
            args = fn.arguments
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise ApiError(400, "invalid tool call arguments") from None
            call: dict[str, Any] = {"function": {"name": fn.name, "arguments": args or {}}}
            if c.id:
                call["id"] = c.id
                names_by_id[c.id] = fn.name
            calls.append(call)
        base: dict[str, Any] = {"role": role}
        if role == "tool":
            name = m.name or names_by_id.get(m.tool_call_id or "", "")
            if name:
                base["tool_name"] = name
            if m.tool_call_id:
                base["tool_call_id"] = m.tool_call_id
        if m.reasoning is not None:
            base["thinking"] = m.reasoning
        if isinstance(content, str):
            out.append({**base, "content": content, **({"tool_calls": calls} if calls else {})})
        elif isinstance(content, list):
            for part in content:
                if part.type == "text":
                    out.append({**base, "content": part.text or ""})
                elif part.type == "image_url":
                    out.append({**base, "content": "", "images": [image_data(part.image_url)]})
                else:
                    raise ApiError(400, f"invalid message content type: {part.type}")
            if calls:
                out.append({**base, "content": "", "tool_calls": calls})
        elif content is None and calls:
            out.append({**base, "content": "", "tool_calls": calls})
        else:
            raise ApiError(
                400, f"invalid message content type: {content!r}".replace("None", "<nil>")
            )
    return out


def function_tool(
    name: str, description: str | None, parameters: dict[str, Any] | None
) -> dict[str, Any]:
    """A native function tool from another API's flat tool definition (Anthropic's, the
    Responses API's): no description is "", no parameters an empty object schema."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description or "",
            "parameters": parameters or {"type": "object", "properties": {}},
        },
    }


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{random.randint(0, 998)}"


def _usage(done: core.Done | None) -> dict[str, Any]:
    """OpenAI's usage: prompt_tokens is the whole prompt, the part the prompt cache held is
    prompt_tokens_details.cached_tokens."""
    p = done.prompt_eval_count if done else 0
    c = done.eval_count if done else 0
    cached = done.prompt_eval_cached_count if done else 0
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def tool_calls_out(calls: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "id": c.get("id") or core.tool_call_id(),
            "index": start + i,
            "type": "function",
            "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(
                    c["function"].get("arguments") or {}, separators=(",", ":"), ensure_ascii=False
                ),
            },
        }
        for i, c in enumerate(calls)
    ]


def _finish(done: core.Done, tool_calls: bool) -> str:
    if done.done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _chunks(head: dict[str, Any]) -> Callable[[dict], bytes]:
    """The encoder of a stream's chunks, ``{**head, "choices": [choice]}``: ``head`` is encoded
    once, not again for every token."""
    prefix = _enc.encode(head)[:-1] + b',"choices":['
    return lambda choice: prefix + _enc.encode(choice) + b"]}"


async def _stream(
    request: web.Request,
    job: core.Generation,
    chunk: Callable[[dict], bytes],
    choices_of: Callable[[core.Delta], list[dict]],
    finish: Callable[[core.Done], list[bytes]],
) -> web.StreamResponse:
    """``data: <json>`` events (one ``chunk`` per choice of each delta), then ``data: [DONE]``."""
    out = LazyStream.sse(request)
    try:
        async for ev in job.events():
            if isinstance(ev, core.Done):
                for payload in finish(ev):
                    await out.write(payload)
                break
            choices = choices_of(ev)
            for i, c in enumerate(choices):
                await out.write(chunk(c), hold=ev.more or i < len(choices) - 1)
            if out.gone:
                break
    except (ApiError, CorralError) as e:
        if not out.started:
            raise
        await out.send(openai_body(as_api_error(e)))
    await out.write(b"[DONE]")
    return await out.finish()


# ---- /v1/chat/completions ------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    data, body = await read_typed(request, ChatCompletionRequest, (400, "model is required"))
    model_name = body.model
    _check_n(body.n)
    logprobs = prepare.check_logprobs(body.logprobs, body.top_logprobs)
    messages = chat_messages(body.messages)
    stream, include_usage = _streaming(body)
    started_job = await prepare.start_chat(
        request.app,
        prepare.Chat(
            model=model_name,
            messages=messages,
            tools=body.tools or None,
            options=_options(body),
            format=_format(body.response_format),
            keep_alive=None,
            think=_think(body),
            stream=stream,
            started=started,
            logprobs=logprobs,
            debug_render_only=body.debug_render_only,
            ignored=ignored(data),
        ),
    )
    if isinstance(started_job, dict):  # _debug_render_only (messages are never empty)
        return json_response(started_job)
    cid = _completion_id("chatcmpl")
    created = int(time.time())
    async with started_job as job:
        if not stream:
            whole, done = await job.result()
            msg: dict[str, Any] = {"role": "assistant", "content": whole.content}
            if whole.thinking:
                msg["reasoning"] = whole.thinking
            if whole.tool_calls:
                msg["tool_calls"] = tool_calls_out(whole.tool_calls)
            choice: dict[str, Any] = {
                "index": 0,
                "message": msg,
                "finish_reason": _finish(done, bool(whole.tool_calls)),
            }
            if logprobs.enabled:
                choice["logprobs"] = {"content": chat_logprobs(whole.logprobs)}
            return await send_json(
                request,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model_name,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [choice],
                    "usage": _usage(done),
                },
            )

        head = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "system_fingerprint": FINGERPRINT,
        }
        state = {"first": True, "calls": 0}

        chunk = _chunks(head)

        def choices_of(d: core.Delta) -> list[dict]:
            """One chunk's choice; a delta with both reasoning and content (or tool calls)
            becomes a reasoning chunk then a content chunk, as Ollama sends them."""
            delta: dict[str, Any] = {}
            if state["first"]:
                delta["role"] = "assistant"
                state["first"] = False
            if d.thinking:
                delta["reasoning"] = d.thinking
            rest: dict[str, Any] = {}
            if d.content:
                rest["content"] = d.content
            if d.tool_calls:
                rest["tool_calls"] = tool_calls_out(d.tool_calls, state["calls"])
                state["calls"] += len(d.tool_calls)
            first: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            if d.logprobs:
                first["logprobs"] = {"content": chat_logprobs(d.logprobs)}
            if d.thinking and rest:
                return [first, {"index": 0, "delta": rest, "finish_reason": None}]
            delta.update(rest)
            return [first]

        def finish(done: core.Done) -> list[bytes]:
            out = [
                chunk({"index": 0, "delta": {}, "finish_reason": _finish(done, state["calls"] > 0)})
            ]
            if include_usage:
                out.append(_enc.encode({**head, "choices": [], "usage": _usage(done)}))
            return out

        return await _stream(request, job, chunk, choices_of, finish)


# ---- /v1/completions -----------------------------------------------------------------------------


def chat_logprobs(entries: list[Any]) -> list[dict[str, Any]]:
    """Chat logprob items in OpenAI's shape: ``top_logprobs`` always present (a list)."""
    out = []
    for e in entries:
        item = msgspec.to_builtins(e)
        item.setdefault("bytes", None)
        item.setdefault("top_logprobs", [])
        for alt in item["top_logprobs"]:
            alt.setdefault("bytes", None)
        out.append(item)
    return out


class _LegacyLogprobs:
    """The legacy completions ``logprobs`` object, built chunk by chunk: parallel lists of
    tokens, their logprobs, ``{token: logprob}`` of the alternatives, and each token's offset
    in the completion text."""

    def __init__(self) -> None:
        self.offset = 0

    def of(self, entries: list[Any]) -> dict[str, Any]:
        tokens, offsets = [], []
        for e in entries:
            tokens.append(e.token)
            offsets.append(self.offset)
            self.offset += len(e.token)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{a.token: a.logprob for a in e.top_logprobs} for e in entries],
            "text_offset": offsets,
        }


async def completions(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    data, body = await read_typed(request, CompletionRequest, (404, "model '' not found"))
    model_name = body.model
    _check_n(body.n)
    logprobs = prepare.check_logprobs(body.logprobs is not None, body.logprobs)
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "invalid type for 'prompt' field: only a string is supported")
    suffix = body.suffix or ""
    stream, include_usage = _streaming(body)
    options = _options(body, top_p_zero_is_default=True)
    model = await core.resolve(request.app, model_name, style="quoted")
    if "completion" not in model.capabilities:
        raise ApiError(400, f'"{model_name}" does not support generate')
    if suffix:
        core.require(model, ["insert"])
    think = prepare.resolve_think(model, NO_THINK, model_name)
    text = prepare.generate_prompt(model, prompt, suffix=suffix, think=think)
    merged = RequestOptions.build(model.record.parameters, options)
    prepare.warn_ignored(model_name, ignored(data))
    cid = _completion_id("cmpl")
    created = int(time.time())
    head = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model_name,
        "system_fingerprint": FINGERPRINT,
    }
    legacy = _LegacyLogprobs()
    async with prepare.completion_job(
        request.app,
        model,
        options=merged,
        keep_alive=None,
        started=started,
        prompt=text if text is not None else "",
        stream=stream,
        thinking=think.enabled,
        logprobs=logprobs,
    ) as job:
        if not stream:
            whole, done = await job.result()
            choice: dict[str, Any] = {
                "text": whole.content,
                "index": 0,
                "finish_reason": _finish(done, False),
            }
            if logprobs.enabled:
                choice["logprobs"] = legacy.of(whole.logprobs)
            return await send_json(request, {**head, "choices": [choice], "usage": _usage(done)})

        chunk = _chunks(head)

        def choices_of(d: core.Delta) -> list[dict]:
            if not d.content and not d.logprobs:
                return []
            choice = {"text": d.content, "index": 0, "finish_reason": None}
            if d.logprobs:
                choice["logprobs"] = legacy.of(d.logprobs)
            return [choice]

        def finish(done: core.Done) -> list[bytes]:
            out = [chunk({"text": "", "index": 0, "finish_reason": _finish(done, False)})]
            if include_usage:
                out.append(_enc.encode({**head, "choices": [], "usage": _usage(done)}))
            return out

        return await _stream(request, job, chunk, choices_of, finish)


# ---- /v1/embeddings ----------------------------------------------------------------------------


async def embeddings(request: web.Request) -> web.Response:
    _, body = await read_typed(request, EmbeddingRequest, (400, "model is required"))
    model_name = body.model
    raw = body.input
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = raw
    else:
        raise ApiError(400, "invalid input")
    encoding = body.encoding_format or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(
            400,
            f"Invalid value for 'encoding_format' = {encoding}. "
            "Supported values: ['float', 'base64'].",
        )
    model = await core.resolve(request.app, model_name, style="store")
    async with core.embedding(
        request.app, model, inputs, options=None, keep_alive=None, truncate=True
    ) as (res, _):
        data = []
        for i, vec in enumerate(res.embeddings):
            vec = core.shorten(vec, body.dimensions)
            value: Any = (
                vec
                if encoding == "float"
                else base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            )
            data.append({"object": "embedding", "embedding": value, "index": i})
        return await send_json(
            request,
            {
                "object": "list",
                "data": data,
                "model": model_name,
                "usage": {
                    "prompt_tokens": res.prompt_eval_count,
                    "total_tokens": res.prompt_eval_count,
                },
            },
        )


# ---- /v1/models --------------------------------------------------------------------------------


def _model_obj(model_id: str, record: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(record.modified_at),
        "owned_by": record.model_name.namespace,
    }


async def list_models(request: web.Request) -> web.Response:
    records = await asyncio.to_thread(request.app[STORE].list)
    data = [_model_obj(r.name, r) for r in records if auth.may_use(request, r.name)]
    return json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    try:
        record = request.app[STORE].resolve(name)
    except NotFound:
        raise ApiError(404, f"model '{name}' not found") from None
    return json_response(_model_obj(name, record))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
