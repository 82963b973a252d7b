"""API keys (issue 19, points 4, 5, 7): the key file, scopes, allowed models, per-key limits,
the audit line of admin actions, and the real ``ollama``, ``openai`` and ``anthropic`` clients
with and without keys. The daemon's app runs over a scripted runner (``make_env``)."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import msgspec
import ollama
import openai
import pytest
import structlog

from corral.daemon.api import auth
from corral.daemon.api.keys import METRICS
from corral.daemon.apikeys import (
    ApiKey,
    KeyFileError,
    Keyring,
    Limiter,
    add_key,
    entry_toml,
    hash_secret,
    new_secret,
)
from corral.daemon.cli import main as cli
from corral.daemon.config import Config, HostAddr
from corral.scheduler import Placement, RunnerOptions, RunnerView
from tests.daemon.test_api_infer_support import Env, env, make_env  # noqa: F401
from tests.daemon.test_store import tree

SECRETS = {name: new_secret() for name in ("root", "user", "qwen-only", "limited", "tokens")}
KEYS = [
    ApiKey(name="root", sha256=hash_secret(SECRETS["root"]), scope="admin"),
    ApiKey(name="user", sha256=hash_secret(SECRETS["user"])),
    ApiKey(name="qwen-only", sha256=hash_secret(SECRETS["qwen-only"]), models=("qwen", "chat*")),
    ApiKey(name="limited", sha256=hash_secret(SECRETS["limited"]), requests_per_minute=2),
    ApiKey(name="tokens", sha256=hash_secret(SECRETS["tokens"]), tokens_per_minute=2),
]


def key_file(path: Path, keys: list[ApiKey]) -> Path:
    path.write_text("\n".join(entry_toml(k) for k in keys))
    return path


def keyed_config(path: Path, **kw: Any) -> Config:
    return Config(host=HostAddr(host="127.0.0.1", port=11434), api_keys_file=path, **kw)


@contextlib.asynccontextmanager
async def keyed(tmp_path: Path, **kw: Any) -> AsyncIterator[Env]:
    path = key_file(tmp_path / "keys.toml", KEYS)
    async with make_env(tmp_path, keyed_config(path, **kw)) as e:
        yield e


@pytest.fixture
async def kenv(tmp_path: Path) -> AsyncIterator[Env]:
    async with keyed(tmp_path) as e:
        yield e


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


async def call(
    env: Env, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else msgspec.json.encode(body)
    async with env.session.request(method, env.url + path, data=data, headers=headers) as r:
        text = await r.text()
        try:
            parsed = msgspec.json.decode(text) if text else None
        except msgspec.DecodeError:
            parsed = text
        return r.status, parsed, dict(r.headers)


GEN = {"model": "qwen", "prompt": "hi", "stream": False}
CHAT_OAI = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "qwen", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


# ---- the key file ---------------------------------------------------------------------------


def test_key_file_round_trip_and_lookup() -> None:
    ring = Keyring.parse("\n".join(entry_toml(k) for k in KEYS))
    assert ring.keys == KEYS
    assert ring.find(SECRETS["user"]) == KEYS[1]
    assert ring.find("corral-wrong") is None and ring.find("") is None
    # only the hash is in the file
    assert SECRETS["root"] not in entry_toml(KEYS[0])
    assert hash_secret("abc") == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[[keys]]\nname = "a"\nsha256 = "%s"\nscop = "admin"\n', "scop"),
        ('[[keys]]\nname = "a"\nsha256 = "%s"\nscope = "root"\n', "scope"),
        ('[[keys]]\nname = "a b"\nsha256 = "%s"\n', "keys[0].name"),
        ('[[keys]]\nname = "a"\nsha256 = "%s"\n[[keys]]\nname = "a"\nsha256 = "%s"\n', "twice"),
        ('[[keys]]\nname = "a"\nsha256 = "ABC"\n', "keys[0].sha256"),
        ('[[keys]]\nname = "a"\nsha256 = "%s"\nrequests_per_minute = -1\n', "requests_per"),
        ('[[keys]]\nname = "a"\nsha256 = "%s"\nmodels = [""]\n', "models"),
        ('[[keys]]\nname = "a"\nsha256 = "%s"\nmodels = "qwen"\n', "models"),
        ("[[keys]\n", "not TOML"),
        ('[[key]]\nname = "a"\n', "key"),
        ('[[keys]]\nsha256 = "%s"\n', "name"),
    ],
)
def test_key_file_errors_name_the_field(text: str, where: str) -> None:
    h = hash_secret("x")
    with pytest.raises(KeyFileError, match=re.escape(where)):
        Keyring.parse(text.replace("%s", h, 1).replace("%s", hash_secret("y")), Path("k.toml"))


def test_same_hash_twice_is_refused() -> None:
    h = hash_secret("x")
    text = f'[[keys]]\nname = "a"\nsha256 = "{h}"\n[[keys]]\nname = "b"\nsha256 = "{h}"\n'
    with pytest.raises(KeyFileError, match="same sha256"):
        Keyring.parse(text)


@pytest.mark.parametrize(
    ("patterns", "model", "allowed"),
    [
        ((), "anything", True),
        (("llama3",), "llama3", True),
        (("llama3",), "LLAMA3:latest", True),
        (("llama3",), "registry.ollama.ai/library/llama3:latest", True),
        (("llama3",), "llama3:8b", False),
        (("llama3",), "llama3.2", False),
        (("llama3*",), "llama3.2:1b", True),
        (("gemma3:*",), "gemma3:270m", True),
        (("gemma3:*",), "gemma3", True),  # gemma3:latest
        (("gemma3:*",), "gemma3n:e2b", False),
        (("team/*",), "team/x", True),
        (("team/*",), "other/x", False),
        (("hf.co/*",), "hf.co/org/m:Q4_K_M", True),
        (("qwen",), "../qwen", False),  # not a name: matches nothing
        (("*",), "not a name!", False),
    ],
)
def test_allowed_models(patterns: tuple[str, ...], model: str, allowed: bool) -> None:
    key = ApiKey(name="k", sha256=hash_secret("k"), models=patterns)
    assert key.allows_model(model) is allowed


def test_limiter_buckets_with_time_as_argument() -> None:
    key = ApiKey(name="k", sha256="0" * 64, requests_per_minute=2, tokens_per_minute=60)
    lim = Limiter()
    assert lim.admit(key, 0.0) is None and lim.admit(key, 0.0) is None
    assert lim.admit(key, 0.0) == ("requests", 30)  # one request back every 30 s
    assert lim.admit(key, 29.0) == ("requests", 1)
    assert lim.admit(key, 30.0) is None
    lim.charge(key, 90, 30.0)  # 60 - 90: 30 tokens in debt, refilled at 1/s
    assert lim.admit(key, 100.0) is None  # requests refilled meanwhile, tokens to 40 (+70)
    lim.charge(key, 100, 100.0)  # 40 - 100 = -60
    assert lim.admit(key, 100.0) == ("tokens", 60)
    # a reload with a lower limit keeps the state, clamped; 0 = unlimited forgets it
    tighter = msgspec.structs.replace(key, tokens_per_minute=30)
    assert lim.admit(tighter, 100.0) == ("tokens", 120)
    free = msgspec.structs.replace(key, tokens_per_minute=0, requests_per_minute=0)
    assert all(lim.admit(free, 100.0) is None for _ in range(10))


def test_add_key_appends_and_keeps_the_file_valid(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    add_key(path, KEYS[0])
    add_key(path, KEYS[2])
    assert path.stat().st_mode & 0o777 == 0o600
    assert Keyring.load(path).keys == [KEYS[0], KEYS[2]]
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="used twice"):
        add_key(path, msgspec.structs.replace(KEYS[1], name="root"))
    assert path.read_bytes() == before


def test_cli_key_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.toml"
    argv = ["key", "create", "ci", "--scope", "admin", "--model", "qwen", "--file", str(path)]
    assert cli.main([*argv, "--requests-per-minute", "5"]) == 0
    secret = capsys.readouterr().out.strip()
    key = Keyring.load(path).find(secret)
    assert key is not None and key.name == "ci" and key.scope == "admin"
    assert key.models == ("qwen",) and key.requests_per_minute == 5
    assert secret not in path.read_text()
    assert cli.main(argv) == 1  # the name is taken: nothing written
    assert "used twice" in capsys.readouterr().err
    assert Keyring.load(path).keys == [key]


async def test_cli_client_sends_ollama_api_key(kenv: Env) -> None:
    async with cli.Client(kenv.url, SECRETS["user"]) as c:
        assert "models" in await c.request("GET", "/api/tags")
    async with cli.Client(kenv.url) as c:
        with pytest.raises(cli.CliError, match="missing API key"):
            await c.request("GET", "/api/tags")


# ---- keys off: every client as before ----------------------------------------------------------


async def test_without_a_key_file_any_key_or_none_is_let_in(env: Env) -> None:
    for headers in (None, {"Authorization": "Bearer whatever"}, {"x-api-key": "x"}):
        status, _, _ = await call(env, "POST", "/api/generate", GEN, headers)
        assert status == 200
    assert (await call(env, "GET", "/metrics"))[0] == 200


# ---- 401 in the route's shape, open routes -----------------------------------------------------


async def test_missing_or_wrong_key_is_401_in_each_shape(kenv: Env) -> None:
    cases = [
        (None, "missing API key"),
        ({"Authorization": "Bearer corral-nope"}, "invalid API key"),
        ({"x-api-key": "corral-nope"}, "invalid API key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing API key"),
        ({"Authorization": "Bearer "}, "missing API key"),
    ]
    for headers, text in cases:
        status, body, h = await call(kenv, "POST", "/api/generate", GEN, headers)
        assert (status, body) == (401, {"error": ANY_TEXT(text)})
        assert h["WWW-Authenticate"].startswith("Bearer")
        status, body, _ = await call(kenv, "POST", "/v1/chat/completions", CHAT_OAI, headers)
        assert status == 401 and text in body["error"]["message"]
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "invalid_api_key"
        status, body, _ = await call(kenv, "POST", "/v1/messages", MSG, headers)
        assert status == 401 and body["type"] == "error"
        assert body["error"] == {"type": "authentication_error", "message": ANY_TEXT(text)}
    # unknown paths and wrong methods are not told apart before a key
    assert (await call(kenv, "GET", "/api/nothing"))[0] == 401
    assert (await call(kenv, "GET", "/api/nothing", headers=bearer("user")))[0] == 404
    assert kenv.runner.requests == []


class ANY_TEXT(str):  # upper case: it reads as a value in the comparisons above
    """Equal to any string containing it."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and str(self) in other

    __hash__ = str.__hash__


