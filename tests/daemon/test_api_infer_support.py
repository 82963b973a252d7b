"""Test doubles and fixtures for the inference API tests (no tests here).

* :class:`ScriptedRunner` speaks the runner protocol of docs/DESIGN.md with the protocol
  structs: completions through the request pipe (the ``Submit``/``Cancel`` lines the daemon's
  :class:`~corral.daemon.runners.RequestPipe` writes, answered with event-pipe lines -
  ``RelayStep``, ``Relay``, ``Refused`` - decoded and dispatched as a runner process's are),
  ``/embed``, ``/tokenize`` and ``/health`` over HTTP; it answers with a script the test sets
  and records every request.
* :class:`FakeSupervisor` has the ``Supervisor`` surface the API uses (``acquire`` -> a
  ``RunnerLease``: async context manager with the real ``RunnerClient``, n_ctx, load_duration,
  out_of_memory; ``unload``, ``ps``) and
  counts leases so tests can check each one is released exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import ollama
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from corral.daemon.api.app import make_app
from corral.daemon.api.errors import ApiError
from corral.daemon.config import Config, HostAddr
from corral.daemon.errors import CorralError
from corral.daemon.models.store import Store
from corral.daemon.params import RequestOptions
from corral.daemon.runner_client import RunnerClient, RunnerLease
from corral.daemon.runner_http import RunnerHTTP
from corral.daemon.runners import RequestPipe
from corral.daemon.ticket import CURRENT, Ticket
from corral.runner import protocol
from corral.scheduler import RunnerView, SchedulerSnapshot
from tests.daemon.registry_server import make_gguf
from tests.daemon.test_templates_library import CHATML, TOOLS_CHATML

# A thinking template as real ones are written: a message's thinking between <think> tags (the
# tags Ollama infers), and the prompt opening the thinking when think is on.
THINKER = """{{- range .Messages }}<|{{ .Role }}|>{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}
{{ end }}<|assistant|>{{ if .Think }}<think>{{ end }}"""  # noqa: E501 - the template verbatim


@dataclass
class Script:
    chunks: list[str] = field(default_factory=lambda: ["Hello", ",", " world"])
    done_reason: str = "stop"
    error_after: int | None = None  # send an error line after this many chunks
    status: int = 200  # answer /completion with this status and an error body
    status_error: str = "bad request"
    embed_status: int = 200
    embed_error: str = ""
    together: bool = False  # all lines in one write (the runner's reader fell behind)
    # the chunks as a function of the request (a model's answer depends on its prompt);
    # overrides ``chunks`` when set
    reply: Callable[[protocol.CompletionRequest], list[str]] | None = None


class ScriptedRunner:
    def __init__(self) -> None:
        self.script = Script()
        self.requests: list[protocol.CompletionRequest] = []
        self.embeds: list[protocol.EmbedRequest] = []
        self.cancels: list[int] = []  # ids of the Cancel lines received
        self.pipe = RequestPipe(self._received)  # the daemon's end of the request pipe
        self._jobs: dict[int, asyncio.Task[None]] = {}
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/embed", self.embed)
        app.router.add_post("/tokenize", self.tokenize)
        self.app = app

    def _received(self, data: bytes) -> None:
        """What the daemon wrote on the runner's stdin: whole request lines."""
        assert data.endswith(b"\n")
        for line in data.splitlines():
            msg = protocol.decode_pipe_request(line)
            if isinstance(msg, protocol.Cancel):
                self.cancels.append(msg.id)
                job = self._jobs.pop(msg.id, None)
                if job is not None:
                    job.cancel()
            else:
                self._jobs[msg.id] = asyncio.get_running_loop().create_task(self._answer(msg))

    def _send(self, *events: msgspec.Struct) -> None:
        """Event-pipe lines, written at once (one read on the daemon's side)."""
        data = b"".join(protocol.encode(ev) + b"\n" for ev in events)
        for line in data.splitlines():
            self.pipe.dispatch(protocol.decode_event(line))  # type: ignore[arg-type]

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(
            body=protocol.encode(protocol.Health(slots_total=1)), content_type="application/json"
        )

    async def _answer(self, msg: protocol.Submit) -> None:
        """The scripted answer to one Submit, as a runner writes it: a step's plain text as a
        RelayStep line, a chunk with logprobs, the done and an error as Relay lines."""
        req, rid = msg.request, msg.id
        self.requests.append(req)
        s = self.script
        try:
            await asyncio.sleep(0)  # the answer comes later than the request, as it would
            if s.status != 200:
                self._send(protocol.Refused(id=rid, status=s.status, error=s.status_error))
                return
            chunks = s.reply(req) if s.reply is not None else s.chunks
            probs = (
                [
                    protocol.TokenLogprob(token=c, logprob=-0.5 - i, bytes=list(c.encode()))
                    for i, c in enumerate(chunks)
                ]
                if req.logprobs
                else None
            )
            prompt_tokens = list(req.tokens or []) + list((req.prompt or "").encode())
            done = protocol.CompletionDone(
                content="" if req.stream else "".join(chunks),
                done_reason=s.done_reason,  # type: ignore[arg-type]
                prompt_eval_count=len(prompt_tokens),
                prompt_eval_duration=1000,
                eval_count=len(chunks),
                eval_duration=2000,
                tokens=prompt_tokens + list(range(len(chunks))),
                logprobs=None if req.stream else probs,
            )
            # the error after error_after chunks (a whole answer: instead of it)
            fails = s.error_after is not None and (not req.stream or s.error_after < len(chunks))
            lines: list[msgspec.Struct] = []
            for i, c in enumerate(chunks if req.stream else []):
                if fails and i == s.error_after:
                    break
                if probs:
                    chunk = protocol.CompletionChunk(content=c, logprobs=probs[i : i + 1])
                    lines.append(protocol.Relay(id=rid, event=chunk))
                else:
                    lines.append(protocol.RelayStep(ids=[rid], content=[c]))
            if fails:
                lines.append(
                    protocol.Relay(id=rid, event=protocol.CompletionError(error="runner exploded"))
                )
            else:
                lines.append(protocol.Relay(id=rid, event=done))
            if s.together:
                self._send(*lines)
                return
            for line in lines:
                self._send(line)
                await asyncio.sleep(0)
        finally:
            self._jobs.pop(rid, None)

    async def tokenize(self, request: web.Request) -> web.Response:
        """A byte tokenizer with a BOS token (id 1) when add_special."""
        req = msgspec.json.decode(await request.read(), type=protocol.TokenizeRequest)
        tokens = ([1] if req.add_special else []) + list(req.content.encode())
        return web.Response(
            body=protocol.encode(protocol.TokenizeResponse(tokens=tokens)),
            content_type="application/json",
        )

    async def embed(self, request: web.Request) -> web.Response:
        req = msgspec.json.decode(await request.read(), type=protocol.EmbedRequest)
        self.embeds.append(req)
        if self.script.embed_status != 200:
            return web.Response(
                body=protocol.encode(protocol.ErrorResponse(error=self.script.embed_error)),
                status=self.script.embed_status,
                content_type="application/json",
            )
        vecs = [[0.6, 0.8, 0.0, 0.0] for _ in req.input]
        return web.Response(
            body=protocol.encode(
                protocol.EmbedResponse(
                    embeddings=vecs, prompt_eval_count=sum(len(t) for t in req.input)
                )
            ),
            content_type="application/json",
        )


