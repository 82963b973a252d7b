"""The Anthropic Messages API: POST /v1/messages (the Anthropic SDK, Claude Code pointed at a
local model), translated into the native chat core as Ollama 0.33 does.

Request -> chat: ``system`` (a string or text blocks) becomes the first system message;
each message's content blocks are folded into native messages by the handlers in
:data:`BLOCKS` (text joined, ``tool_use`` -> tool calls, ``tool_result`` -> ``tool`` messages,
``thinking`` -> the message's thinking, ``image`` -> base64 images); ``max_tokens`` (required)
-> ``num_predict``; ``temperature``/``top_p``/``top_k``/``stop_sequences`` -> options; ``tools``
-> native tools (``input_schema`` -> parameters); ``thinking.type`` enabled/disabled -> think
(asking a model that cannot think is not an error here: clients send it to any model).

Answer: ``{"id": "msg_…", "type": "message", "role": "assistant", "content": [thinking?, text?,
tool_use…], "stop_reason": end_turn | max_tokens | tool_use, "usage"}``; streamed as the
``message_start``, ``content_block_start/delta/stop``, ``message_delta``, ``message_stop``
events. Errors are Anthropic's ``{"type": "error", "error": {"type", "message"}}`` (the error
middleware does that for this path; a failure after the stream started is an ``error`` event).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from corral.daemon.api import inference as core
from corral.daemon.api import openai as oa
from corral.daemon.api import options as opts
from corral.daemon.api import prepare
from corral.daemon.api.errors import ApiError, anthropic_error, as_api_error
from corral.daemon.api.keys import SUPERVISOR
from corral.daemon.api.responses import LazyStream, json_response, send_json
from corral.daemon.errors import CorralError
from corral.daemon.params import RequestOptions
from corral.daemon.prompt.thinking import NO_THINK, Think

# ---- request shapes (checked: a wrong type is a 400 naming the field) --------------------------


class _Block(msgspec.Struct):
    type: str = ""


class _Message(msgspec.Struct):
    role: str = ""
    content: str | list[dict[str, Any]] = ""


class _Tool(msgspec.Struct):
    name: str = ""
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class _Thinking(msgspec.Struct):
    type: str = ""
    budget_tokens: opts.Int64 | None = None


class MessagesRequest(msgspec.Struct):
    model: str = ""
    max_tokens: opts.Int64 | None = None
    messages: list[_Message] | None = None
    system: str | list[dict[str, Any]] | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: opts.Int64 | None = None
    stop_sequences: list[str] | None = None
    # (not named ``tools``: opts.convert checks a ``tools`` attribute as native tools)
    tool_defs: list[_Tool] | None = msgspec.field(default=None, name="tools")
    tool_choice: dict[str, Any] | None = None
    thinking: _Thinking | None = None
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


# Fields accepted and not acted on; a request that sets one gets them named in a warning.
_IGNORED = (
    "tool_choice",
    "metadata",
    "service_tier",
    "container",
    "cache_control",
    "inference_geo",
    "speed",
    "diagnostics",
)


# ---- content blocks -> native messages ----------------------------------------------------------


@dataclass
class Parts:
    """What one Anthropic message's blocks add up to (filled by the :data:`BLOCKS` handlers)."""

    text: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # base64, as native messages carry
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    thinking: str = ""
    tool_results: list[dict[str, Any]] = field(default_factory=list)  # native "tool" messages


def _text(block: dict[str, Any], parts: Parts) -> None:
    text = block.get("text")
    if text is not None and not isinstance(text, str):
        raise ApiError(400, "text block: 'text' must be a string")
    parts.text.append(text or "")


def image_data(source: Any) -> str:
    """The base64 data of an image block's ``source`` (only ``base64`` sources)."""
    if not isinstance(source, dict):
        raise ApiError(400, "invalid image source")
    if source.get("type") != "base64":
        raise ApiError(
            400,
            f"invalid image source type: {source.get('type')}. Only base64 images are supported.",
        )
    data = source.get("data")
    if not isinstance(data, str):
        raise ApiError(400, "invalid image source")
    opts.check_images([data])
    return data


def _image(block: dict[str, Any], parts: Parts) -> None:
    parts.images.append(image_data(block.get("source")))


def _tool_use(block: dict[str, Any], parts: Parts) -> None:
    if not block.get("id"):
        raise ApiError(400, "tool_use block missing required 'id' field")
    if not block.get("name"):
        raise ApiError(400, "tool_use block missing required 'name' field")
    args = block.get("input")
    if args is not None and not isinstance(args, dict):
        raise ApiError(400, "tool_use block: 'input' must be an object")
    parts.tool_calls.append(
        {"id": block["id"], "function": {"name": block["name"], "arguments": args or {}}}
    )


