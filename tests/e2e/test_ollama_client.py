"""The real ``ollama`` Python client against a real ``corral serve`` with the tiny llama model.

One daemon for the module; the tests run in order and build on each other's store state only
where stated (create → list → show → …), each asserting what it needs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import ollama
import pytest

from corral.runner.common import INPUT_TOO_LONG, PROMPT_TOO_LONG
from tests.e2e.conftest import start_daemon, wait_until
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-ollama")
    with start_daemon(tmp, OLLAMA_KEEP_ALIVE="5m") as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    with ollama.Client(host=daemon.url) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(daemon, client, tmp_path_factory) -> str:
    """Create ``tiny:latest`` from a GGUF through create_blob + create(files=…)."""
    path = write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=1)
    digest = client.create_blob(path)
    assert digest.startswith("sha256:")
    statuses = [
        p.status
        for p in client.create(
            model="tiny",
            files={"tiny.gguf": digest},
            parameters={"temperature": 0, "seed": 7},
            stream=True,
        )
    ]
    assert statuses[-1] == "success"
    return "tiny:latest"


def test_list_show(client, tiny):
    names = [m.model for m in client.list().models]
    assert tiny in names
    info = client.show(tiny)
    assert info.details.family == "llama"
    assert "completion" in info.capabilities
    assert info.modelinfo["general.architecture"] == "llama"
    assert "temperature" in info.parameters
    assert info.modelfile.startswith("#")


def test_copy_and_delete(client, tiny, daemon):
    blobs_before = sorted(p.name for p in (daemon.models / "blobs").iterdir())
    client.copy(tiny, "tiny-copy:v1")
    assert "tiny-copy:v1" in [m.model for m in client.list().models]
    client.delete("tiny-copy:v1")
    assert "tiny-copy:v1" not in [m.model for m in client.list().models]
    # the blobs are still used by tiny:latest
    assert sorted(p.name for p in (daemon.models / "blobs").iterdir()) == blobs_before
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("tiny-copy:v1")
    assert err.value.status_code == 404


def test_generate_not_streaming(client, tiny):
    r = client.generate(model=tiny, prompt="hello", options={"num_predict": 8})
    assert r.done and r.done_reason in ("stop", "length")
    assert r.eval_count and r.eval_count <= 8
    assert r.prompt_eval_count and r.prompt_eval_count > 0
    assert r.total_duration and r.total_duration >= r.eval_duration
    assert r.context and isinstance(r.context, list)


def test_generate_streaming(client, tiny):
    parts = list(
        client.generate(model=tiny, prompt="hello", stream=True, options={"num_predict": 6})
    )
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    # num_predict caps the tokens, and the reason says which way it ended
    last = parts[-1]
    assert 1 <= last.eval_count <= 6
    assert last.done_reason == ("length" if last.eval_count == 6 else "stop")
    assert "".join(p.response for p in parts) and last.response == ""


def test_format_json_is_whole_json(client, tiny):
    """format "json" constrains the whole output: with room to finish, the answer parses."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    r = client.generate(
        model=tiny, prompt="answer", format=schema, options={"num_predict": 400, "temperature": 0}
    )
    assert r.done_reason == "stop", r.response  # the grammar ended it, not the limit
    assert set(json.loads(r.response)) == {"ok"}
    r = client.generate(
        model=tiny, prompt="answer", format="json", options={"num_predict": 12, "temperature": 0}
    )
    assert r.response.lstrip().startswith("{")
    if r.done_reason == "stop":
        json.loads(r.response)


def test_chat(client, tiny):
    r = client.chat(
        model=tiny, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 5}
    )
    assert r.message.role == "assistant" and r.done
    chunks = list(
        client.chat(
            model=tiny,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            options={"num_predict": 5},
        )
    )
    assert chunks[-1].done and chunks[-1].done_reason


