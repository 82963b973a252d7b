"""Native inference routes: POST /api/generate, /api/chat, /api/embed, /api/embeddings.

One request = validate (400s) -> the inference core (``prepare``: model, prompt, lease;
``inference``: the runner's events as Delta/Done) -> Ollama's NDJSON lines. Everything that
can fail before the first line fails with a real HTTP status; a failure after it is a final
``{"error": ...}`` line.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
from aiohttp import web

from corral.daemon.api import inference as core
from corral.daemon.api import options as opts
from corral.daemon.api import prepare
from corral.daemon.api.errors import ApiError
from corral.daemon.api.keys import SUPERVISOR
from corral.daemon.api.middleware import LOG_MODEL
from corral.daemon.api.responses import LazyStream, json_response, send_json
from corral.daemon.errors import CorralError
from corral.daemon.params import RequestOptions
from corral.daemon.timefmt import now_utc
from corral.runner import protocol

log = structlog.get_logger(__name__)


_enc = msgspec.json.Encoder()


# ---- NDJSON streaming ---------------------------------------------------------------------


def _stream_flag(value: bool | None) -> bool:
    return value is not False


def _metrics(done: core.Done) -> dict[str, Any]:
    return {
        "total_duration": done.total_duration,
        "load_duration": done.load_duration,
        "prompt_eval_count": done.prompt_eval_count,
        "prompt_eval_cached_count": done.prompt_eval_cached_count,
        "prompt_eval_duration": done.prompt_eval_duration,
        "eval_count": done.eval_count,
        "eval_duration": done.eval_duration,
    }


async def _drive(
    request: web.Request, job: core.Generation, stream: bool, chunk_line, final_obj
) -> web.StreamResponse:
    """Run ``job`` to the end: NDJSON lines when streaming (an error after the first line is a
    last ``{"error"}`` line), else one object. ``final_obj(done, whole)`` builds the last
    object; ``whole`` is the whole output (:meth:`Generation.result`), empty when streamed."""
    if not stream:
        whole, done = await job.result()
        return await send_json(request, final_obj(done, whole))
    out = LazyStream.ndjson(request)
    try:
        async for ev in job.events():
            if isinstance(ev, core.Done):
                await out.send(final_obj(ev, core.Delta()))
                break
            await out.write(chunk_line(ev), hold=ev.more)
            if out.gone:
                break
    except (ApiError, CorralError) as e:
        if not out.started:
            raise
        await out.send({"error": e.message})
    return await out.finish()


# ---- request set-up ------------------------------------------------------------------------------


async def read_request(
    request: web.Request,
    kind: type[Any],
    missing: tuple[int, str],
) -> tuple[Any, float | None]:
    """A native inference body decoded as ``kind`` -> (request, keep_alive seconds). Its model
    goes into the request log; an empty model is ``ApiError(*missing)`` (Ollama's text differs
    per route)."""
    req = opts.decode(await request.read(), kind)
    request[LOG_MODEL] = req.model
    if not req.model:
        raise ApiError(*missing)
    return req, opts.keep_alive(req.keep_alive)


_NOT_FOUND = (404, "model '' not found")


_REQUIRED = (400, "model is required")


def _logprob_dicts(entries: Sequence[protocol.TokenLogprob]) -> list[dict[str, Any]]:
    """Ollama's logprob items: ``bytes`` and ``top_logprobs`` left out when empty."""
    return [msgspec.to_builtins(e) for e in entries]