def _tool_result(block: dict[str, Any], parts: Parts) -> None:
    content = block.get("content")
    text, images = "", []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        for item in content:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "text" and isinstance(item.get("text"), str):
                text += item["text"]
            elif item.get("type") == "image":
                images.append(image_data(item.get("source")))
    elif content is not None:
        raise ApiError(400, "tool_result block: 'content' must be a string or a list of blocks")
    msg: dict[str, Any] = {
        "role": "tool",
        "content": text,
        "tool_call_id": str(block.get("tool_use_id") or ""),
    }
    if images:
        msg["images"] = images
    parts.tool_results.append(msg)


def _thinking(block: dict[str, Any], parts: Parts) -> None:
    if isinstance(block.get("thinking"), str):
        parts.thinking = block["thinking"]


# Block type -> handler folding it into the message's Parts. Types not listed are skipped, as
# Ollama skips them (redacted_thinking, server tool blocks, documents).
BLOCKS: dict[str, Callable[[dict[str, Any], Parts], None]] = {
    "text": _text,
    "image": _image,
    "tool_use": _tool_use,
    "tool_result": _tool_result,
    "thinking": _thinking,
}


def native_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """The request's system + messages as native chat messages (Ollama's conversion: a user
    message's tool results come before its text, other roles' after)."""
    out: list[dict[str, Any]] = []
    if isinstance(req.system, str):
        if req.system:
            out.append({"role": "system", "content": req.system})
    elif req.system:
        text = "".join(
            b.get("text") or ""
            for b in req.system
            if b.get("type") == "text" and isinstance(b.get("text"), str)
        )
        if text:
            out.append({"role": "system", "content": text})
    for m in req.messages or []:
        role = m.role.lower()
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        parts = Parts()
        for block in blocks:
            handler = BLOCKS.get(str(block.get("type")))
            if handler is not None:
                handler(block, parts)
        if role == "user":
            out += parts.tool_results
        if parts.text or parts.images or parts.tool_calls or parts.thinking:
            msg: dict[str, Any] = {"role": role, "content": "".join(parts.text)}
            if parts.images:
                msg["images"] = parts.images
            if parts.tool_calls:
                msg["tool_calls"] = parts.tool_calls
            if parts.thinking:
                msg["thinking"] = parts.thinking
            out.append(msg)
        if role != "user":
            out += parts.tool_results
    return out


def _tools(req: MessagesRequest) -> list[dict[str, Any]] | None:
    tools = []
    for t in req.tool_defs or []:
        if not t.name:
            raise ApiError(400, "tools: 'name' is required")
        tools.append(oa.function_tool(t.name, t.description, t.input_schema))
    return tools or None


def _options(req: MessagesRequest) -> dict[str, Any]:
    o: dict[str, Any] = {"num_predict": req.max_tokens}
    for key in ("temperature", "top_p", "top_k"):
        if getattr(req, key) is not None:
            o[key] = getattr(req, key)
    if req.stop_sequences:
        o["stop"] = req.stop_sequences
    return o


def _think(req: MessagesRequest) -> Think:
    """``thinking.type`` enabled/disabled; else ``output_config.effort`` as a think level."""
    kind = req.thinking.type if req.thinking is not None else ""
    if kind == "enabled":
        return Think(True, "", True)
    if kind == "disabled":
        return Think(False, "", True)
    effort = str((req.output_config or {}).get("effort") or "").strip().lower()
    effort = "high" if effort == "xhigh" else effort
    if effort in ("low", "medium", "high", "max"):
        return Think(True, effort, True)
    return NO_THINK


def _stop_reason(done: core.Done, tool_use: bool) -> str:
    if tool_use:
        return "tool_use"
    return "max_tokens" if done.done_reason == "length" else "end_turn"


def _usage(done: core.Done) -> dict[str, int]:
    """Anthropic's usage splits the prompt: input_tokens are the tokens evaluated, the ones the
    prompt cache held are cache_read_input_tokens (their sum is the whole prompt); nothing is
    ever written to a cache on request, so cache_creation_input_tokens is 0."""
    cached = done.prompt_eval_cached_count
    return {
        "input_tokens": done.prompt_eval_count - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": done.eval_count,
    }


def _tool_block(call: dict[str, Any], with_input: bool = True) -> dict[str, Any]:
    fn = call["function"]
    return {
        "type": "tool_use",
        "id": call.get("id") or core.tool_call_id(),
        "name": fn["name"],
        "input": (fn.get("arguments") or {}) if with_input else {},
    }


# ---- the route -------------------------------------------------------------------------------