class Lease:
    """A :class:`RunnerLease` on the scripted runner (the real client, over HTTP)."""

    def __init__(self, sup: FakeSupervisor) -> None:
        self.sup = sup
        self.runner = RunnerClient(sup.http, sup.pipe)
        self.runner_id = "r1"
        self.n_ctx = 4096
        self.load_duration = 0.001
        self.released = 0
        self.out_of_memory_reports = 0

    def out_of_memory(self) -> None:
        self.out_of_memory_reports += 1

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.sup.hold_release is not None:  # a test holds the slot after the answer
            await self.sup.hold_release.wait()
        self.released += 1
        self.sup.active -= 1


class FakeSupervisor:
    def __init__(self, http: RunnerHTTP, pipe: RequestPipe) -> None:
        self.http = http  # the scripted runner's connections
        self.pipe = pipe  # and its request pipe
        self.acquired: list[tuple[str, RequestOptions, float | None, str]] = []
        self.tickets: list[Ticket | None] = []  # who asked, per acquire
        self.leases: list[Lease] = []
        self.unloaded: list[str] = []
        self.adopted: list[tuple[str, str]] = []  # (model gone, model with its weights)
        self.fail: ApiError | CorralError | None = None
        self.active = 0
        self.runners: list[RunnerView] = []  # what snapshot() reports (/api/ps)
        self.records: dict[str, Any] = {}
        self.hold_release: asyncio.Event | None = None  # set: leases may end

    async def acquire(
        self,
        model: Any,
        options: RequestOptions,
        keep_alive: float | None,
        kind: str = "completion",
    ) -> RunnerLease:
        if not isinstance(options, RequestOptions):  # the real one reads typed fields only
            raise TypeError(f"acquire takes RequestOptions, got {type(options).__name__}")
        if self.fail is not None:
            raise self.fail
        self.acquired.append((model.name, options, keep_alive, kind))
        self.tickets.append(CURRENT.get())
        lease = Lease(self)
        self.leases.append(lease)
        self.active += 1
        return lease

    async def unload(self, model: Any) -> None:
        self.unloaded.append(model.name)

    def adopt(self, gone: Any, heir: Any) -> None:
        self.adopted.append((gone.name, heir.name))

    def snapshot(self) -> SchedulerSnapshot:
        return SchedulerSnapshot(
            runners=tuple(self.runners),
            waiting={},
            queued=0,
            in_flight=0,
            max_loaded=3,
            gpus=(),
            host_total=0,
            host_free=0,
            host_reserved=0,
            reclaiming=(),
        )

    def now(self) -> float:
        return 1000.0

    def record(self, view: RunnerView) -> Any:
        return self.records.get(view.model_key)

    def facts(self, model_key: str) -> None:
        return None

    def gpu_name(self, gpu_id: str) -> str:
        return gpu_id

    def policy_for(self, name: str) -> dict[str, Any]:
        return {}

    def runner_process(self, runner_id: str) -> None:
        return None


