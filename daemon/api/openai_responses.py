"""OpenAI's Responses API: POST /v1/responses (``client.responses.create``, Codex, the Agents
SDK), stateless, translated into the native chat core as Ollama 0.33 does.

Request -> chat: ``instructions`` -> a first system message; ``input`` as text (one user
message) or items: messages (``input_text``/``output_text`` parts joined, ``input_image`` data
URLs as images; role ``developer`` read as ``system``), ``function_call`` (an assistant tool
call, merged into a directly preceding assistant message), ``function_call_output`` (a tool
message), ``reasoning`` (the next assistant message's thinking); ``max_output_tokens`` ->
``num_predict``; ``temperature`` (default 1.0), ``top_p``; ``reasoning.effort`` -> think
(``none`` off); ``text.format`` json_schema -> format, json_object -> JSON; ``tools`` (flat
``{type, name, description, parameters}``) -> native tools. ``previous_response_id`` needs
stored responses: a 400.

Answer: a ``response`` object whose ``output`` is [reasoning?] + function calls, or [reasoning?]
+ one assistant message with an ``output_text`` part; ``status`` ``completed`` also when the
generation hit ``max_output_tokens``, as Ollama answers (``incomplete_details`` null, the stream
ends with ``response.completed``: the Agents SDK fails an ``incomplete`` response with
ModelBehaviorError, so an agent whose reply reaches its limit would fail here and work against
Ollama); ``usage``. Streamed as
``response.created``, ``response.in_progress``, ``response.output_item.added`` …
``response.completed`` events with a ``sequence_number``. Errors use OpenAI's shape.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import msgspec
from aiohttp import web

from corral.daemon.api import inference as core
from corral.daemon.api import openai as oa
from corral.daemon.api import options as opts
from corral.daemon.api import prepare
from corral.daemon.api.errors import ApiError, as_api_error, openai_body
from corral.daemon.api.responses import LazyStream, send_json
from corral.daemon.errors import CorralError
from corral.daemon.prompt.thinking import NO_THINK, Think


class _Reasoning(msgspec.Struct):
    effort: str | None = None
    summary: str | None = None


class _Format(msgspec.Struct):
    type: str = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class _Text(msgspec.Struct):
    format: _Format | None = None


class _Tool(msgspec.Struct):
    type: str = "function"
    name: str = ""
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesRequest(msgspec.Struct):
    model: str = ""
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: opts.Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    reasoning: _Reasoning | None = None
    text: _Text | None = None
    # (not named ``tools``: opts.convert checks a ``tools`` attribute as native tools)
    tool_defs: list[_Tool] | None = msgspec.field(default=None, name="tools")
    stream: bool | None = None
    previous_response_id: str | None = None
    truncation: str | None = None


_IGNORED = (
    "tool_choice",
    "parallel_tool_calls",
    "store",
    "include",
    "metadata",
    "user",
    "service_tier",
    "top_logprobs",
    "max_tool_calls",
    "prompt_cache_key",
    "background",
)
_EFFORT = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
}


def _content(content: Any) -> tuple[str, list[str]]:
    """A message's content (a string or parts) -> (text, base64 images)."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise ApiError(400, "content must be a string or array")
    text, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            text.append(str(part.get("text") or ""))
        elif kind == "input_image":
            if part.get("image_url"):
                images.append(oa.image_data(part["image_url"]))
        elif kind == "input_file":
            raise ApiError(400, "file inputs are not currently supported")
        else:
            raise ApiError(400, f"unknown content type: {kind}")
    return "".join(text), images


def native_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        if req.input:
            out.append({"role": "user", "content": req.input})
        return out
    pending_thinking = ""
    for i, item in enumerate(req.input or []):
        kind = item.get("type") or ("message" if item.get("role") else "")
        if kind == "reasoning":
            summary = item.get("summary") or []
            pending_thinking = item.get("encrypted_content") or "".join(
                str(s.get("text") or "") for s in summary if isinstance(s, dict)
            )
        elif kind == "message":
            role = str(item.get("role") or "").lower()
            text, images = _content(item.get("content"))
            msg: dict[str, Any] = {
                "role": "system" if role == "developer" else role,
                "content": text,
            }
            if images:
                msg["images"] = images
            if role == "assistant" and pending_thinking:
                msg["thinking"], pending_thinking = pending_thinking, ""
            out.append(msg)
        elif kind == "function_call":
            try:
                args = json.loads(item.get("arguments") or "{}")
            except ValueError:
                raise ApiError(
                    400, f"input[{i}]: failed to parse function call arguments"
                ) from None
            call = {
                "id": str(item.get("call_id") or ""),
                "function": {"name": str(item.get("name") or ""), "arguments": args},
            }
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if pending_thinking:
                out[-1]["thinking"], pending_thinking = pending_thinking, ""
        elif kind == "function_call_output":
            text, images = _content(item.get("output"))
            msg = {"role": "tool", "content": text, "tool_call_id": str(item.get("call_id") or "")}
            if images:
                msg["images"] = images
            out.append(msg)
        elif not kind:
            raise ApiError(400, f"input[{i}]: input item missing required 'type' field")
        else:
            raise ApiError(400, f"input[{i}]: unknown input item type: {json.dumps(kind)}")
    if pending_thinking:
        out.append({"role": "assistant", "content": "", "thinking": pending_thinking})
    return out