async def messages(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    data, req = await oa.read_typed(request, MessagesRequest, (400, "model is required"))
    if req.max_tokens is None or req.max_tokens <= 0:
        raise ApiError(400, "max_tokens is required and must be positive")
    if not req.messages:
        raise ApiError(400, "messages is required")
    stream = req.stream is True
    started_job = await prepare.start_chat(
        request.app,
        prepare.Chat(
            model=req.model,
            messages=native_messages(req),
            tools=_tools(req),
            options=_options(req),
            format=None,
            keep_alive=None,
            think=_think(req),
            stream=stream,
            started=started,
            relaxed_think=True,
            ignored=oa.ignored(data, _IGNORED),
        ),
    )
    assert not isinstance(started_job, dict)  # messages are never empty here
    msg_id = "msg_" + secrets.token_hex(12)
    async with started_job as job:
        if not stream:
            whole, done = await job.result()
            content: list[dict[str, Any]] = []
            if whole.thinking:
                content.append({"type": "thinking", "thinking": whole.thinking, "signature": ""})
            if whole.content:
                content.append({"type": "text", "text": whole.content})
            content += [_tool_block(c) for c in whole.tool_calls]
            return await send_json(
                request,
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": req.model,
                    "content": content,
                    "stop_reason": _stop_reason(done, bool(whole.tool_calls)),
                    "stop_sequence": None,
                    "usage": _usage(done),
                },
            )
        return await _stream(request, job, msg_id, req.model, len(json.dumps(data)) // 4)


async def _stream(
    request: web.Request, job: core.Generation, msg_id: str, model: str, input_estimate: int
) -> web.StreamResponse:
    """The Messages event stream. Content blocks are opened as their kind of output starts
    (thinking, then text, then one block per tool call), each closed before the next opens.
    The events of a delta are held and go out in one write, with the next delta's when that
    one has already arrived (:attr:`Delta.more`)."""
    out = LazyStream.events(request)
    index = -1
    open_kind: str | None = None  # "thinking" | "text" while a block is open
    tool_use = False

    async def send(name: str, obj: dict[str, Any]) -> None:
        await out.event(name, obj, hold=True)  # out.flush() after the delta

    async def block(kind: str, start: dict[str, Any]) -> None:
        nonlocal index, open_kind
        await close()
        index += 1
        open_kind = kind
        await send(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )

    async def close() -> None:
        nonlocal open_kind
        if open_kind is not None:
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
            open_kind = None

    async def delta(body: dict[str, Any]) -> None:
        await send(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": body}
        )

    try:
        async for ev in job.events():
            if not out.started:  # with the first output: an earlier error keeps its status
                await send(
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {
                            "id": msg_id,
                            "type": "message",
                            "role": "assistant",
                            "model": model,
                            "content": [],
                            "stop_reason": None,
                            "stop_sequence": None,
                            "usage": {"input_tokens": input_estimate, "output_tokens": 0},
                        },
                    },
                )
            if isinstance(ev, core.Done):
                await close()
                await send(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": _stop_reason(ev, tool_use), "stop_sequence": None},
                        "usage": _usage(ev),
                    },
                )
                await send("message_stop", {"type": "message_stop"})
                break
            if ev.thinking:
                if open_kind != "thinking":
                    await block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                await delta({"type": "thinking_delta", "thinking": ev.thinking})
            if ev.content:
                if open_kind != "text":
                    await block("text", {"type": "text", "text": ""})
                await delta({"type": "text_delta", "text": ev.content})
            for call in ev.tool_calls:
                tool_use = True
                await block("tool_use", _tool_block(call, with_input=False))
                await delta(
                    {
                        "type": "input_json_delta",
                        "partial_json": json.dumps(
                            call["function"].get("arguments") or {}, ensure_ascii=False
                        ),
                    }
                )
                await close()
            if not ev.more:
                await out.flush()
            if out.gone:
                break
    except (ApiError, CorralError) as e:
        if not out.started:
            raise
        await out.event("error", {"type": "error", "error": anthropic_error(as_api_error(e))})
    return await out.finish()


async def count_tokens(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens: the tokens the request's prompt takes, counted by the
    model's own tokenizer on the prompt as /v1/messages would render it (the model is loaded
    for that, as for a request; Ollama estimates characters / 4 instead)."""
    _, req = await oa.read_typed(request, MessagesRequest, (400, "model is required"))
    if not req.messages:
        raise ApiError(400, "messages is required")
    model = await core.resolve(request.app, req.model, style="quoted")
    if "completion" not in model.capabilities:
        raise ApiError(400, f'"{req.model}" does not support chat')
    think = prepare.resolve_think(model, _think(req), req.model, relaxed=True)
    msgs = prepare.chat_messages(model, native_messages(req))
    prompt = prepare.render(model.renderer(), msgs, _tools(req), think=think)
    options = RequestOptions.build(model.record.parameters, None)
    lease = await request.app[SUPERVISOR].acquire(model.record, options, None, kind="completion")
    async with lease:
        n = await prepare.count_tokens(lease, prompt)
    return json_response({"input_tokens": n})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