def test_embed(client, tiny):
    r = client.embed(model=tiny, input=["one", "two words"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 64
    norm = sum(x * x for x in r.embeddings[0]) ** 0.5
    assert abs(norm - 1.0) < 1e-3
    legacy = client.embeddings(model=tiny, prompt="one")
    assert len(legacy.embedding) == 64


def test_preload_unload_and_ps(client, tiny, daemon):
    r = client.generate(model=tiny, prompt="", keep_alive="10m")
    assert r.done_reason == "load"
    ps = client.ps().models
    assert [m.model for m in ps] == [tiny]
    assert ps[0].size_vram == 0 and ps[0].context_length > 0
    assert daemon.runner_pids()
    r = client.generate(model=tiny, prompt="", keep_alive=0)
    assert r.done_reason == "unload"
    assert wait_until(lambda: not client.ps().models)
    assert wait_until(lambda: not daemon.runner_pids())


def test_delete_create_copy_keep_the_runner_of_a_model_sharing_its_weights(
    client, tiny, daemon, tmp_path
):
    """A runner is keyed by its weights file: deleting, re-creating or copying over a model that
    shares it with another leaves it running (shown under a remaining model's name); a deleted
    model whose weights no other model uses has its runner stop once idle."""
    client.generate(model=tiny, prompt="", keep_alive="10m")
    (pid,) = daemon.runner_pids()
    client.copy(tiny, "tmpx")
    client.delete("tmpx")  # Open WebUI users tidying their list
    client.create(model="tmpy", from_=tiny, system="be brief")
    client.create(model="tmpy", from_=tiny, system="be very brief")  # replaces tmpy
    client.copy(tiny, "tmpy")  # over tmpy
    assert [m.model for m in client.ps().models] == [tiny] and daemon.runner_pids() == {pid}
    # a runner started for tmpy, which is deleted: tiny has the weights, the runner is its own
    client.generate(model=tiny, prompt="", keep_alive=0)
    assert wait_until(lambda: not daemon.runner_pids())
    client.generate(model="tmpy", prompt="", keep_alive="10m")
    (pid,) = daemon.runner_pids()
    client.delete("tmpy")
    assert [m.model for m in client.ps().models] == [tiny]
    r = client.generate(model=tiny, prompt="hi", options={"num_predict": 2})
    assert r.done and daemon.runner_pids() == {pid}
    # weights of its own: its runner stops (the other model's stays)
    path = write_tiny_llama(tmp_path / "solo.gguf", seed=3)
    client.create(model="solo", files={"solo.gguf": client.create_blob(path)})
    client.generate(model="solo", prompt="", keep_alive="10m")
    assert len(daemon.runner_pids()) == 2
    client.delete("solo")
    assert wait_until(lambda: [m.model for m in client.ps().models] == [tiny])
    assert wait_until(lambda: daemon.runner_pids() == {pid})


def test_per_request_shift_and_truncate(daemon, tiny):
    """A prompt longer than the slot (num_ctx 256): cut to num_keep + the tail with half of the
    rest left for the answer (Ollama 0.33), a 400 with Ollama's text when the request turns
    context shift off, or the input-length 400 with truncate off."""
    words = " ".join(["water"] * 400)

    def generate(**extra) -> tuple[int, dict]:
        body = {"model": tiny, "prompt": words, "stream": False, "raw": True, **extra}
        body["options"] = {"num_ctx": 256, "num_predict": 2, "temperature": 0}
        req = urllib.request.Request(daemon.url + "/api/generate", data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = generate()
    assert status == 200 and body["prompt_eval_count"] == 256 - (256 - 4) // 2
    assert generate(shift=False) == (400, {"error": PROMPT_TOO_LONG})
    assert generate(truncate=False) == (400, {"error": INPUT_TOO_LONG})
    assert generate(shift=True)[0] == 200


def test_unknown_model_is_404(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope", prompt="x")
    assert err.value.status_code == 404
    assert err.value.error == "model 'nope' not found"  # generate's text (single quotes)


def test_bad_bodies_keep_store_unchanged(daemon, tiny):
    import urllib.error
    import urllib.request

    def tree() -> list[str]:
        return sorted(str(p.relative_to(daemon.models)) for p in Path(daemon.models).rglob("*"))

    before = tree()
    cases = [
        ("POST", "/api/generate", b"{not json"),
        ("POST", "/api/generate", b""),
        ("POST", "/api/chat", json.dumps({"model": tiny, "messages": "hi"}).encode()),
        (
            "POST",
            "/api/generate",
            json.dumps({"model": tiny, "prompt": "x", "keep_alive": "300"}).encode(),
        ),
        ("POST", "/api/show", json.dumps({"model": "../../etc/passwd"}).encode()),
        ("POST", "/api/copy", json.dumps({"source": tiny, "destination": "../x"}).encode()),
        ("DELETE", "/api/delete", json.dumps({"model": "a/../../b"}).encode()),
        ("POST", "/api/blobs/sha256:..%2F..%2Fx", b"data"),
        ("POST", "/api/blobs/sha256:" + "0" * 64, b"data"),
        (
            "POST",
            "/api/create",
            json.dumps({"model": "x", "files": {"a.gguf": "sha256:zz"}}).encode(),
        ),
    ]
    for method, path, body in cases:
        req = urllib.request.Request(
            daemon.url + path,
            data=body,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert 400 <= err.value.code < 500, (path, body, err.value.code)
        payload = json.loads(err.value.read())
        assert isinstance(payload.get("error"), str) and payload["error"], (path, payload)
    assert tree() == before
    # and the daemon still serves
    with ollama.Client(host=daemon.url) as c:
        assert c.list().models