async def test_open_routes(tmp_path: Path) -> None:
    async with keyed(tmp_path) as e:
        assert (await call(e, "GET", "/"))[:2] == (200, "Ollama is running")
        assert (await call(e, "HEAD", "/"))[0] == 200
        assert (await call(e, "GET", "/readyz"))[0] == 200
        assert (await call(e, "GET", "/metrics"))[0] == 200
        assert (await call(e, "GET", "/api/version"))[0] == 401
    (tmp_path / "m").mkdir()
    async with keyed(tmp_path / "m", metrics_auth=True) as e:
        assert (await call(e, "GET", "/metrics"))[0] == 401
        assert (await call(e, "GET", "/metrics", headers=bearer("user")))[0] == 200
        assert (await call(e, "GET", "/readyz"))[0] == 200


def test_every_route_has_a_rule(env: Env) -> None:
    """A new route must say which scope it needs (and which body fields name models)."""
    for route in env.app.router.routes():
        resource = route.resource
        assert resource is not None
        key = (route.method, resource.canonical)
        if route.method == "HEAD" and key not in auth.RULES:
            key = ("GET", resource.canonical)
        assert key in auth.RULES, key


# ---- scopes and models: 403, nothing changed ---------------------------------------------------

DIGEST = "sha256:" + hashlib.sha256(b"blob").hexdigest()
ADMIN_CALLS = [
    ("POST", "/api/create", {"model": "new", "from": "qwen"}),
    ("POST", "/api/copy", {"source": "qwen", "destination": "qwen2"}),
    ("DELETE", "/api/delete", {"model": "qwen"}),
    ("POST", "/api/pull", {"model": "qwen"}),
    ("POST", "/api/push", {"model": "qwen"}),
    ("HEAD", f"/api/blobs/{DIGEST}", None),
]


