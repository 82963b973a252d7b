"""The embedded default model: its chat framing for a base model (expected prompts written by hand),
its Modelfile parameters, and when ``corral serve`` imports and preloads it (the decision tree of
``corral.daemon.models.default_model``): into a fresh store only, unless CORRAL_DEFAULT_MODEL asks
for it; an existing store is left as it is, except that corral's own earlier import of the default
gets the current template and parameters.

The embedded GGUF is replaced by the tiny test model (``Embedded``), and ``corral serve`` runs in
this process with FakeEngine runners, so the decisions are tested without Gemma's weights."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from corral.daemon.config import Config
from corral.daemon.models import default_model as dm
from corral.daemon.models.modelfile import format_parameters
from corral.daemon.models.store import Store
from corral.daemon.prompt.templates import GoTemplate
from corral.daemon.serve import first_command, run
from tests.e2e.conftest import free_port

DEFAULT = "gemma3:270m"
SAFETY = float(os.environ.get("TEST_SAFETY", "30"))


def render(messages: list[dict]) -> str:
    return GoTemplate(dm.DEFAULT_TEMPLATE).render(messages)


# ---- the framing and the parameters ------------------------------------------------------------

SCENE = "A conversation between a curious user and a helpful assistant that answers briefly."
EXAMPLES = (
    "User: Hello!\n"
    "Assistant: Hello! How can I help you today?\n"
    "User: What is the capital of Italy?\n"
    "Assistant: The capital of Italy is Rome.\n"
    "User: Write a short poem about rain.\n"
    "Assistant: Soft rain on the roof, a quiet song all night.\n"
)


def test_a_user_turn_follows_the_examples_and_opens_an_assistant_line():
    assert render([{"role": "user", "content": "Hi"}]) == (
        SCENE + "\n\n" + EXAMPLES + "User: Hi\nAssistant:"
    )


def test_system_replaces_the_scene_and_turns_are_transcript_lines():
    got = render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Why?"},
        ]
    )
    assert got == (
        "Be brief.\n\n" + EXAMPLES + "User: Hi\nAssistant: Hello!\nUser: Why?\nAssistant:"
    )


def test_tools_are_named_and_calls_and_results_are_transcript_lines():
    """The template uses .Tools (Ollama's `tools` capability: a front end's chat with tools is
    answered, not refused) and names them in one line; a call is the JSON object the tool-call
    parser reads (tag "{")."""
    template = GoTemplate(dm.DEFAULT_TEMPLATE)
    assert template.supports_tools and template.tool_call_tag() == "{"
    tools = [
        {"type": "function", "function": {"name": n, "description": "d", "parameters": {}}}
        for n in ("get_weather", "search_web")
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "22C"},
    ]
    assert template.render(messages, tools) == (
        SCENE + "\nThe assistant may call a tool by answering with one JSON object "
        '{"name": ..., "arguments": {...}}.\nTools: get_weather, search_web.\n\n'
        + EXAMPLES
        + "User: Weather in Paris?\n"
        + 'Assistant: {"name": "get_weather", "arguments": {"city":"Paris"}}\n'
        + "Tool: 22C\nAssistant:"
    )
    assert template.render(messages[:1]) == render(messages[:1])  # no tools: as before


def test_parameters_bound_the_answer_and_stop_at_the_next_turn_or_paragraph():
    p = dm.DEFAULT_PARAMETERS
    assert 0 < p["num_predict"] <= 256
    assert "\nUser:" in p["stop"] and "\n\n" in p["stop"]
    # the labels of the transcripts front ends write (Open WebUI's title prompt), in any case
    for label in ("User", "USER", "user", "Assistant", "ASSISTANT", "assistant"):
        assert f"\n{label}:" in p["stop"]
    # what `corral show gemma3:270m --parameters` prints: one line per value, Go-quoted
    lines = format_parameters(p).splitlines()
    assert f"{'num_predict':<30} {p['num_predict']}" in lines
    assert f"{'stop':<30} " + '"\\nUser:"' in lines
    assert f"{'stop':<30} " + '"\\n\\n"' in lines


# ---- the decision tree ---------------------------------------------------------------------------


@pytest.fixture
def embedded(tiny_gguf: Path) -> dm.Embedded:
    data = tiny_gguf.read_bytes()

    def write(path: Path) -> None:
        path.write_bytes(data)

    return dm.Embedded("tiny.gguf", "sha256:" + hashlib.sha256(data).hexdigest(), write)


def cfg(root: Path, default: str | None = None, **env: str) -> Config:
    e = {"OLLAMA_MODELS": str(root), **env}
    if default is not None:
        e["CORRAL_DEFAULT_MODEL"] = default
    return Config.from_env(e)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


async def other_model(store: Store, tiny_gguf_factory: Callable[[int], Path], name="mine:latest"):
    layer = await store.write_blob_bytes(tiny_gguf_factory(1).read_bytes())
    await store.create(name, files={"m.gguf": layer.digest}, parameters={"temperature": 0.1})


async def test_disabled_default_model_imports_nothing(tmp_path, embedded):
    store = Store(tmp_path)
    assert await dm.ensure_default_model(store, cfg(tmp_path, ""), embedded) is None
    assert not list(tmp_path.rglob("*"))


async def test_fresh_store_gets_the_default_with_its_template_and_parameters(tmp_path, embedded):
    store = Store(tmp_path)
    assert await dm.ensure_default_model(store, cfg(tmp_path), embedded) == DEFAULT
    rec = store.resolve(DEFAULT)
    assert rec.model_digest == embedded.digest
    assert rec.template == dm.DEFAULT_TEMPLATE
    assert rec.parameters == dm.DEFAULT_PARAMETERS
    # a second start finds it current: nothing is written, and it is preloaded again
    before = snapshot(tmp_path)
    assert await dm.ensure_default_model(store, cfg(tmp_path), embedded) == DEFAULT
    assert snapshot(tmp_path) == before


async def test_existing_store_is_left_untouched(tmp_path, embedded, tiny_gguf_factory):
    store = Store(tmp_path)
    await other_model(store, tiny_gguf_factory)
    before = snapshot(tmp_path)
    assert await dm.ensure_default_model(store, cfg(tmp_path), embedded) is None
    assert snapshot(tmp_path) == before
    assert not store.exists(DEFAULT)


async def test_explicit_default_is_imported_into_an_existing_store(
    tmp_path, embedded, tiny_gguf_factory
):
    store = Store(tmp_path)
    await other_model(store, tiny_gguf_factory)
    config = cfg(tmp_path, DEFAULT)
    assert config.default_model_explicit
    assert await dm.ensure_default_model(store, config, embedded) == DEFAULT
    assert store.resolve(DEFAULT).model_digest == embedded.digest
    assert store.resolve("mine").parameters == {"temperature": 0.1}


@pytest.mark.parametrize("others", [False, True])
async def test_an_older_import_of_the_default_gets_the_current_parameters(
    tmp_path, embedded, tiny_gguf_factory, others
):
    store = Store(tmp_path)
    layer = await store.write_blob_bytes(tiny_gguf_factory(0).read_bytes())
    assert layer.digest == embedded.digest
    old_template = "{{ range .Messages }}<start_of_turn>{{ .Content }}{{ end }}"
    await store.create(
        DEFAULT,
        files={"tiny.gguf": layer.digest},
        template=old_template,
        parameters={"stop": ["<end_of_turn>"], "temperature": 1},
    )
    if others:
        await other_model(store, tiny_gguf_factory)
    got = await dm.ensure_default_model(store, cfg(tmp_path), embedded)
    rec = store.resolve(DEFAULT)
    assert rec.template == dm.DEFAULT_TEMPLATE and rec.parameters == dm.DEFAULT_PARAMETERS
    assert rec.model_digest == embedded.digest
    # preloaded only when it is the store's only model (what an earlier `corral serve` left)
    assert got == (None if others else DEFAULT)


async def test_a_default_name_with_other_weights_is_never_replaced(
    tmp_path, embedded, tiny_gguf_factory
):
    """e.g. the instruction-tuned gemma3:270m pulled from a registry."""
    store = Store(tmp_path)
    await other_model(store, tiny_gguf_factory, name=DEFAULT)
    before = snapshot(tmp_path)
    assert await dm.ensure_default_model(store, cfg(tmp_path), embedded) is None
    assert await dm.ensure_default_model(store, cfg(tmp_path, DEFAULT), embedded) == DEFAULT
    assert snapshot(tmp_path) == before


# ---- `corral serve`: preload or not, and the last start-up line --------------------------------


@asynccontextmanager
async def serving(
    root: Path, monkeypatch, embedded: dm.Embedded, **env: str
) -> AsyncIterator[tuple[str, list[dict]]]:
    """``corral serve`` in this process with FakeEngine runners; yields (url, captured log
    events) once the start-up's last line ("corral is ready") is logged."""
    monkeypatch.setattr(dm, "embedded_gemma", lambda: embedded)
    port = free_port()
    config = Config.from_env(
        {
            "OLLAMA_MODELS": str(root),
            "OLLAMA_HOST": f"127.0.0.1:{port}",
            "CORRAL_RUNNER_ENGINE": "fake",
            "CORRAL_SIMULATE_GPUS": "[]",
            "OLLAMA_NOPRUNE": "1",
            **env,
        }
    )
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(run(config, stop=stop))
        try:
            async with asyncio.timeout(SAFETY):
                while not any(e["event"] == "corral is ready" for e in logs):
                    assert not task.done(), logs
                    await asyncio.sleep(0.01)
            yield config.client_url, logs
        finally:
            stop.set()
            await asyncio.wait_for(task, SAFETY)