@dataclass
class Env:
    url: str
    runner: ScriptedRunner
    supervisor: FakeSupervisor
    store: Store
    session: aiohttp.ClientSession
    ollama: ollama.AsyncClient
    openai: openai.AsyncOpenAI
    app: web.Application

    async def post(
        self,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, str]:
        data = raw if raw is not None else msgspec.json.encode(body)
        async with self.session.post(self.url + path, data=data) as r:
            text = await r.text()
            try:
                parsed = msgspec.json.decode(text) if text else None
            except msgspec.DecodeError:
                parsed = None
            return r.status, parsed, text

    async def lines(self, path: str, body: Any) -> tuple[int, list[dict], str]:
        async with self.session.post(self.url + path, data=msgspec.json.encode(body)) as r:
            text = await r.text()
            assert "\n\n" not in text and not text.startswith("\n")
            return (
                r.status,
                [msgspec.json.decode(x) for x in text.splitlines()],
                r.headers.get("Content-Type", ""),
            )

    def assert_released(self) -> None:
        assert all(lease.released == 1 for lease in self.supervisor.leases)
        assert self.supervisor.active == 0


async def _files(store: Store, path: Path) -> dict[str, str]:
    layer = await store.write_blob_bytes(path.read_bytes())
    return {"model.gguf": layer.digest}


@contextlib.asynccontextmanager
async def make_env(
    tmp_path: Path, config: Config | None = None, **app_kwargs: Any
) -> AsyncIterator[Env]:
    """The daemon's app over a scripted runner with the test models in its store; ``config``
    and ``app_kwargs`` (``make_app``'s keywords) vary it."""
    store = Store(tmp_path / "models")
    plain = make_gguf(tmp_path / "plain.gguf")
    emb = make_gguf(tmp_path / "emb.gguf", embedding=True, seed=1)
    await store.create(
        "qwen",
        files=await _files(store, plain),
        template=TOOLS_CHATML,
        parameters={"temperature": 0.1, "stop": ["<|im_end|>"]},
    )
    await store.create(
        "chatml", files=await _files(store, plain), template=CHATML, system="You are terse."
    )
    await store.create("plain", files=await _files(store, plain))
    await store.create("thinker", files=await _files(store, plain), template=THINKER)
    await store.create("embedder", files=await _files(store, emb))
    runner = ScriptedRunner()
    runner_srv = TestServer(runner.app)
    await runner_srv.start_server()
    http = RunnerHTTP("127.0.0.1", runner_srv.port)
    sup = FakeSupervisor(http, runner.pipe)
    config = config or Config(host=HostAddr(host="127.0.0.1", port=11434))
    app = make_app(config, store, sup, **app_kwargs)  # type: ignore[arg-type]
    srv = TestServer(app)
    await srv.start_server()
    client_session = aiohttp.ClientSession()
    url = str(srv.make_url("")).rstrip("/")
    oc = ollama.AsyncClient(host=url)
    oa = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    try:
        yield Env(url, runner, sup, store, client_session, oc, oa, app)
    finally:
        await oa.close()
        await oc.close()
        await client_session.close()
        await srv.close()
        http.close()
        await runner_srv.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with make_env(tmp_path) as e:
        yield e