async def test_inference_key_cannot_manage_models(kenv: Env) -> None:
    root = kenv.store.root
    before = tree(root)
    for method, path, body in ADMIN_CALLS:
        for who in ("user", "qwen-only"):
            status, resp, _ = await call(kenv, method, path, body, bearer(who))
            assert status == 403, (path, who)
            if resp is not None:
                assert "needs 'admin'" in resp["error"]
    async with kenv.session.post(
        kenv.url + f"/api/blobs/{DIGEST}", data=b"blob", headers=bearer("user")
    ) as r:
        assert r.status == 403
    assert tree(root) == before


async def test_key_limited_to_models(kenv: Env) -> None:
    h = bearer("qwen-only")
    ok = [
        ("POST", "/api/generate", {"model": "qwen", "prompt": "hi", "stream": False}),
        ("POST", "/api/chat", {"model": "chatml", "messages": [], "stream": False}),
        ("POST", "/api/show", {"model": "QWEN:latest"}),
        ("POST", "/v1/chat/completions", CHAT_OAI),
        ("GET", "/v1/models/qwen", None),
        ("POST", "/v1/messages", MSG),
    ]
    for method, path, body in ok:
        assert (await call(kenv, method, path, body, h))[0] == 200, path
    refused = [
        ("POST", "/api/generate", {"model": "plain", "prompt": "hi"}),
        ("POST", "/api/generate", {"Model": "plain", "prompt": "hi"}),  # Go folds the case
        ("POST", "/api/show", {"name": "plain"}),
        ("POST", "/api/embed", {"model": "embedder", "input": "x"}),
        ("POST", "/api/embeddings", {"model": "embedder", "prompt": "x"}),
        ("POST", "/v1/embeddings", {"model": "embedder", "input": "x"}),
        ("POST", "/v1/completions", {"model": "plain", "prompt": "x"}),
        ("POST", "/v1/responses", {"model": "plain", "input": "x"}),
        ("POST", "/v1/messages/count_tokens", MSG | {"model": "plain"}),
        ("GET", "/v1/models/plain", None),
    ]
    n = len(kenv.runner.requests)
    for method, path, body in refused:
        status, resp, _ = await call(kenv, method, path, body, h)
        assert status == 403, path
        assert "may not use model" in str(resp)
    # a duplicated field: the handler would take the last one, so it is the one checked
    raw = b'{"model": "qwen", "model": "plain", "prompt": "hi", "stream": false}'
    async with kenv.session.post(kenv.url + "/api/generate", data=raw, headers=h) as r:
        assert r.status == 403
    status, body, _ = await call(
        kenv, "POST", "/v1/chat/completions", CHAT_OAI | {"model": "plain"}, h
    )
    assert status == 403 and body["error"]["type"] == "permission_error"
    status, body, _ = await call(kenv, "POST", "/v1/messages", MSG | {"model": "plain"}, h)
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert len(kenv.runner.requests) == n  # nothing refused reached a runner