async def loaded(url: str) -> list[str]:
    return [m["name"] for m in await ps(url)]


async def ps(url: str) -> list[dict]:
    async with aiohttp.ClientSession() as s, s.get(url + "/api/ps") as r:
        return (await r.json())["models"]


async def test_serve_on_a_fresh_store_imports_and_preloads_the_default(
    tmp_path, monkeypatch, embedded
):
    async with serving(tmp_path, monkeypatch, embedded) as (url, logs):
        assert await loaded(url) == [DEFAULT]
        [ready] = [e for e in logs if e["event"] == "corral is ready"]
        assert ready["url"] == url and ready["model"] == DEFAULT
        assert ready["try"].endswith(f"run {DEFAULT} 'The capital of France is'")
        assert f"OLLAMA_HOST={url} " in ready["try"]  # not the client default port
        async with aiohttp.ClientSession() as s:
            async with s.post(
                url + "/api/chat",
                json={
                    "model": DEFAULT,
                    "stream": False,
                    "messages": [{"role": "user", "content": "Hi"}],
                },
            ) as r:
                body = await r.json()
        assert body["done"] and body["done_reason"] in ("stop", "length")
        # slots for a front end's background requests beside the user's chat
        [row] = await ps(url)
        assert row["num_parallel"] == dm.DEFAULT_PARALLEL == 4