def _think(req: ResponsesRequest) -> Think:
    effort = req.reasoning.effort if req.reasoning is not None else None
    if not effort:
        return NO_THINK
    if effort not in _EFFORT:
        raise ApiError(
            400,
            f"invalid reasoning value: {json.dumps(effort)} "
            '(must be "high", "medium", "low", "max", or "none")',
        )
    return opts.parse_think(_EFFORT[effort])


def _format(req: ResponsesRequest) -> Any:
    f = req.text.format if req.text is not None else None
    if f is None:
        return None
    if f.type == "json_schema":
        return f.schema
    return "json" if f.type == "json_object" else None


class _Result:
    """The response object, growing with the output (also the streamed snapshots)."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req = req
        self.id = "resp_" + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model
        self.thinking: list[str] = []
        self.text: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.reasoning_id = "rs_" + secrets.token_hex(8)
        self.message_id = "msg_" + secrets.token_hex(8)

    def reasoning_item(self) -> dict[str, Any]:
        text = "".join(self.thinking)
        return {
            "id": self.reasoning_id,
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": text}],
            "encrypted_content": text,
        }

    def text_part(self) -> dict[str, Any]:
        return {
            "type": "output_text",
            "text": "".join(self.text),
            "annotations": [],
            "logprobs": [],
        }

    def message_item(self, status: str = "completed") -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [self.text_part()] if status == "completed" else [],
        }

    def output(self) -> list[dict[str, Any]]:
        items = [self.reasoning_item()] if self.thinking else []
        return items + (self.calls if self.calls else [self.message_item()])

    def obj(self, status: str, done: core.Done | None = None) -> dict[str, Any]:
        r = self.req
        fmt = msgspec.to_builtins(r.text.format) if r.text and r.text.format else {"type": "text"}
        usage = None
        if done is not None:
            usage = {
                "input_tokens": done.prompt_eval_count,
                "output_tokens": done.eval_count,
                "total_tokens": done.prompt_eval_count + done.eval_count,
                "input_tokens_details": {"cached_tokens": done.prompt_eval_cached_count},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "completed_at": int(time.time()) if done is not None else None,
            "status": status,
            "incomplete_details": None,
            "model": self.model,
            "previous_response_id": None,
            "instructions": r.instructions or None,
            "output": self.output() if done is not None else [],
            "error": None,
            "tools": [msgspec.to_builtins(t) for t in r.tool_defs or []],
            "tool_choice": "auto",
            "truncation": r.truncation or "disabled",
            "parallel_tool_calls": True,
            "text": {"format": fmt},
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "reasoning": msgspec.to_builtins(r.reasoning) if r.reasoning else None,
            "usage": usage,
            "max_output_tokens": r.max_output_tokens,
            "max_tool_calls": None,
            "store": False,
            "background": False,
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }

    def add_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        items = [
            {
                "id": "fc_" + secrets.token_hex(8),
                "type": "function_call",
                "status": "completed",
                "call_id": c["id"],
                "name": c["function"]["name"],
                "arguments": c["function"]["arguments"],
            }
            for c in oa.tool_calls_out(calls)
        ]
        self.calls += items
        return items


async def responses(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    data, req = await oa.read_typed(request, ResponsesRequest, (400, "model is required"))
    model_name = req.model
    if req.previous_response_id:
        raise ApiError(
            400,
            "previous_response_id is not supported: this server stores no "
            "responses (send the whole conversation as input)",
        )
    messages = native_messages(req)
    if not messages:
        raise ApiError(400, "input is required")
    options: dict[str, Any] = {"temperature": 1.0 if req.temperature is None else req.temperature}
    if req.top_p is not None:
        options["top_p"] = req.top_p
    if req.max_output_tokens is not None:
        options["num_predict"] = req.max_output_tokens
    tools = [
        oa.function_tool(t.name, t.description, t.parameters) for t in req.tool_defs or []
    ] or None
    stream = req.stream is True
    started_job = await prepare.start_chat(
        request.app,
        prepare.Chat(
            model=model_name,
            messages=messages,
            tools=tools,
            options=options,
            format=_format(req),
            keep_alive=None,
            think=_think(req),
            stream=stream,
            started=started,
            ignored=oa.ignored(data, _IGNORED),
        ),
    )
    assert not isinstance(started_job, dict)
    result = _Result(req, model_name)
    async with started_job as job:
        if not stream:
            whole, done = await job.result()
            if whole.thinking:
                result.thinking.append(whole.thinking)
            result.text.append(whole.content)
            result.add_calls(whole.tool_calls)
            return await send_json(request, result.obj("completed", done))
        return await _stream(request, job, result)


async def _stream(
    request: web.Request, job: core.Generation, result: _Result
) -> web.StreamResponse:
    out = LazyStream.events(request)
    seq = 0
    index = 0  # output_index of the item being written
    state = {"reasoning": False, "message": False}

    async def event(name: str, body: dict[str, Any]) -> None:
        """Held: a delta's events go out in one write (out.flush() after it), with the next
        delta's when that one has already arrived (``Delta.more``)."""
        nonlocal seq
        await out.event(name, {"type": name, "sequence_number": seq, **body}, hold=True)
        seq += 1

    async def end_reasoning() -> None:
        nonlocal index
        if state["reasoning"]:
            state["reasoning"] = False
            text = "".join(result.thinking)
            await event(
                "response.reasoning_summary_text.done",
                {
                    "item_id": result.reasoning_id,
                    "output_index": index,
                    "summary_index": 0,
                    "text": text,
                },
            )
            await event(
                "response.output_item.done",
                {"output_index": index, "item": result.reasoning_item()},
            )
            index += 1

    async def end_message() -> None:
        nonlocal index
        if state["message"]:
            state["message"] = False
            ids = {"item_id": result.message_id, "output_index": index, "content_index": 0}
            await event(
                "response.output_text.done", {**ids, "text": "".join(result.text), "logprobs": []}
            )
            await event("response.content_part.done", {**ids, "part": result.text_part()})
            await event(
                "response.output_item.done", {"output_index": index, "item": result.message_item()}
            )
            index += 1

    try:
        async for ev in job.events():
            if not out.started:
                await event("response.created", {"response": result.obj("in_progress")})
                await event("response.in_progress", {"response": result.obj("in_progress")})
            if isinstance(ev, core.Done):
                await end_reasoning()
                if not result.calls and not state["message"] and not result.text:
                    state["message"] = True  # an empty answer is still one message
                    await event(
                        "response.output_item.added",
                        {"output_index": index, "item": result.message_item("in_progress")},
                    )
                await end_message()
                await event("response.completed", {"response": result.obj("completed", ev)})
                break
            if ev.thinking:
                if not state["reasoning"]:
                    state["reasoning"] = True
                    await event(
                        "response.output_item.added",
                        {
                            "output_index": index,
                            "item": {"id": result.reasoning_id, "type": "reasoning", "summary": []},
                        },
                    )
                result.thinking.append(ev.thinking)
                await event(
                    "response.reasoning_summary_text.delta",
                    {
                        "item_id": result.reasoning_id,
                        "output_index": index,
                        "summary_index": 0,
                        "delta": ev.thinking,
                    },
                )
            if ev.content and not result.calls:
                await end_reasoning()
                ids = {"item_id": result.message_id, "output_index": index, "content_index": 0}
                if not state["message"]:
                    state["message"] = True
                    await event(
                        "response.output_item.added",
                        {"output_index": index, "item": result.message_item("in_progress")},
                    )
                    await event(
                        "response.content_part.added",
                        {
                            **ids,
                            "part": {
                                "type": "output_text",
                                "text": "",
                                "annotations": [],
                                "logprobs": [],
                            },
                        },
                    )
                result.text.append(ev.content)
                await event(
                    "response.output_text.delta", {**ids, "delta": ev.content, "logprobs": []}
                )
            if ev.tool_calls:
                await end_reasoning()
                await end_message()
                for item in result.add_calls(ev.tool_calls):
                    ids = {"item_id": item["id"], "output_index": index}
                    await event(
                        "response.output_item.added",
                        {
                            "output_index": index,
                            "item": {**item, "status": "in_progress", "arguments": ""},
                        },
                    )
                    await event(
                        "response.function_call_arguments.delta",
                        {**ids, "delta": item["arguments"]},
                    )
                    await event(
                        "response.function_call_arguments.done",
                        {**ids, "arguments": item["arguments"]},
                    )
                    await event("response.output_item.done", {"output_index": index, "item": item})
                    index += 1
            if not ev.more:
                await out.flush()
            if out.gone:
                break
    except (ApiError, CorralError) as e:
        if not out.started:
            raise
        await event("error", {**openai_body(as_api_error(e))["error"]})
    return await out.finish()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)