async def test_lists_show_a_key_its_models(kenv: Env) -> None:
    everything = {
        "qwen:latest",
        "chatml:latest",
        "plain:latest",
        "thinker:latest",
        "embedder:latest",
    }
    for who, names in (("user", everything), ("qwen-only", {"qwen:latest", "chatml:latest"})):
        _, body, _ = await call(kenv, "GET", "/api/tags", headers=bearer(who))
        assert {m["name"] for m in body["models"]} == names
        _, body, _ = await call(kenv, "GET", "/v1/models", headers=bearer(who))
        assert {m["id"] for m in body["data"]} == names
    kenv.supervisor.records["/p.gguf"] = SimpleNamespace(name="plain:latest", digest="cd")
    kenv.supervisor.runners = [
        RunnerView(
            runner_id="r1",
            model_key="/p.gguf",
            state="ready",
            options=RunnerOptions(num_ctx=4096),
            placement=Placement(cpu_bytes=10),
            parallel=1,
            in_flight=0,
            queued=0,
            keep_alive=300.0,
            deadline=1000.0,
            pid=7,
            context_length=4096,
            started_at=0.0,
            ready_at=1.0,
            last_used=1.0,
        )
    ]
    for who, names in (("user", ["plain:latest"]), ("qwen-only", [])):
        _, body, _ = await call(kenv, "GET", "/api/ps", headers=bearer(who))
        assert [m["name"] for m in body["models"]] == names