async def test_serve_on_an_existing_store_loads_nothing(
    tmp_path, monkeypatch, embedded, tiny_gguf_factory
):
    await other_model(Store(tmp_path), tiny_gguf_factory)
    before = snapshot(tmp_path)
    async with serving(tmp_path, monkeypatch, embedded) as (url, logs):
        assert await loaded(url) == []
        [ready] = [e for e in logs if e["event"] == "corral is ready"]
        assert ready["model"] is None and ready["try"].endswith(" list")
        async with aiohttp.ClientSession() as s, s.get(url + "/api/tags") as r:
            assert [m["name"] for m in (await r.json())["models"]] == ["mine:latest"]
    assert snapshot(tmp_path) == before


async def test_serve_with_an_explicit_default_preloads_it_into_an_existing_store(
    tmp_path, monkeypatch, embedded, tiny_gguf_factory
):
    await other_model(Store(tmp_path), tiny_gguf_factory)
    async with serving(tmp_path, monkeypatch, embedded, CORRAL_DEFAULT_MODEL=DEFAULT) as (url, _):
        assert await loaded(url) == [DEFAULT]


def test_first_command_names_the_default_host_plainly(tmp_path):
    c = cfg(tmp_path)
    assert first_command(c, DEFAULT).split()[1:] == [
        "run",
        DEFAULT,
        "'The",
        "capital",
        "of",
        "France",
        "is'",
    ]
    assert "OLLAMA_HOST" not in first_command(c, None)