async def generate(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    app = request.app
    req, keep_alive = await read_request(request, opts.GenerateRequest, _NOT_FOUND)
    logprobs = prepare.check_logprobs(req.logprobs, req.top_logprobs)
    fmt = opts.parse_format(req.format)
    think = opts.parse_think(req.think)
    if req.raw and (req.template or req.system or req.context):
        raise ApiError(400, "raw mode does not support template, system, or context")
    images = opts.check_images(req.images)
    model = await core.resolve(app, req.model, style="quoted")
    if req.prompt == "" and keep_alive == 0:
        created = now_utc()
        await app[SUPERVISOR].unload(model.record)
        return json_response(
            {
                "model": req.model,
                "created_at": created,
                "response": "",
                "done": True,
                "done_reason": "unload",
            }
        )
    if "completion" not in model.capabilities:
        raise ApiError(400, f'"{req.model}" does not support generate')
    core.require(model, (["insert"] if req.suffix else []) + (["vision"] if images else []))
    think = prepare.resolve_think(model, think, req.model)
    options = RequestOptions.build(model.record.parameters, req.options)
    prepare.warn_ignored(req.model, opts.ignored_options(req.options))

    prompt = prepare.generate_prompt(
        model,
        req.prompt,
        suffix=req.suffix,
        system=req.system,
        template=req.template,
        raw=req.raw,
        context=req.context,
        think=think,
        n_images=len(images),
    )
    if req.debug_render_only:
        return json_response(
            {
                "model": req.model,
                "created_at": now_utc(),
                "response": "",
                "done": False,
                "_debug_info": prepare.debug_info(prompt or "", len(images)),
            }
        )
    stream = _stream_flag(req.stream)
    async with prepare.completion_job(
        app,
        model,
        options=options,
        keep_alive=keep_alive,
        started=started,
        prompt=prompt,
        context=req.context,
        fmt=fmt,
        stream=stream,
        thinking=think.enabled,
        shift=req.shift,
        truncate=req.truncate,
        logprobs=logprobs,
        images=images,
    ) as job:
        if prompt is None:
            return json_response(
                {
                    "model": req.model,
                    "created_at": now_utc(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                }
            )
        head = b'{"model":' + _enc.encode(req.model) + b',"created_at":"'

        def chunk_line(d: core.Delta) -> bytes:
            if not d.thinking and not d.logprobs:  # a token's usual frame: one bytes object
                return b'%b%b","response":%b,"done":false}' % (
                    head,
                    now_utc().encode(),
                    _enc.encode(d.content),
                )
            line = head + now_utc().encode() + b'","response":' + _enc.encode(d.content)
            if d.thinking:
                line += b',"thinking":' + _enc.encode(d.thinking)
            line += b',"done":false'
            if d.logprobs:
                line += b',"logprobs":' + _enc.encode(d.logprobs)
            return line + b"}"

        def final_obj(done: core.Done, whole: core.Delta) -> dict[str, Any]:
            obj: dict[str, Any] = {
                "model": req.model,
                "created_at": now_utc(),
                "response": whole.content,
            }
            if whole.thinking:
                obj["thinking"] = whole.thinking
            obj["done"] = True
            obj["done_reason"] = done.done_reason
            if not req.raw:
                obj["context"] = done.tokens
            obj.update(_metrics(done))
            if whole.logprobs:
                obj["logprobs"] = _logprob_dicts(whole.logprobs)
            return obj

        return await _drive(request, job, stream, chunk_line, final_obj)


async def chat(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    req, keep_alive = await read_request(request, opts.ChatRequest, _REQUIRED)
    logprobs = prepare.check_logprobs(req.logprobs, req.top_logprobs)
    fmt = opts.parse_format(req.format)
    think = opts.parse_think(req.think)
    messages = [prepare.message_dict(m) for m in req.messages or []]
    stream = _stream_flag(req.stream)
    started_job = await prepare.start_chat(
        request.app,
        prepare.Chat(
            model=req.model,
            messages=messages,
            tools=req.tools or None,
            options=req.options,
            format=fmt,
            keep_alive=keep_alive,
            think=think,
            stream=stream,
            started=started,
            shift=req.shift,
            truncate=req.truncate,
            logprobs=logprobs,
            debug_render_only=req.debug_render_only,
        ),
    )
    if isinstance(started_job, dict):
        return json_response(started_job)
    async with started_job as job:
        if job.body is None:
            return json_response(
                {
                    "model": req.model,
                    "created_at": now_utc(),
                    "message": {"role": "assistant", "content": ""},
                    "done_reason": "load",
                    "done": True,
                }
            )
        head = b'{"model":' + _enc.encode(req.model) + b',"created_at":"'

        def message(d: core.Delta) -> dict[str, Any]:
            msg: dict[str, Any] = {"role": "assistant", "content": d.content}
            if d.thinking:
                msg["thinking"] = d.thinking
            if d.tool_calls:
                msg["tool_calls"] = d.tool_calls
            return msg

        def chunk_line(d: core.Delta) -> bytes:
            if not d.thinking and not d.tool_calls and not d.logprobs:  # a token's usual frame
                return b'%b%b","message":{"role":"assistant","content":%b},"done":false}' % (
                    head,
                    now_utc().encode(),
                    _enc.encode(d.content),
                )
            line = (
                head
                + now_utc().encode()
                + b'","message":'
                + _enc.encode(message(d))
                + b',"done":false'
            )
            if d.logprobs:
                line += b',"logprobs":' + _enc.encode(d.logprobs)
            return line + b"}"

        def final_obj(done: core.Done, whole: core.Delta) -> dict[str, Any]:
            obj = {
                "model": req.model,
                "created_at": now_utc(),
                "message": message(whole),
                "done": True,
                "done_reason": done.done_reason,
            }
            if whole.logprobs:
                obj["logprobs"] = _logprob_dicts(whole.logprobs)
            return {**obj, **_metrics(done)}

        return await _drive(request, job, stream, chunk_line, final_obj)


# ---- /api/embed, /api/embeddings ----------------------------------------------------------


def _embed_inputs(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return value
    raise ApiError(400, "invalid input type")


async def embed(request: web.Request) -> web.Response:
    started = time.monotonic()
    req, keep_alive = await read_request(request, opts.EmbedRequest, _NOT_FOUND)
    inputs = _embed_inputs(req.input)
    model = await core.resolve(request.app, req.model, style="store")
    async with core.embedding(
        request.app,
        model,
        inputs,
        options=req.options,
        keep_alive=keep_alive,
        truncate=req.truncate,
    ) as (res, load):
        if not inputs:
            return await send_json(request, {"model": req.model, "embeddings": []})
        return await send_json(
            request,
            {
                "model": req.model,
                "embeddings": [core.shorten(v, req.dimensions) for v in res.embeddings],
                "total_duration": int((time.monotonic() - started) * 1e9),
                "load_duration": load,
                "prompt_eval_count": res.prompt_eval_count,
            },
        )


async def embeddings(request: web.Request) -> web.Response:
    req, keep_alive = await read_request(request, opts.EmbeddingsRequest, _REQUIRED)
    model = await core.resolve(request.app, req.model, style="store")
    inputs = [req.prompt] if req.prompt else []
    async with core.embedding(
        request.app, model, inputs, options=req.options, keep_alive=keep_alive, truncate=True
    ) as (res, _):
        return await send_json(request, {"embedding": res.embeddings[0] if res.embeddings else []})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings)