async def test_no_key_changes_nothing(kenv: Env) -> None:
    before = tree(kenv.store.root)
    for headers in (None, {"Authorization": "Bearer corral-nope"}, {"x-api-key": "nope"}):
        for method, path, body in ADMIN_CALLS:
            assert (await call(kenv, method, path, body, headers))[0] == 401, path
        async with kenv.session.post(
            kenv.url + f"/api/blobs/{DIGEST}", data=b"blob", headers=headers
        ) as r:
            assert r.status == 401
    assert tree(kenv.store.root) == before
    text = kenv.app[METRICS].render().decode()
    assert 'corral_auth_refused_total{reason="missing"} 7.0' in text
    assert 'corral_auth_refused_total{reason="invalid"} 14.0' in text


async def test_admin_key_limited_to_models(tmp_path: Path) -> None:
    secret = new_secret()
    ring = Keyring(
        [ApiKey(name="team", sha256=hash_secret(secret), scope="admin", models=("team/*",))]
    )
    async with make_env(tmp_path, keyring=ring) as e:
        h = {"Authorization": f"Bearer {secret}"}
        before = tree(e.store.root)
        for body in (
            {"source": "qwen", "destination": "team/x"},
            {"source": "team/x", "destination": "qwen2"},
        ):
            assert (await call(e, "POST", "/api/copy", body, h))[0] == 403
        for body in (
            {"model": "team/x", "from": "qwen"},
            {"model": "team/x", "modelfile": "FROM qwen"},
            {"model": "team/x", "From": "plain"},
        ):
            assert (await call(e, "POST", "/api/create", body, h))[0] == 403
        assert (await call(e, "DELETE", "/api/delete", {"model": "qwen"}, h))[0] == 403
        assert tree(e.store.root) == before
        # in its own namespace it may do what admin keys do
        assert (await call(e, "POST", "/api/create", {"model": "team/x", "files": {}}, h))[0] == 400


# ---- limits -----------------------------------------------------------------------------------


async def test_requests_per_minute(kenv: Env) -> None:
    h = bearer("limited")
    assert (await call(kenv, "POST", "/api/generate", GEN, h))[0] == 200
    assert (await call(kenv, "POST", "/api/generate", GEN, h))[0] == 200
    status, body, headers = await call(kenv, "POST", "/api/generate", GEN, h)
    assert status == 429 and "requests per minute" in body["error"]
    assert 1 <= int(headers["Retry-After"]) <= 30
    status, body, headers = await call(kenv, "POST", "/v1/chat/completions", CHAT_OAI, h)
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert "Retry-After" in headers
    # other keys are not held back by it
    assert (await call(kenv, "POST", "/api/generate", GEN, bearer("user")))[0] == 200
    text = kenv.app[METRICS].render().decode()
    assert 'corral_key_requests_total{key="limited"} 2.0' in text
    assert 'corral_key_rate_limited_total{key="limited",limit="requests"} 2.0' in text


async def test_generated_tokens_per_minute(kenv: Env) -> None:
    h = bearer("tokens")  # 2 tokens a minute; the scripted answer is 3 tokens
    status, body, _ = await call(kenv, "POST", "/api/generate", GEN, h)
    assert status == 200 and body["eval_count"] == 3
    status, body, headers = await call(kenv, "POST", "/api/generate", GEN, h)
    assert status == 429 and "tokens per minute" in body["error"]
    assert int(headers["Retry-After"]) == 30  # 1 token in debt at 2 a minute
    text = kenv.app[METRICS].render().decode()
    assert 'corral_key_generated_tokens_total{key="tokens"} 3.0' in text
    assert 'corral_key_rate_limited_total{key="tokens",limit="tokens"} 1.0' in text


