"""How a generating request becomes a :class:`~corral.daemon.api.inference.Generation`: the
checks every route shares (think, logprobs, capabilities), the prompt (Modelfile SYSTEM and
MESSAGEs, images as ``[img-N]`` tags, the template), the slot (``Supervisor.acquire``: 503 queue
full, 500 load failure), the chat history cut to the slot (:mod:`corral.daemon.prompt.history`)
and the runner's request (``format_after`` for a grammar after the thinking).

:func:`start_chat` takes a :class:`Chat` (every chat route builds one); /api/generate and
/v1/completions call :func:`generate_prompt` and :func:`completion_job` themselves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from aiohttp import web

from corral.daemon import gguf_info, model_inputs
from corral.daemon.api import auth
from corral.daemon.api import options as opts
from corral.daemon.api.errors import ApiError
from corral.daemon.api.inference import Generation, Model, require, resolve
from corral.daemon.api.keys import METRICS, SUPERVISOR
from corral.daemon.params import RequestOptions
from corral.daemon.prompt import templates, toolcalls
from corral.daemon.prompt.history import ChatHistory
from corral.daemon.prompt.thinking import NO_THINK, Think, ThinkingSplitter
from corral.daemon.runner_client import RunnerLease
from corral.daemon.timefmt import now_utc
from corral.runner import protocol

log = structlog.get_logger(__name__)


def resolve_think(model: Model, think: Think, name: str, *, relaxed: bool = False) -> Think:
    """The request's ``think`` against the model (Ollama 0.33): a thinking-capable model thinks
    when ``think`` is unset (it becomes set: templates see ``IsThinkSet``); asking a model
    without the capability to think is a 400, or (``relaxed``, the Anthropic route, whose
    clients send ``thinking`` to any model) quietly off."""
    if "thinking" in model.capabilities:
        return think if think.is_set else Think(True, "", True)
    if think.enabled:
        if relaxed:
            return NO_THINK
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
) -> AsyncIterator[Generation]:
    """Acquire a slot for ``model`` and yield the :class:`Generation` (load-only when ``prompt`` is
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
            try:
                fitted = await history.fit(lease.n_ctx, lambda text: count_tokens(lease, text))
            except templates.TemplateError as e:
                raise ApiError(500, str(e)) from None
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
        job = Generation(
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
    think: Think = NO_THINK,
    status: int = 500,
) -> str:
    try:
        return renderer.render(
            messages,
            tools,
            prompt=prompt,
            suffix=suffix,
            think=think.enabled,
            think_level=think.level,
            is_think_set=think.is_set,
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
    think: Think = NO_THINK,
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


def debug_info(prompt: str, n_images: int) -> dict[str, Any]:
    """``_debug_info`` of a ``_debug_render_only`` answer: the prompt and the request's images
    in it (Ollama's ``len(media)``)."""
    return {"rendered_template": prompt, "image_count": n_images}


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


@dataclass(frozen=True, slots=True)
class Chat:
    """A chat request as every chat route (native, OpenAI, Anthropic, Responses) hands it to
    :func:`start_chat`, its fields already decoded and typed by the route."""

    model: str
    messages: list[dict]
    started: float  # time.monotonic() when the request arrived
    tools: list[dict] | None = None
    options: dict[str, Any] | None = None  # the request's, merged with the model's here
    format: Any = None
    keep_alive: float | None = None
    think: Think = NO_THINK
    stream: bool = True
    shift: bool | None = None
    truncate: bool | None = None
    logprobs: Logprobs = Logprobs()
    debug_render_only: bool = False
    relaxed_think: bool = False  # thinking asked of a model without it: off, not a 400
    ignored: Sequence[str] = ()  # fields the route does not honour (warned about)


async def start_chat(
    app: web.Application, chat: Chat
) -> contextlib.AbstractAsyncContextManager[Generation] | dict[str, Any]:
    """Validate and resolve a chat; returns the unload or ``_debug_render_only`` reply (a
    dict) or the generation's context (:func:`completion_job`)."""
    model_name, messages, tools = chat.model, chat.messages, chat.tools
    model = await resolve(app, model_name, style="quoted")
    if not messages and chat.keep_alive == 0:
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
    think = resolve_think(model, chat.think, model_name, relaxed=chat.relaxed_think)
    messages, images = tag_images(messages)
    merged = RequestOptions.build(model.record.parameters, chat.options)
    warn_ignored(model_name, [*chat.ignored, *opts.ignored_options(chat.options)])
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
    if chat.debug_render_only:
        return {
            "model": model_name,
            "created_at": now_utc(),
            "message": {"role": "", "content": ""},
            "done": False,
            "_debug_info": debug_info(prompt or "", len(images)),
        }
    return completion_job(
        app,
        model,
        options=merged,
        keep_alive=chat.keep_alive,
        started=chat.started,
        prompt=prompt,
        fmt=chat.format,
        stream=chat.stream,
        thinking=think.enabled,
        tools=tools,
        renderer=renderer,
        shift=chat.shift,
        truncate=chat.truncate,
        history=history,
        logprobs=chat.logprobs,
        images=images,
    )


# ---- the runner's context -------------------------------------------------------------------


async def count_tokens(lease: RunnerLease, text: str) -> int:
    """The runner's token count for ``text`` as ``/completion`` would tokenize it (BOS added,
    special tokens parsed). One HTTP round trip."""
    return len(await lease.runner.tokenize(text))


async def image_tokens_of(model: Model) -> int:
    """The context positions one image takes with ``model``'s projector
    (:func:`model_inputs.image_tokens`); Ollama's 768 when the projector cannot be read (the
    runner then fails to load it anyway). 0 without a projector."""
    if not model.record.projectors:
        return 0
    try:
        info = await gguf_info.read_info_async(model.record.projectors[0])
    except Exception as e:  # an unreadable projector fails later, in the runner
        log.warning("api.projector_unreadable", model=model.record.name, error=str(e))
        return model_inputs.OLLAMA_IMAGE_TOKENS
    return model_inputs.image_tokens(info)
