"""The HTTP API against hostile and sloppy clients: every route, every kind of bad body.

The app is the real one (``make_app``) over the real ``Supervisor`` with FakeEngine runner
processes and a temp store holding the tiny llama. After each bad request: a 4xx (never 5xx)
with a non-empty error message in the route's shape (``{"error": str}`` natively, OpenAI's
object under /v1), the store's file tree unchanged, nothing in flight or queued in the
supervisor, and the server still answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import ollama
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings

from corral.daemon.api.app import make_app
from corral.daemon.api.limits import GuardedRunner
from corral.daemon.api.native_models import REGISTRY
from corral.daemon.config import Config, HostAddr, SimulatedGpu
from corral.daemon.gpu import SimulatedProbe
from corral.daemon.models.registry import Registry
from corral.daemon.models.store import Store
from corral.daemon.supervisor import Supervisor
from tests.daemon.test_api_infer_support import THINKER
from tests.daemon.test_store import tree
from tests.daemon.test_templates_library import TOOLS_CHATML

GiB = 1 << 30
SAFETY = float(os.environ.get("TEST_SAFETY", "30"))
TINY = "tiny"  # TOOLS_CHATML template: completion + tools
THINKING = "thinker"  # THINKER template: completion + thinking
DIGEST0 = "sha256:" + "0" * 64
NULL = "<the JSON body null>"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "description": "The city"}},
        },
    },
}


class GuardedTestServer(TestServer):
    """aiohttp's TestServer with ``serve``'s runner (connections guarded, api/limits.py)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return GuardedRunner(self.app, **kwargs)