async def test_streamed_tokens_are_charged(kenv: Env) -> None:
    """Streamed on every surface: the final count is charged once per request."""
    h = bearer("user")
    for path, body in (
        ("/api/chat", {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/chat/completions", CHAT_OAI | {"stream": True}),
        ("/v1/messages", MSG | {"stream": True}),
    ):
        status, text, _ = await call(kenv, "POST", path, body, h)
        assert status == 200 and "Hello" in str(text), path
    text = kenv.app[METRICS].render().decode()
    found = re.findall(r'corral_key_generated_tokens_total\{key="user"\} \S+', text)
    assert found == ['corral_key_generated_tokens_total{key="user"} 9.0']


async def test_stream_cut_short_is_charged_what_was_sent(kenv: Env) -> None:
    kenv.runner.script.error_after = 2  # two chunks, then the runner fails: no final record
    h = bearer("user")
    status, lines, _ = await call(kenv, "POST", "/api/generate", GEN | {"stream": True}, h)
    assert status == 200
    text = kenv.app[METRICS].render().decode()
    assert 'corral_key_generated_tokens_total{key="user"} 2.0' in text


# ---- audit, reload, no key in the logs ---------------------------------------------------------


async def test_audit_line_per_admin_action(kenv: Env) -> None:
    h = bearer("root")
    with structlog.testing.capture_logs() as logs:
        assert (await call(kenv, "POST", "/api/copy", {"source": "qwen", "destination": "q2"}, h))[
            0
        ] == 200
        assert (await call(kenv, "POST", "/api/create", {"model": "q3", "from": "q2"}, h))[0] == 200
        assert (await call(kenv, "DELETE", "/api/delete", {"model": "q2"}, h))[0] == 200
        async with kenv.session.post(
            kenv.url + f"/api/blobs/{DIGEST}", data=b"blob", headers=h
        ) as r:
            assert r.status == 201
        assert (await call(kenv, "DELETE", "/api/delete", {"model": "q3"}, bearer("user")))[
            0
        ] == 403
        assert (await call(kenv, "POST", "/api/pull", {"model": "x"}))[0] == 401
        assert (await call(kenv, "POST", "/api/generate", GEN, h))[0] == 200  # not audited
    audit = [
        {k: v for k, v in e.items() if k != "log_level"} for e in logs if e["event"] == "audit"
    ]
    assert audit == [
        dict(
            action="copy",
            key="root",
            client="127.0.0.1",
            models=["qwen", "q2"],
            blob=None,
            status=200,
            event="audit",
        ),
        dict(
            action="create",
            key="root",
            client="127.0.0.1",
            models=["q3", "q2"],
            blob=None,
            status=200,
            event="audit",
        ),
        dict(
            action="delete",
            key="root",
            client="127.0.0.1",
            models=["q2"],
            blob=None,
            status=200,
            event="audit",
        ),
        dict(
            action="blob_upload",
            key="root",
            client="127.0.0.1",
            models=[],
            blob=DIGEST,
            status=201,
            event="audit",
        ),
        dict(
            action="delete",
            key="user",
            client="127.0.0.1",
            models=[],
            blob=None,
            status=403,
            event="audit",
        ),
        dict(
            action="pull",
            key=None,
            client="127.0.0.1",
            models=[],
            blob=None,
            status=401,
            event="audit",
        ),
    ]
    assert all(s not in repr(logs) for s in SECRETS.values())


async def test_audit_without_keys(env: Env) -> None:
    with structlog.testing.capture_logs() as logs:
        assert (await call(env, "POST", "/api/copy", {"source": "qwen", "destination": "q2"}))[
            0
        ] == 200
        assert (await call(env, "POST", "/api/copy", {"source": "nope", "destination": "q2"}))[
            0
        ] == 404
    audit = [
        (e["action"], e["key"], e["models"], e["status"]) for e in logs if e["event"] == "audit"
    ]
    assert audit == [("copy", None, ["qwen", "q2"], 200), ("copy", None, ["nope", "q2"], 404)]


async def test_reload_swaps_keys_and_keeps_them_on_a_bad_file(kenv: Env) -> None:
    path = kenv.app[auth.CONFIG].api_keys_file
    assert path is not None
    new = new_secret()
    key_file(path, [ApiKey(name="fresh", sha256=hash_secret(new))])
    assert await auth.reload(kenv.app)
    assert (await call(kenv, "GET", "/api/tags", headers=bearer("user")))[0] == 401
    assert (await call(kenv, "GET", "/api/tags", headers={"x-api-key": new}))[0] == 200
    path.write_text("[[keys]]\nname = 'broken'\n")
    with structlog.testing.capture_logs() as logs:
        assert not await auth.reload(kenv.app)
    assert any("not reloaded" in e["event"] for e in logs)
    assert (await call(kenv, "GET", "/api/tags", headers={"x-api-key": new}))[0] == 200
    assert kenv.app[auth.AUTH].keyring is not None


async def test_bad_key_file_stops_serve_before_it_starts(tmp_path: Path) -> None:
    """A daemon meant to be guarded never comes up open (``serve`` exits 1 with the error)."""
    from corral.daemon.serve import run

    (tmp_path / "keys.toml").write_text("[[keys]]\nname = 1\n")
    with pytest.raises(KeyFileError, match=re.escape("keys[0].name")):
        await run(keyed_config(tmp_path / "keys.toml", models=tmp_path / "models"))
    with pytest.raises(KeyFileError, match="cannot read the key file"):
        await run(keyed_config(tmp_path / "missing.toml", models=tmp_path / "models"))
    assert not (tmp_path / "models").exists()


# ---- the real clients -------------------------------------------------------------------------


async def test_real_clients_with_keys(kenv: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # ollama: headers, or OLLAMA_API_KEY as the client reads it
    c = ollama.AsyncClient(host=kenv.url, headers=bearer("user"))
    assert (await c.generate(model="qwen", prompt="hi")).response == "Hello, world"
    await c._client.aclose()
    monkeypatch.setenv("OLLAMA_API_KEY", SECRETS["qwen-only"])
    c = ollama.AsyncClient(host=kenv.url)
    assert (await c.chat(model="qwen", messages=[{"role": "user", "content": "hi"}])).message
    with pytest.raises(ollama.ResponseError) as err:
        await c.chat(model="plain", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 403
    await c._client.aclose()
    monkeypatch.delenv("OLLAMA_API_KEY")
    with pytest.raises(ollama.ResponseError) as err:
        await kenv.ollama.list()
    assert err.value.status_code == 401 and "missing API key" in err.value.error
    # openai: Authorization: Bearer
    async with openai.AsyncOpenAI(
        base_url=kenv.url + "/v1", api_key=SECRETS["user"], max_retries=0
    ) as oa:
        r = await oa.chat.completions.create(**CHAT_OAI)
        assert r.choices[0].message.content == "Hello, world"
    with pytest.raises(openai.AuthenticationError):
        await kenv.openai.chat.completions.create(**CHAT_OAI)
    # anthropic: x-api-key
    async with anthropic.AsyncAnthropic(
        base_url=kenv.url, api_key=SECRETS["user"], max_retries=0
    ) as claude:
        msg = await claude.messages.create(**MSG)
        assert msg.content[0].text == "Hello, world"
    async with anthropic.AsyncAnthropic(
        base_url=kenv.url, api_key="corral-wrong", max_retries=0
    ) as claude:
        with pytest.raises(anthropic.AuthenticationError):
            await claude.messages.create(**MSG)
    async with anthropic.AsyncAnthropic(
        base_url=kenv.url, api_key=SECRETS["qwen-only"], max_retries=0
    ) as claude:
        with pytest.raises(anthropic.PermissionDeniedError):
            await claude.messages.create(**MSG | {"model": "plain"})
    async with openai.AsyncOpenAI(
        base_url=kenv.url + "/v1", api_key=SECRETS["limited"], max_retries=0
    ) as oa:
        await oa.models.list()
        await oa.models.list()
        with pytest.raises(openai.RateLimitError):
            await oa.models.list()


async def test_real_clients_without_keys(env: Env) -> None:
    assert (await env.ollama.generate(model="qwen", prompt="hi")).response == "Hello, world"
    r = await env.openai.chat.completions.create(**CHAT_OAI)
    assert r.choices[0].message.content == "Hello, world"
    async with anthropic.AsyncAnthropic(base_url=env.url, api_key="any", max_retries=0) as c:
        assert (await c.messages.create(**MSG)).content[0].text == "Hello, world"


def test_config_reads_the_settings(tmp_path: Path) -> None:
    c = Config.from_env(
        {
            "CORRAL_API_KEYS_FILE": str(tmp_path / "k.toml"),
            "CORRAL_METRICS_AUTH": "1",
            "OLLAMA_API_KEY": "corral-secret",
        }
    )
    assert c.api_keys_file == tmp_path / "k.toml" and c.metrics_auth
    assert c.api_key == "corral-secret" and "corral-secret" not in repr(c)
    assert "corral-secret" not in str(c.env_summary())
    assert Config.from_env({}).api_keys_file is None
