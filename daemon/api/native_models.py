"""Native model-management routes: /, /api/version, tags, show, create, blobs, copy, delete,
pull, push.

Handlers read ``app[STORE]`` (and ``app[SUPERVISOR]`` when present, to unload a deleted or
replaced model without waiting for it, unless a model still in the store has the same weights:
a runner is keyed by its weights file, so it is that model's runner too and keeps running).
Bodies are decoded with msgspec into the Structs below: unknown fields are ignored, a wrong type
is a 400 naming the field, malformed JSON a 400.
Progress endpoints stream NDJSON (one compact object per line) unless ``"stream": false``; an
error before the first line gets a real status, a later one is a final ``{"error": ...}`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from aiohttp import web

from corral.daemon import gguf_info
from corral.daemon.api import auth
from corral.daemon.api import inference as core
from corral.daemon.api import options as opts
from corral.daemon.api.errors import ApiError
from corral.daemon.api.keys import STORE, SUPERVISOR
from corral.daemon.api.responses import LazyStream, json_response
from corral.daemon.errors import CorralError, NotFound
from corral.daemon.model_inputs import model_key
from corral.daemon.models import modelfile
from corral.daemon.models.registry import Registry
from corral.daemon.models.store import (
    ModelName,
    ModelRecord,
    ProgressFn,
    Store,
    parse_digest,
    parse_name,
)
from corral.daemon.timefmt import rfc3339
from corral.daemon.version import VERSION

log = structlog.get_logger(__name__)

# The registry client used by pull/push; tests put one with a loopback mapping here.
REGISTRY: web.AppKey[Registry] = web.AppKey("registry", Registry)


# ---- request bodies ---------------------------------------------------------------------------


class ModelRequest(msgspec.Struct):
    model: str = ""
    name: str = ""  # legacy alias of model
    verbose: bool = False
    system: str | None = None
    template: str | None = None
    options: dict[str, Any] | None = None
    insecure: bool = False
    stream: bool | None = None

    def target(self) -> str:
        return self.model or self.name


class CreateRequest(msgspec.Struct):
    model: str = ""
    name: str = ""
    from_: str | None = msgspec.field(default=None, name="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: str | None = None
    quantization: str | None = None
    modelfile: str | None = None  # legacy (<= v0.5.4) form
    stream: bool | None = None


class CopyRequest(msgspec.Struct):
    source: str = ""
    destination: str = ""


def decode_body(raw: bytes, kind: type[Any]) -> Any:
    """JSON body -> ``kind``; every failure is ApiError(400) (Go's rules: ``options.convert``)."""
    return opts.decode(raw, kind)


async def read_body(request: web.Request, kind: type[Any]) -> Any:
    return decode_body(await request.read(), kind)


# ---- response helpers -----------------------------------------------------------------------


Work = Callable[[Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


async def run_progress(request: web.Request, stream: bool | None, work: Work) -> web.StreamResponse:
    """Run ``work(progress)`` and answer with its progress as a stream or as the last object."""
    if stream is False:
        last: dict[str, Any] = {}

        async def keep(obj: dict[str, Any]) -> None:
            last.clear()
            last.update(obj)

        await work(keep)
        return json_response(last or {"status": "success"})
    out = LazyStream.ndjson(request)
    try:
        await work(out.send)
    except (ApiError, CorralError) as err:
        if not out.started:
            raise
        await out.send({"error": err.message})
    if not out.started:
        await out.send({"status": "success"})
    return await out.finish()


def _store(request: web.Request) -> Store:
    return request.app[STORE]


def _registry(request: web.Request) -> Registry:
    app = request.app
    if REGISTRY in app:
        return app[REGISTRY]
    return Registry(app[STORE])


_background: set[asyncio.Task[Any]] = set()


def _retire_soon(request: web.Request, record: ModelRecord) -> None:
    """``record`` left the store (deleted, or replaced by a create or a copy): its runner unloads
    as soon as it is idle, unless another model in the store uses the same weights (the same
    runner key), whose runner it is as well: then it stays and is shown under that model's
    name. Never waits for the unload."""
    supervisor = request.app.get(SUPERVISOR) if SUPERVISOR in request.app else None
    if supervisor is None or record.model_path is None:
        return
    key = model_key(record)
    heir = next(
        (r for r in _store(request).list() if r.model_path is not None and model_key(r) == key),
        None,
    )
    if heir is not None:
        supervisor.adopt(record, heir)
        return

    async def run() -> None:
        try:
            await supervisor.unload(record)
        except Exception as e:  # best effort
            log.warning("models.unload_failed", model=record.name, error=str(e))

    task = asyncio.get_running_loop().create_task(run())
    _background.add(task)
    task.add_done_callback(_background.discard)


def details_dict(record: ModelRecord, info: gguf_info.GGUFInfo | None = None) -> dict[str, Any]:
    """``details`` with ``context_length``/``embedding_length`` from the config blob, else from
    the GGUF (as Ollama reads them)."""
    d = msgspec.structs.asdict(record.details)
    ctx = record.config.context_length or (info.context_length if info is not None else None)
    emb = record.config.embedding_length or (info.embedding_length if info is not None else None)
    if ctx:
        d["context_length"] = ctx
    if emb:
        d["embedding_length"] = emb
    return d


# ---- handlers ----------------------------------------------------------------------------------


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": VERSION})


async def tags(request: web.Request) -> web.Response:
    records = await asyncio.to_thread(_store(request).list)
    models = []
    for r in (r for r in records if auth.may_use(request, r.name)):
        info, caps = await core.model_facts(r)
        details = details_dict(r, info) | {"parent_model": ""}  # as Ollama's list
        models.append(
            {
                "name": r.name,
                "model": r.name,
                "modified_at": rfc3339(r.modified_at),
                "size": r.size,
                "digest": r.digest,
                "details": details,
                "capabilities": caps,
            }
        )
    return json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    req = await read_body(request, ModelRequest)
    if not req.target():
        raise ApiError(400, "model is required")
    store = _store(request)
    name = parse_name(req.target())
    try:
        record = store.resolve(name)
    except NotFound:
        raise ApiError(404, f"model '{name.display}' not found") from None
    info, caps = await core.model_facts(record)
    params = dict(record.parameters)
    if req.options:
        params.update(req.options)
    system = req.system if req.system is not None else record.system
    body: dict[str, Any] = {}
    if record.license:
        body["license"] = "\n".join(record.license)
    body["modelfile"] = modelfile.render(record, system=req.system, options=req.options)
    body["parameters"] = modelfile.format_parameters(params)
    template = record.template
    if template is None:
        template = (info.chat_template if info is not None else None) or "{{ .Prompt }}"
    body["template"] = template
    if system:
        body["system"] = system
    if record.config.renderer:
        body["renderer"] = record.config.renderer
    if record.config.parser:
        body["parser"] = record.config.parser
    body["details"] = details_dict(record, info)
    if record.messages:
        body["messages"] = record.messages
    if info is not None:
        body["model_info"] = await asyncio.to_thread(
            gguf_info.model_info, info, verbose=req.verbose
        )
        body["tensors"] = gguf_info.tensor_list(info)
    else:
        body["model_info"] = {}
    if record.projectors:
        with contextlib.suppress(Exception):
            pinfo = await gguf_info.read_info_async(record.projectors[0])
            body["projector_info"] = gguf_info.model_info(pinfo)
    body["capabilities"] = caps
    body["modified_at"] = rfc3339(record.modified_at)
    if record.config.requires:
        body["requires"] = record.config.requires
    return json_response(body)


def _legacy_modelfile(req: CreateRequest) -> CreateRequest:
    """Map the legacy ``modelfile`` form onto the current one (``FROM @sha256:…`` = a blob)."""
    try:
        parsed = modelfile.parse(req.modelfile or "").create_request()
    except modelfile.ModelfileError as e:
        raise ApiError(400, str(e)) from None
    sources = parsed.pop("from", None)
    files: dict[str, str] | None = None
    adapters = source = None
    for i, value in enumerate([sources] if isinstance(sources, str) else sources or []):
        if value.startswith("@"):  # a blob: the model GGUF, then e.g. its vision projector
            files = (files or {}) | {"model.gguf" if i == 0 else f"model{i}.gguf": value[1:]}
        else:
            source = value
    if parsed.get("adapters"):
        adapters = {f"adapter{i}.gguf": a.lstrip("@") for i, a in enumerate(parsed["adapters"])}
    return msgspec.structs.replace(
        req,
        from_=source,
        files=files,
        adapters=adapters,
        template=parsed.get("template", req.template),
        system=parsed.get("system", req.system),
        license=parsed.get("license", req.license),
        messages=parsed.get("messages", req.messages),
        parameters=parsed.get("parameters", req.parameters),
    )


async def create(request: web.Request) -> web.StreamResponse:
    req = await read_body(request, CreateRequest)
    if req.modelfile and not req.from_ and not req.files:
        req = _legacy_modelfile(req)
    target = req.model or req.name
    parse_name(target)  # 400 before any streaming
    store = _store(request)
    replaced = store.resolve(target) if store.exists(target) else None

    async def pull_missing(name: ModelName, progress: ProgressFn | None) -> None:
        # As Ollama's parseFromModel: default registry options (CreateRequest has no insecure).
        await _as_ollama_fails(_registry(request).pull(name, insecure=False, progress=progress))

    async def work(progress: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        await store.create(
            target,
            from_=req.from_,
            files=req.files,
            adapters=req.adapters,
            template=req.template,
            system=req.system,
            parameters=req.parameters,
            messages=req.messages,
            license=req.license,
            quantize=req.quantize or req.quantization,
            progress=progress,
            pull=pull_missing,
        )
        if replaced is not None:
            _retire_soon(request, replaced)

    return await run_progress(request, req.stream, work)


async def head_blob(request: web.Request) -> web.Response:
    digest = parse_digest(request.match_info["digest"])
    if not _store(request).has_blob(digest):
        raise ApiError(404, f'blob "{digest}" not found')
    return web.Response(status=200)


async def post_blob(request: web.Request) -> web.Response:
    digest = parse_digest(request.match_info["digest"])
    store = _store(request)
    if store.has_blob(digest):
        return web.Response(status=200)
    written = await store.write_blob_stream(digest, request.content.iter_chunked(1 << 20))
    return web.Response(status=201 if written else 200)


async def copy(request: web.Request) -> web.Response:
    req = await read_body(request, CopyRequest)
    replaced = None
    store = _store(request)
    with contextlib.suppress(CorralError):  # an invalid name: copy says which one
        replaced = store.resolve(req.destination) if store.exists(req.destination) else None
    await store.copy(req.source, req.destination)
    if replaced is not None:
        _retire_soon(request, replaced)
    return web.Response(status=200)


async def delete(request: web.Request) -> web.Response:
    req = await read_body(request, ModelRequest)
    if not req.target():
        raise ApiError(400, "model is required")
    record = await _store(request).delete(req.target())
    _retire_soon(request, record)
    return web.Response(status=200)


async def _transfer(request: web.Request, op: str) -> web.StreamResponse:
    """/api/pull and /api/push: ``registry.<op>(name, insecure=, progress=)``, its progress
    streamed (:func:`run_progress`)."""
    req = await read_body(request, ModelRequest)
    if not req.target():
        raise ApiError(400, "model is required")
    name = parse_name(req.target())
    registry = _registry(request)

    async def work(progress: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        transfer = getattr(registry, op)(name, insecure=req.insecure, progress=progress)
        await (_as_ollama_fails(transfer) if op == "pull" else transfer)

    return await run_progress(request, req.stream, work)


async def _as_ollama_fails(pulling: Awaitable[Any]) -> None:
    """Await a pull; whatever fails in it (a model the registry lacks, an unreachable registry,
    a full disk) is a 500 with its text, as Ollama answers every error of PullModel (streamed
    before the first line, or with ``stream: false``)."""
    try:
        await pulling
    except CorralError as e:
        raise ApiError(500, e.message) from None


async def pull(request: web.Request) -> web.StreamResponse:
    return await _transfer(request, "pull")


async def push(request: web.Request) -> web.StreamResponse:
    return await _transfer(request, "push")


def add_routes(app: web.Application) -> None:
    """Register the model-management routes (GET routes also answer HEAD)."""
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/create", create)
    app.router.add_head("/api/blobs/{digest}", head_blob)
    app.router.add_post("/api/blobs/{digest}", post_blob)
    app.router.add_post("/api/copy", copy)
    app.router.add_delete("/api/delete", delete)
    app.router.add_post("/api/pull", pull)
    app.router.add_post("/api/push", push)