@dataclass
class Env:
    root: Path
    store: Store
    sup: Supervisor
    client: TestClient

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    async def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, str, Any, str]:
        """-> (status, text, parsed JSON or None, content type)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        async with self.client.request(
            method, path, data=data, headers={"Content-Type": "application/json"}
        ) as r:
            text = await r.text()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = None
            return r.status, text, parsed, r.headers.get("Content-Type", "")

    async def idle(self) -> None:
        """Nothing granted, nothing queued (waits for releases the API already triggered)."""

        def quiet() -> bool:
            snap = self.sup.snapshot()
            return snap.in_flight == 0 and snap.queued == 0 and not self.sup._leases

        await asyncio.wait_for(self.sup.wait_until(quiet), SAFETY)

    async def alive(self) -> None:
        status, _, body, _ = await self.call("GET", "/api/version")
        assert status == 200 and "version" in body


def config() -> Config:
    return Config(
        host=HostAddr(host="127.0.0.1", port=11434),
        runner_engine="fake",
        simulate_gpus=(SimulatedGpu(id="0", total=24 * GiB, free=24 * GiB, name="Sim 24G"),),
        fake_knobs={"load_time": 0.0, "tokens_per_second": 5000.0},
        keep_alive=300.0,
        load_timeout=20.0,
        max_queue=8,
    )


@contextlib.asynccontextmanager
async def open_env(tmp_path: Path, tiny_gguf: Path, cfg: Config) -> AsyncIterator[Env]:
    """The real app over a real supervisor with FakeEngine runners and a store holding TINY and
    THINKING, served on loopback as ``serve`` serves it (:class:`GuardedTestServer`)."""
    root = tmp_path / "models"
    store = Store(root)
    layer = await store.write_blob_bytes(tiny_gguf.read_bytes())
    await store.create(TINY, files={"tiny.gguf": layer.digest}, template=TOOLS_CHATML)
    await store.create(THINKING, files={"tiny.gguf": layer.digest}, template=THINKER)
    sup = Supervisor(
        cfg,
        store,
        probe=SimulatedProbe(cfg.simulate_gpus, host=(64 * GiB, 48 * GiB)),
        stop_grace=2.0,
        drain_timeout=1.0,
    )
    await sup.start()
    app = make_app(cfg, store, sup)
    # Pulls (e.g. a create `from` a model that isn't local) go to a closed loopback port, never
    # off this machine.
    app[REGISTRY] = Registry(store, base_url_for=lambda name: "http://127.0.0.1:9")
    client = TestClient(GuardedTestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Env(root, store, sup, client)
    finally:
        await client.close()
        await asyncio.wait_for(sup.close(), SAFETY)


@pytest.fixture
async def env(tmp_path: Path, tiny_gguf: Path) -> AsyncIterator[Env]:
    async with open_env(tmp_path, tiny_gguf, config()) as e:
        yield e


# ---- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    body: Any = None  # JSON-encoded unless raw is given
    status: int | None = None  # exact expected status; None = any 4xx
    error: str | None = None  # exact expected message
    raw: bytes | None = None
    ok: bool = False  # a valid (if odd) request: 2xx is right too, 5xx never

    def id(self) -> str:
        shown = self.raw.decode(errors="replace") if self.raw is not None else json.dumps(self.body)
        return f"{self.method} {self.path} {shown[:70]}"


NATIVE_JSON = [
    ("POST", "/api/generate"),
    ("POST", "/api/chat"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("POST", "/api/show"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
]
OPENAI_JSON = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
]

# a valid base body per route; field cases replace one field of it
BASE: dict[str, dict[str, Any]] = {
    "/api/generate": {
        "model": TINY,
        "prompt": "hi",
        "stream": False,
        "options": {"num_predict": 2},
    },
    "/api/chat": {
        "model": TINY,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"num_predict": 2},
    },
    "/api/embed": {"model": TINY, "input": "hi"},
    "/api/embeddings": {"model": TINY, "prompt": "hi"},
    "/api/show": {"model": TINY},
    "/api/create": {"model": "new", "from": TINY, "stream": False},
    "/api/copy": {"source": TINY, "destination": "copy"},
    "/api/delete": {"model": TINY},
    "/api/pull": {"model": "nope", "stream": False},
    "/api/push": {"model": "ns/nope", "stream": False},
    "/v1/chat/completions": {
        "model": TINY,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    },
    "/v1/completions": {"model": TINY, "prompt": "hi", "max_tokens": 2},
    "/v1/embeddings": {"model": TINY, "input": "hi"},
}
METHOD = dict((p, m) for m, p in NATIVE_JSON + OPENAI_JSON)

BAD_NAMES = [
    "../x",
    "a/../../b",
    "/abs",
    "with space",
    "x" * 300,
    "a//b",
    ".",
    "..",
    "sha256:" + "0" * 64 + "/../x",
    "name\x00nul",
    "ünïcode",
    "a:b:c",
    "-lead",
]
WRONG_TYPES: list[Any] = [5, 1.5, True, [], {}, ["x"], {"a": 1}]
HUGE = [10**30, -(10**30), 1e308, -1e308, 2**63, 2**64]


def body_cases() -> list[Case]:
    cases = []
    for method, path in NATIVE_JSON + OPENAI_JSON:
        cases.append(
            Case(
                method,
                path,
                raw=b"",
                status=400,
                error=None if path.startswith("/v1/") else "missing request body",
            )
        )
        for raw in (
            b"   \n",
            b"{not json",
            b'{"model": "tiny"',
            b"\xff\xfe",
            b'{"model": "t"}}',
            b"[]",
            b'["model"]',
            b'"model"',
            b"42",
            b"true",
            b"NaN",
            b"Infinity",
            b'{"model": NaN}',
            b'{"model": "tiny", "prompt": "\\ud800"}',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
            b'{"model": "tiny", "options": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            b"1" * 100_000,
        ):
            cases.append(Case(method, path, raw=raw))
    return cases


def _route_fields(path: str) -> list[str]:
    return [k for k in BASE[path] if k not in ("stream",)] + {
        "/api/generate": [
            "suffix",
            "system",
            "template",
            "context",
            "raw",
            "format",
            "keep_alive",
            "images",
            "think",
            "truncate",
            "shift",
        ],
        "/api/chat": ["tools", "format", "keep_alive", "think", "truncate", "shift"],
        "/api/embed": ["truncate", "dimensions", "keep_alive", "options"],
        "/api/embeddings": ["keep_alive", "options"],
        "/api/show": ["verbose", "system", "options"],
        "/api/create": [
            "files",
            "adapters",
            "template",
            "system",
            "license",
            "parameters",
            "messages",
            "quantize",
        ],
        "/api/copy": [],
        "/api/delete": [],
        "/api/pull": ["insecure"],
        "/api/push": ["insecure"],
        "/v1/chat/completions": [
            "tools",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "response_format",
            "reasoning_effort",
            "stream_options",
            "frequency_penalty",
            "presence_penalty",
        ],
        "/v1/completions": ["suffix", "temperature", "top_p", "seed", "stop", "stream_options"],
        "/v1/embeddings": ["dimensions", "encoding_format"],
    }[path]


# values that are valid for a field of that name (a wrong-type case must not be one of them)
ACCEPTS: dict[str, Callable[[Any], bool]] = {
    "format": lambda v: v is None or v == "" or v == "json" or isinstance(v, dict),
    "keep_alive": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "think": lambda v: isinstance(v, bool),
    "input": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "license": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "stop": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "seed": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "temperature": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "top_p": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "frequency_penalty": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "presence_penalty": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "max_tokens": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "dimensions": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "verbose": lambda v: isinstance(v, bool),
    "insecure": lambda v: isinstance(v, bool),
    "raw": lambda v: isinstance(v, bool),
    "truncate": lambda v: isinstance(v, bool),
    "shift": lambda v: isinstance(v, bool),
    "tools": lambda v: v == [] or v == {},
    "messages": lambda v: False,
    "context": lambda v: v == [],
    "images": lambda v: v == [],
    "options": lambda v: isinstance(v, dict),
    "parameters": lambda v: v == {},
    "files": lambda v: v == {},
    "adapters": lambda v: v == {},
    "response_format": lambda v: True,
    "stream_options": lambda v: True,
    "reasoning_effort": lambda v: False,
}


# wrong for most routes, right for these
VALID_HERE = {
    ("/api/create", "messages", "[]"),
    ("/api/create", "parameters", '{"a": 1}'),
    ("/api/chat", "messages", "[]"),
    ("/api/create", "license", '["x"]'),
    ("/v1/completions", "prompt", '["x"]'),
}


def field_cases() -> list[Case]:
    """Each field of each route with each wrong-typed value."""
    cases = []
    for path, base in BASE.items():
        for key in _route_fields(path):
            for value in WRONG_TYPES + ["not-a-valid-value"]:
                if ACCEPTS.get(key, lambda v: False)(value):
                    continue
                if isinstance(value, str) and key in (
                    "prompt",
                    "system",
                    "suffix",
                    "template",
                    "input",
                    "encoding_format",
                    "quantize",
                    "license",
                    "stop",
                    "model",
                    "source",
                    "destination",
                    "from",
                ):
                    continue  # a string is the right type there (names are below)
                if path == "/api/pull" and key == "model":
                    continue  # a valid-typed name would reach the network
                if (path, key, json.dumps(value)) in VALID_HERE:
                    continue
                cases.append(Case(METHOD[path], path, {**base, key: value}))
    return cases


def value_cases() -> list[Case]:
    g, c, e = BASE["/api/generate"], BASE["/api/chat"], BASE["/api/embed"]
    oc, ocmp, oe = (BASE["/v1/chat/completions"], BASE["/v1/completions"], BASE["/v1/embeddings"])
    cases = []
    # unknown model / invalid names on every route that takes one
    for path, key in [
        ("/api/generate", "model"),
        ("/api/chat", "model"),
        ("/api/embed", "model"),
        ("/api/embeddings", "model"),
        ("/api/show", "model"),
        ("/api/create", "model"),
        ("/api/create", "from"),
        ("/api/copy", "source"),
        ("/api/copy", "destination"),
        ("/api/delete", "model"),
        ("/api/pull", "model"),
        ("/api/push", "model"),
        ("/v1/chat/completions", "model"),
        ("/v1/completions", "model"),
        ("/v1/embeddings", "model"),
    ]:
        names = BAD_NAMES + (
            []
            if key in ("destination",) or path in ("/api/pull", "/api/push")
            else ["unknown-model"]
        )
        if path == "/api/create" and key == "model":
            names = BAD_NAMES
        if path == "/api/create" and key == "from":
            names = (
                BAD_NAMES  # an unknown `from` is pulled: see test_create_from_unreachable_registry
            )
        for name in names:
            cases.append(Case(METHOD[path], path, {**BASE[path], key: name}))
    # options: wrong types, huge numbers, negative load sizes, NaN-ish values
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings"):
        base = BASE[path]
        for opt in (
            {"num_ctx": "big"},
            {"num_predict": "3"},
            {"temperature": "hot"},
            {"stop": "x"},
            {"stop": [1]},
            {"use_mmap": "yes"},
            {"num_ctx": True},
            {"top_k": {}},
            {"seed": []},
            {"num_gpu": "all"},
            *({"num_ctx": v} for v in HUGE),
            *({"num_batch": v} for v in HUGE),
            *({"num_gpu": v} for v in HUGE),
            *({"num_thread": v} for v in HUGE),
            *({"main_gpu": v} for v in HUGE),
            *({"seed": v} for v in HUGE),
            *({"num_predict": v} for v in HUGE),
            *({"top_k": v} for v in HUGE),
        ):
            cases.append(Case(METHOD[path], path, {**base, "options": opt}, 400))
        for key, number in (("use_mmap", 1), ("numa", 0), ("use_mlock", 1.0)):  # Go: a bool
            cases.append(
                Case(
                    METHOD[path],
                    path,
                    {**base, "options": {key: number}},
                    400,
                    f'option "{key}" must be of type boolean',
                )
            )
        for key in ("num_ctx", "num_batch", "num_gpu", "num_thread", "main_gpu", "seed", "top_k"):
            for v in (2**62, -(2**62), -1, 0, 1.9):
                cases.append(
                    Case(
                        METHOD[path], path, {**base, "options": {"num_predict": 2, key: v}}, ok=True
                    )
                )
        for raw_opt in (
            b'{"num_ctx": NaN}',
            b'{"temperature": Infinity}',
            b'{"seed": -Infinity}',
            b'{"num_ctx": 1e999}',
            b'{"top_p": -1e999}',
        ):
            model = json.dumps(base["model"])
            cases.append(
                Case(
                    METHOD[path],
                    path,
                    raw=b'{"model": ' + model.encode() + b', "options": ' + raw_opt + b"}",
                )
            )
    # keep_alive
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings"):
        for ka, err in (
            ("300", 'time: missing unit in duration "300"'),
            ("abc", 'time: invalid duration "abc"'),
            (True, "Unsupported type: 'bool'"),
            ({}, None),
            ([], None),
            ("5 m", None),
            ("1e400h", None),
            ("9999999h", None),
        ):
            cases.append(Case(METHOD[path], path, {**BASE[path], "keep_alive": ka}, 400, err))
        cases.append(Case(METHOD[path], path, raw=b'{"model": "tiny", "keep_alive": NaN}'))
    # format
    for path, base in (("/api/generate", g), ("/api/chat", c)):
        for fmt in ("xml", 5, True, ["json"], "JSON"):
            cases.append(Case("POST", path, {**base, "format": fmt}))
    # think
    for path, base in (("/api/generate", g), ("/api/chat", c)):
        for think in ("huge", 1, [], {}, True):
            cases.append(Case("POST", path, {**base, "think": think}))  # tiny cannot think
    # messages of the wrong shape / role
    for msgs in (
        [{"role": 5, "content": "x"}],
        [{"role": "user", "content": 5}],
        ["hi"],
        [None],
        [[]],
        {"role": "user"},
        "hi",
        [{"role": "user", "content": "x", "images": ["not base64!"]}],
        [{"role": "user", "content": "x", "images": "aGk="}],
        [{"role": "user", "content": "x", "images": [5]}],
        [{"role": "user", "content": "x", "tool_calls": "call"}],
        [{"role": "user", "content": "x", "tool_calls": [5]}],
        [{"role": "assistant", "tool_calls": [{"function": 5}]}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "x"}}]}],
        [{"role": "user", "content": {"text": "x"}}],
    ):
        cases.append(Case("POST", "/api/chat", {**c, "messages": msgs}))
    # tools of the wrong shape
    for tools in (
        "tool",
        5,
        [5],
        ["x"],
        [[]],
        {"type": "function"},
        [{"type": "function", "function": "f"}],
        [{"type": "function", "function": {"name": 5}}],
        [{"type": "function", "function": {"parameters": "x"}}],
    ):
        cases.append(Case("POST", "/api/chat", {**c, "tools": tools}))
        cases.append(Case("POST", "/v1/chat/completions", {**oc, "tools": tools}))
    # images that are not base64 (generate)
    for images in (["not base64!"], ["aGk"], ["data:image/png;base64,aGk="], [5], "aGk=", [None]):
        cases.append(Case("POST", "/api/generate", {**g, "images": images}))
    # generate: raw + system, context of the wrong shape, template errors
    cases += [
        Case(
            "POST",
            "/api/generate",
            {**g, "raw": True, "system": "s"},
            400,
            "raw mode does not support template, system, or context",
        ),
        Case("POST", "/api/generate", {**g, "context": ["a"]}),
        Case("POST", "/api/generate", {**g, "context": [1.5]}),
        Case("POST", "/api/generate", {**g, "context": [2**70]}),
        Case("POST", "/api/generate", {**g, "context": [-1]}),
        Case("POST", "/api/generate", {**g, "template": "{{ .Prompt "}),
        Case("POST", "/api/generate", {**g, "template": '{{ template "x" }}'}),
        Case("POST", "/api/generate", {**g, "suffix": "after"}),
    ]  # no insert capability
    # embed inputs
    for inp in (5, [5], [["x"]], {"a": "b"}, ["x", None], True):
        cases.append(Case("POST", "/api/embed", {**e, "input": inp}, 400, "invalid input type"))
    for dims in ("3", 1.5, 2**70):
        cases.append(Case("POST", "/api/embed", {**e, "dimensions": dims}, 400))
    cases.append(Case("POST", "/api/embed", {**e, "dimensions": -1}, ok=True))
    # OpenAI shapes
    for msgs in (
        [],
        "hi",
        [5],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "bogus"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}
                ],
            }
        ],
        [{"role": "user", "content": [5]}],
        [{"role": "user", "content": None}],
        [{"role": "assistant", "content": None, "tool_calls": "x"}],
        [{"role": "assistant", "content": None, "tool_calls": [5]}],
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
            }
        ],
        [{"role": "assistant", "content": None, "tool_calls": [{"function": "f"}]}],
        [{"role": ["user"], "content": "x"}],
    ):
        cases.append(Case("POST", "/v1/chat/completions", {**oc, "messages": msgs}))
    for extra in (
        {"stop": [1]},
        {"stop": 5},
        {"reasoning_effort": "lots"},
        {"reasoning": {"effort": 5}},
        {"response_format": {"type": "json_schema", "json_schema": "x"}},
        {"stream_options": "x"},
        {"stream_options": {"include_usage": "x"}, "stream": True},
        {"max_tokens": "3"},
        {"max_tokens": 10**30},
        {"temperature": "hot"},
        {"seed": 1.5e300},
        {"top_p": [1]},
    ):
        cases.append(Case("POST", "/v1/chat/completions", {**oc, **extra}))
    for extra in (
        {"prompt": 5},
        {"prompt": ["a", "b"]},
        {"prompt": [5]},
        {"suffix": 5},
        {"stop": [1]},
        {"max_tokens": "3"},
        {"temperature": "hot"},
        {"stream_options": "x"},
    ):
        cases.append(Case("POST", "/v1/completions", {**ocmp, **extra}))
    for extra in (
        {"input": None},
        {"input": []},
        {"input": [1, 2]},
        {"input": 5},
        {"encoding_format": "hex"},
        {"encoding_format": 5},
        {"dimensions": "3"},
        {"dimensions": -(2**70)},
    ):
        cases.append(Case("POST", "/v1/embeddings", {**oe, **extra}))
    # model management specifics
    cr = BASE["/api/create"]
    for extra in (
        {"from": None},
        {"files": {"a.gguf": "sha256:zz"}},
        {"files": {"../a.gguf": DIGEST0}},
        {"files": {"/abs.gguf": DIGEST0}},
        {"files": {"a.gguf": DIGEST0}},
        {"files": {"a.gguf": ""}},
        {"files": {"a.gguf": 5}},
        {"adapters": {"a.gguf": "bad"}},
        {"template": "{{ .Prompt "},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [5]},
        {"messages": "x"},
        {"parameters": {"num_ctx": "big"}},
        {"parameters": {"stop": [1]}},
        {"parameters": {"temperature": {}}},
        {"parameters": "x"},
        {"quantize": "q4_K_M"},
        {"license": [5]},
        {"modelfile": "NOT A MODELFILE", "from": None},
        {"modelfile": "FROM @sha256:zz", "from": None},
        {"system": "s", "messages": [{"role": "robot"}]},
        {"template": "T", "parameters": {"num_ctx": "big"}},
        {"license": "L", "parameters": {"stop": [[]]}},
    ):
        cases.append(Case("POST", "/api/create", {**cr, **extra}))
    for src, dst in ((TINY, ""), ("", "x"), ("unknown-model", "x"), (TINY, None), (None, "x")):
        cases.append(Case("POST", "/api/copy", {"source": src, "destination": dst}))
    cases += [
        Case(
            "DELETE",
            "/api/delete",
            {"model": "unknown-model"},
            404,
            "model 'unknown-model' not found",
        ),
        Case("DELETE", "/api/delete", {}, 400, "model is required"),
        Case("POST", "/api/pull", {}, 400, "model is required"),
        Case("POST", "/api/push", {}, 400, "model is required"),
        Case("POST", "/api/push", {"model": "nope"}),  # no namespace: would push to library
    ]
    # blobs: bad digests
    for digest in (
        "sha256:zz",
        "sha256:" + "0" * 63,
        "md5:" + "0" * 64,
        "..%2F..%2Fx",
        "sha256:..%2F..%2Fx",
        "sha256-" + "g" * 64,
        "sha256:" + "0" * 64 + "%00",
    ):
        for method in ("HEAD", "POST"):
            cases.append(
                Case(
                    method,
                    f"/api/blobs/{digest}",
                    raw=b"data",
                    status=400,
                    error=None if method == "HEAD" else "invalid digest format",
                )
            )
    cases += [
        Case("POST", f"/api/blobs/{DIGEST0}", raw=b"data"),  # digest mismatch
        Case("HEAD", f"/api/blobs/{DIGEST0}", status=404),
    ]
    # OpenAI model retrieval
    cases.append(
        Case("GET", "/v1/models/unknown-model", status=404, error="model 'unknown-model' not found")
    )
    for name in ("..", "a b", "x" * 300, "%2e%2e%2fx"):
        cases.append(Case("GET", f"/v1/models/{name}"))
    return cases


CASES = body_cases() + field_cases() + value_cases()


def check_error(path: str, status: int, text: str, body: Any, ctype: str, method: str) -> None:
    assert 400 <= status < 500, (status, text)
    if method == "HEAD":
        return  # no body
    assert ctype.startswith("application/json"), ctype
    assert isinstance(body, dict), text
    if path.startswith("/v1/"):
        err = body.get("error")
        assert isinstance(err, dict), text
        assert isinstance(err.get("message"), str) and err["message"], text
        assert isinstance(err.get("type"), str) and err["type"], text
        assert set(err) == {"message", "type", "param", "code"}, text
    else:
        assert set(body) == {"error"}, text
        assert isinstance(body["error"], str) and body["error"].strip(), text


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
async def test_hostile_request(env: Env, case: Case) -> None:
    before = tree(env.root)
    status, text, body, ctype = await env.call(case.method, case.path, case.body, raw=case.raw)
    if case.ok and 200 <= status < 300:
        assert isinstance(body, dict), text
        await env.idle()
        assert tree(env.root) == before
        await env.alive()
        return
    check_error(case.path, status, text, body, ctype, case.method)
    if case.status is not None:
        assert status == case.status, text
    if case.error is not None:
        msg = body["error"]["message"] if case.path.startswith("/v1/") else body["error"]
        assert msg == case.error
    await env.idle()
    assert tree(env.root) == before
    await env.alive()


# ---- random bodies -----------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=8,
)
OPTION_KEYS = [
    "num_ctx",
    "num_predict",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "num_thread",
    "num_keep",
    "repeat_last_n",
    "min_p",
    "typical_p",
    "unknown",
]
FUZZ_ROUTES = [
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
]
FIELDS = sorted(
    {k for p in FUZZ_ROUTES for k in _route_fields(p)} | {"stream", "messages", "prompt", "input"}
)


# num_predict/max_tokens stay small or wrong-typed: a huge valid one is a long generation
small_count = st.one_of(
    st.integers(min_value=-2, max_value=4),
    json_leaf.filter(lambda v: not isinstance(v, (int, float)) or isinstance(v, bool)),
)


def _value_for(key: str) -> st.SearchStrategy[Any]:
    return (
        small_count if key in ("num_predict", "max_tokens", "max_completion_tokens") else json_value
    )


@st.composite
def random_body(draw: st.DrawFn) -> tuple[str, bytes]:
    """A route and a body: any JSON value, a random object, or (mostly) a valid body with a few
    fields or options replaced by random JSON."""
    path = draw(st.sampled_from(FUZZ_ROUTES))
    kind = draw(st.sampled_from(["value", "object", "mutate", "mutate", "mutate", "mutate"]))
    if kind == "value":
        return path, json.dumps(draw(json_value)).encode()
    if kind == "object":
        obj: dict[str, Any] = {
            k: draw(_value_for(k))
            for k in draw(st.lists(st.sampled_from(FIELDS), max_size=5, unique=True))
        }
        obj["model"] = draw(st.sampled_from([TINY, THINKING, "unknown", "../x", "", 5]))
        obj.setdefault("max_tokens", 2)
    else:
        obj = json.loads(json.dumps(BASE[path]))
        obj["model"] = draw(st.sampled_from([TINY, TINY, THINKING]))
        obj["stream"] = draw(st.sampled_from([False, True, None]))
        for key in draw(
            st.lists(
                st.sampled_from(_route_fields(path) + OPTION_KEYS),
                min_size=1,
                max_size=3,
                unique=True,
            )
        ):
            if key in OPTION_KEYS:
                options = obj.setdefault("options", {})
                if isinstance(options, dict):
                    options[key] = draw(_value_for(key))
            else:
                obj[key] = draw(_value_for(key))
    if isinstance(obj.get("options"), dict):
        obj["options"].setdefault("num_predict", 2)
    if draw(st.booleans()):
        obj["messages"] = draw(
            st.lists(
                st.dictionaries(
                    st.sampled_from(
                        ["role", "content", "images", "tool_calls", "thinking", "tool_name"]
                    ),
                    json_value,
                    max_size=3,
                ),
                max_size=2,
            )
        )
    return path, json.dumps(obj).encode()


def assert_clean_stream(path: str, text: str) -> None:
    """A 200 stream never carries an error: errors before the first line get a real status."""
    if path.startswith("/v1/"):
        assert '"error"' not in text.split("data: [DONE]")[0] or not text.startswith("data:"), text
        return
    for line in text.splitlines():
        assert "error" not in json.loads(line), text


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(req=random_body())
async def test_random_bodies_never_5xx(env: Env, req: tuple[str, bytes]) -> None:
    path, raw = req
    before = tree(env.root)
    status, text, body, ctype = await env.call("POST", path, raw=raw)
    assert status < 500, (path, raw, status, text)
    if status >= 400:
        check_error(path, status, text, body, ctype, "POST")
    elif body is None:
        assert_clean_stream(path, text)
    await env.idle()
    assert tree(env.root) == before
    await env.alive()


# ---- exact codes and texts (reference §2) -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/api/chat", {"messages": []}, 400, "model is required"),
        ("POST", "/api/chat", NULL, 400, "model is required"),  # body `null`
        ("POST", "/api/show", {}, 400, "model is required"),
        ("POST", "/api/embeddings", {"prompt": "x"}, 400, "model is required"),
        ("POST", "/api/push", {}, 400, "model is required"),
        ("POST", "/api/generate", {"prompt": "x"}, 404, "model '' not found"),
        ("POST", "/api/generate", NULL, 404, "model '' not found"),
        ("POST", "/api/embed", {"input": "x"}, 404, "model '' not found"),
        ("POST", "/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ("POST", "/api/chat", {"model": "nope", "messages": []}, 404, "model 'nope' not found"),
        (
            "POST",
            "/api/embed",
            {"model": "nope", "input": "x"},
            404,
            'model "nope" not found, try pulling it first',
        ),
        (
            "POST",
            "/api/embeddings",
            {"model": "nope", "prompt": "x"},
            404,
            'model "nope" not found, try pulling it first',
        ),
        ("POST", "/api/show", {"model": "nope"}, 404, "model 'nope:latest' not found"),
        ("DELETE", "/api/delete", {"model": "nope"}, 404, "model 'nope' not found"),
        (
            "POST",
            "/api/copy",
            {"source": "nope", "destination": "x"},
            404,
            'model "nope" not found',
        ),
        (
            "POST",
            "/api/copy",
            {"source": "a b", "destination": "x"},
            400,
            'source "a b" is invalid',
        ),
        (
            "POST",
            "/api/copy",
            {"source": TINY, "destination": "../x"},
            400,
            'destination "../x" is invalid',
        ),
        ("DELETE", "/api/delete", {"model": "a b"}, 400, 'name "a b" is invalid'),
        ("POST", "/api/pull", {"model": "a b"}, 400, "invalid model name"),
        ("POST", "/api/generate", {"model": "a b", "prompt": "x"}, 400, "invalid model name"),
        ("POST", "/api/chat", {"model": "a b"}, 400, "invalid model name"),
        (
            "POST",
            "/api/generate",
            {"model": TINY, "keep_alive": "abc"},
            400,
            'time: invalid duration "abc"',
        ),
        (
            "POST",
            "/api/generate",
            {"model": TINY, "raw": True, "template": "x", "prompt": "x"},
            400,
            "raw mode does not support template, system, or context",
        ),
        (
            "POST",
            "/api/generate",
            {"model": TINY, "prompt": "x", "think": True},
            400,
            f'"{TINY}" does not support thinking',
        ),
        (
            "POST",
            "/api/generate",
            {"model": TINY, "prompt": "x", "suffix": "y"},
            400,
            f"registry.ollama.ai/library/{TINY}:latest does not support insert",
        ),
        (
            "POST",
            "/api/generate",
            {"model": TINY, "prompt": "x", "images": ["!!!!"]},
            400,
            "illegal base64 data at input byte 0",
        ),
        ("POST", "/api/embed", {"model": TINY, "input": 5}, 400, "invalid input type"),
        ("POST", "/api/create", {"model": "x"}, 400, "neither 'from' or 'files' was specified"),
        ("HEAD", f"/api/blobs/{DIGEST0}", None, 404, None),
        ("POST", "/api/blobs/sha256:zz", None, 400, "invalid digest format"),
        ("GET", "/api/nope", None, 404, "404 page not found"),
        ("GET", "/v1/nope", None, 404, "404 page not found"),
        ("GET", "/api/generate", None, 405, "405 method not allowed"),
        ("GET", "/api/chat", None, 405, "405 method not allowed"),
        ("POST", "/api/tags", None, 405, "405 method not allowed"),
        ("POST", "/api/ps", None, 405, "405 method not allowed"),
        ("GET", "/api/delete", None, 405, "405 method not allowed"),
        ("PUT", "/api/show", None, 405, "405 method not allowed"),
        ("GET", "/v1/chat/completions", None, 405, "405 method not allowed"),
        ("POST", "/v1/models", None, 405, "405 method not allowed"),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model 'nope' not found",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": TINY, "messages": []},
            400,
            "[] is too short - 'messages'",
        ),
        ("POST", "/v1/embeddings", {"model": TINY, "input": []}, 400, "invalid input"),
        ("GET", "/v1/models/nope", None, 404, "model 'nope' not found"),
    ],
)
async def test_reference_codes_and_texts(
    env: Env, method: str, path: str, body: Any, status: int, error: str | None
) -> None:
    raw = b"null" if body is NULL else None
    got, text, parsed, _ = await env.call(method, path, body, raw=raw)
    assert got == status, text
    if error is None:
        return
    msg = parsed["error"]["message"] if path.startswith("/v1/") else parsed["error"]
    assert msg == error
    if path.startswith("/v1/"):
        assert parsed["error"]["type"] == {
            400: "invalid_request_error",
            404: "not_found_error",
        }.get(status, "invalid_request_error")


# ---- the ollama client parses every response ----------------------------------------------------


async def test_ollama_client_parses_everything(env: Env) -> None:
    client = ollama.AsyncClient(host=env.url)
    try:
        shown = await client.show(TINY)
        assert shown.modelinfo is not None and shown.capabilities == ["completion", "tools"]
        assert {m.model for m in (await client.list()).models} == {
            f"{THINKING}:latest",
            f"{TINY}:latest",
        }
        res = await client.generate(
            model=THINKING, prompt="hi", think=True, options={"num_predict": 3}
        )
        assert res.done and res.done_reason in ("stop", "length")
        parts = [
            p
            async for p in await client.generate(
                model=THINKING, prompt="hi", think="high", stream=True, options={"num_predict": 3}
            )
        ]
        assert parts[-1].done
        chat = await client.chat(
            model=TINY,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[WEATHER_TOOL],
            options={"num_predict": 3},
        )
        assert chat.message.role == "assistant" and chat.done
        async for part in await client.chat(
            model=TINY,
            stream=True,
            tools=[WEATHER_TOOL],
            messages=[{"role": "user", "content": "x"}],
            options={"num_predict": 3},
        ):
            assert part.message.role == "assistant"
        emb = await client.embed(model=TINY, input=["a", "bb"], truncate=True, dimensions=4)
        assert len(emb.embeddings) == 2 and all(len(v) == 4 for v in emb.embeddings)
        assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5) for v in emb.embeddings)
        legacy = await client.embeddings(model=TINY, prompt="a")
        assert legacy.embedding
        ps = await client.ps()
        # both models share one blob, hence one runner (listed under the name that loaded it)
        assert ps.models and ps.models[0].model in (f"{TINY}:latest", f"{THINKING}:latest")
        assert ps.models[0].expires_at is not None and ps.models[0].context_length
        unloaded = await client.generate(model=TINY, keep_alive=0)
        assert unloaded.done_reason == "unload"
        with pytest.raises(ollama.ResponseError) as e:
            await client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as e:
            await client.show("nope")
        assert e.value.status_code == 404
    finally:
        await client._client.aclose()
    await env.idle()


async def test_create_from_unreachable_registry(env: Env) -> None:
    """A `from` that isn't local is pulled; with the registry unreachable that is Ollama's
    500 with Go's words for it (not the HTTP library's), and nothing is stored; a pull says the
    same."""
    before = tree(env.root)
    error = (
        'pull model manifest: Get "http://127.0.0.1:9/v2/library/unknown-model/manifests/latest"'
        ": dial tcp 127.0.0.1:9: connect: connection refused"
    )
    r = await env.client.post(
        "/api/create", json={"model": "x", "from": "unknown-model", "stream": False}
    )
    assert (r.status, await r.json()) == (500, {"error": error})
    r = await env.client.post("/api/pull", json={"model": "unknown-model", "stream": False})
    assert (r.status, await r.json()) == (500, {"error": error})
    r = await env.client.post("/api/pull", json={"model": "unknown-model"})
    lines = [json.loads(x) for x in (await r.read()).splitlines()]
    assert r.status == 200 and lines == [{"status": "pulling manifest"}, {"error": error}]
    assert tree(env.root) == before
