"""Store: names, digests, reading an Ollama-written store, create/copy/delete, blobs, prune."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import msgspec
import pytest

from corral.daemon.api.errors import http_status
from corral.daemon.errors import CorralError
from corral.daemon.human import human_number
from corral.daemon.models.store import (
    MEDIA_LICENSE,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    Store,
    parse_digest,
    parse_name,
)
from corral.daemon.prompt import templates
from tests.daemon.registry_server import OLLAMA_TEMPLATE, make_gguf


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: compare before/after to prove nothing changed."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ollama_store(root: Path, gguf: Path) -> bytes:
    """Write a store the way Ollama does (manifest with indentation of a registry, config with
    rootfs, params/template/system/license layers). Returns the manifest bytes."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    layers = []

    def put(media: str, data: bytes) -> None:
        (blobs / sha(data).replace(":", "-")).write_bytes(data)
        layers.append({"mediaType": media, "digest": sha(data), "size": len(data)})

    put(MEDIA_MODEL, gguf.read_bytes())
    put(MEDIA_TEMPLATE, OLLAMA_TEMPLATE.encode())
    put(MEDIA_LICENSE, b"LLAMA LICENSE")
    put(MEDIA_SYSTEM, b"You are terse.")
    put(
        MEDIA_PARAMS,
        b'{"num_ctx":4096,"stop":["<|eot_id|>","<|start_header_id|>"],"temperature":0.7}',
    )
    config = json.dumps(
        {
            "model_format": "gguf",
            "model_family": "llama",
            "model_families": ["llama"],
            "model_type": "3.2B",
            "file_type": "Q4_K_M",
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }
    ).encode()
    (blobs / sha(config).replace(":", "-")).write_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": layers,
        },
        indent=3,
    ).encode()
    mdir = root / "manifests/registry.ollama.ai/library/llama3.2"
    mdir.mkdir(parents=True)
    (mdir / "latest").write_bytes(manifest)
    return manifest


# ---- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "full", "display"),
    [
        ("llama3.2", "registry.ollama.ai/library/llama3.2:latest", "llama3.2:latest"),
        ("gemma3:270m", "registry.ollama.ai/library/gemma3:270m", "gemma3:270m"),
        ("user/m:q4", "registry.ollama.ai/user/m:q4", "user/m:q4"),
        ("example.com:5000/ns/m:v1", "example.com:5000/ns/m:v1", "example.com:5000/ns/m:v1"),
        (
            "127.0.0.1:8080/library/tiny",
            "127.0.0.1:8080/library/tiny:latest",
            "127.0.0.1:8080/library/tiny:latest",
        ),
        ("http://host/ns/m", "host/ns/m:latest", "host/ns/m:latest"),
        (
            "Registry.Ollama.AI/Library/Llama:Latest",
            "Registry.Ollama.AI/Library/Llama:Latest",
            "Llama:Latest",
        ),
        ("a_b-c.d:e_f-g.h", "registry.ollama.ai/library/a_b-c.d:e_f-g.h", "a_b-c.d:e_f-g.h"),
    ],
)
def test_parse_name_valid(text: str, full: str, display: str) -> None:
    name = parse_name(text)
    assert name.full == full
    assert name.display == display


@pytest.mark.parametrize(
    "text",
    [
        "",
        "..",
        ".",
        "../x",
        "a/../b",
        "../../etc/passwd",
        "/abs",
        "/abs/path/model",
        "a//b",
        "a:",
        ":tag",
        "ns/",
        "h/ns/m/extra",
        "x/y/z/w:t",
        "ns.dot/m",
        "m:ta/g",
        "-lead",
        ".hidden",
        "a b",
        "a\\b",
        "a\x00b",
        "m:..",
        "m:.",
        "ftp://h/n/m",
        "a" * 81,
        "m@sha256:abc",
        "m;rm",
        "m:t:u",
    ],
)
def test_parse_name_invalid(text: str) -> None:
    with pytest.raises(CorralError) as exc:
        parse_name(text)
    assert http_status(exc.value) == 400
    assert exc.value.message == "invalid model name"


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "a" * 64,
        "sha256-" + "A" * 64,
    ],
)
def test_parse_digest_valid(text: str) -> None:
    assert parse_digest(text) == "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        "sha256:" + "a" * 63,
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,
        "sha256:../../" + "a" * 58,
        "sha256:" + "a" * 64 + "/../x",
        "../sha256-" + "a" * 64,
        None,
        5,
    ],
)
def test_parse_digest_invalid(text: object) -> None:
    with pytest.raises(CorralError) as exc:
        parse_digest(text)
    assert http_status(exc.value) == 400


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (8_030_261_248, "8.0B"),
        (3_000_000_000, "3B"),
        (268_098_176, "268.10M"),
        (137_000_000, "137M"),
        (408, "408"),
        (12_345, "12K"),
    ],
)
def test_human_number(n: int, text: str) -> None:
    assert human_number(n) == text


# ---- reading --------------------------------------------------------------------------------


def test_reads_an_ollama_written_store(tmp_path: Path, tiny_gguf: Path) -> None:
    manifest = ollama_store(tmp_path, tiny_gguf)
    store = Store(tmp_path)
    rec = store.resolve("llama3.2")
    assert rec.name == "llama3.2:latest"
    assert rec.full_name == "registry.ollama.ai/library/llama3.2:latest"
    assert rec.digest == hashlib.sha256(manifest).hexdigest()
    assert rec.model_path == tmp_path / "blobs" / sha(tiny_gguf.read_bytes()).replace(":", "-")
    assert rec.template == OLLAMA_TEMPLATE
    assert rec.system == "You are terse."
    assert rec.license == ["LLAMA LICENSE"]
    assert rec.parameters == {
        "num_ctx": 4096,
        "stop": ["<|eot_id|>", "<|start_header_id|>"],
        "temperature": 0.7,
    }
    assert rec.details.quantization_level == "Q4_K_M"
    assert rec.details.parameter_size == "3.2B"
    assert rec.details.families == ["llama"]
    assert rec.size == sum(p.stat().st_size for p in (tmp_path / "blobs").iterdir())
    assert [r.name for r in store.list()] == ["llama3.2:latest"]
    # lookups ignore case, as Ollama's
    assert store.resolve("LLAMA3.2:LATEST").digest == rec.digest


def test_resolve_unknown_is_404(tmp_path: Path) -> None:
    with pytest.raises(CorralError) as exc:
        Store(tmp_path).resolve("nope")
    assert http_status(exc.value) == 404
    assert "not found" in exc.value.message


def test_list_skips_garbage(tmp_path: Path, tiny_gguf: Path) -> None:
    ollama_store(tmp_path, tiny_gguf)
    bad = tmp_path / "manifests/registry.ollama.ai/library/bad"
    bad.mkdir()
    (bad / "latest").write_text("{not json")
    (tmp_path / "manifests/registry.ollama.ai/library/stray.txt").write_text("x")
    assert [r.name for r in Store(tmp_path).list()] == ["llama3.2:latest"]


# ---- blobs ----------------------------------------------------------------------------------


async def chunks(*parts: bytes):
    for p in parts:
        yield p


async def test_write_blob_stream_verifies(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = b"hello " * 100_000
    assert await store.write_blob_stream(sha(data), chunks(data[:1000], data[1000:]))
    assert store.blob_path(sha(data)).read_bytes() == data
    assert not await store.write_blob_stream(sha(data), chunks(b"ignored"))  # already present
    before = tree(tmp_path)
    with pytest.raises(CorralError) as exc:
        await store.write_blob_stream(sha(b"other"), chunks(data))
    assert http_status(exc.value) == 400
    assert exc.value.message == f'digest mismatch, expected "{sha(b"other")}", got "{sha(data)}"'
    assert tree(tmp_path) == before


async def test_write_blob_stream_cancelled_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    started = asyncio.Event()

    async def slow():
        yield b"x" * 10
        started.set()
        await asyncio.Event().wait()
        yield b""

    task = asyncio.create_task(store.write_blob_stream(sha(b"x" * 10), slow()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list((tmp_path / "blobs").iterdir()) == []


# ---- create / copy / delete ------------------------------------------------------------------


async def upload(store: Store, path: Path) -> str:
    data = path.read_bytes()
    await store.write_blob_stream(sha(data), chunks(data))
    return sha(data)


async def test_create_copy_delete(tmp_path: Path, tiny_gguf: Path) -> None:
    store = Store(tmp_path / "models")
    digest = await upload(store, tiny_gguf)
    seen: list[dict] = []
    rec = await store.create(
        "tiny",
        files={"tiny.gguf": digest},
        template=OLLAMA_TEMPLATE,
        system="Be brief.",
        parameters={"temperature": "0.5", "stop": "<eot>", "num_ctx": 512.0},
        license="MIT",
        messages=[{"role": "user", "content": "hi"}],
        progress=seen.append,
    )
    assert rec.name == "tiny:latest"
    assert rec.model_digest == digest
    assert rec.parameters == {"temperature": 0.5, "stop": ["<eot>"], "num_ctx": 512}
    assert rec.template == OLLAMA_TEMPLATE and rec.system == "Be brief."
    assert rec.license == ["MIT"]
    assert rec.messages == [{"role": "user", "content": "hi"}]
    assert rec.details.family == "llama" and rec.details.format == "gguf"
    assert rec.details.quantization_level
    assert [m["status"] for m in seen][:1] == ["parsing GGUF"]
    assert [m["status"] for m in seen][-2:] == ["writing manifest", "success"]

    derived = await store.create(
        "derived:v1", from_="tiny", system="Be verbose.", parameters={"top_k": 5}
    )
    assert derived.system == "Be verbose."
    assert derived.template == OLLAMA_TEMPLATE
    assert derived.parameters == {"temperature": 0.5, "stop": ["<eot>"], "num_ctx": 512, "top_k": 5}
    assert derived.details.parent_model == "tiny:latest"
    assert derived.model_path == rec.model_path

    await store.copy("tiny", "copy/tiny:x")
    assert store.resolve("copy/tiny:x").digest == rec.digest

    # deleting one name keeps blobs other manifests use
    await store.delete("tiny")
    assert rec.model_path.exists()
    assert not store.exists("tiny")
    await store.delete("copy/tiny:x")
    assert rec.model_path.exists()  # derived still uses the model blob
    await store.delete("derived:v1")
    assert not rec.model_path.exists()
    assert list((tmp_path / "models/blobs").iterdir()) == []
    assert list((tmp_path / "models/manifests").iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "status", "text"),
    [
        ({}, 400, "neither 'from' or 'files' was specified"),
        ({"from_": "missing"}, 404, "not found"),
        ({"files": {"../x.gguf": "@D"}}, 400, "file path must be relative"),
        ({"files": {"/abs.gguf": "@D"}}, 400, "file path must be relative"),
        ({"files": {"m.gguf": ""}}, 400, "invalid digest format"),
        ({"files": {"m.gguf": "sha256:../../etc/passwd"}}, 400, "invalid digest format"),
        ({"files": {"m.gguf": "sha256:" + "0" * 64}}, 400, "not found"),
        ({"files": {"m.safetensors": "@T"}}, 400, "convert the model to GGUF"),
        ({"files": {"m.bin": "@T"}}, 400, "convert the model to GGUF"),
        ({"files": {"m.gguf": "@T"}}, 400, "supplied file was not in GGUF format"),
        ({"files": {"m.gguf": "@D"}, "quantize": "q4_K_M"}, 400, "quantiz"),
        (
            {"files": {"m.gguf": "@D"}, "adapters": {"a": "@D", "b": "@D"}},
            400,
            "only one adapter is currently supported",
        ),
        ({"files": {"m.gguf": "@D"}, "parameters": {"num_ctx": "lots"}}, 400, "num_ctx"),
        (
            {"files": {"m.gguf": "@D"}, "messages": [{"role": "robot", "content": "x"}]},
            400,
            "message role",
        ),
        (
            {"files": {"m.gguf": "@D"}, "template": "{{ if .Prompt }}unclosed"},
            400,
            "template error",
        ),
    ],
)
async def test_create_rejects(
    tmp_path: Path, tiny_gguf: Path, kwargs: dict, status: int, text: str
) -> None:
    store = Store(tmp_path)
    digest = await upload(store, tiny_gguf)
    text_blob = b"not a gguf at all"
    await store.write_blob_stream(sha(text_blob), chunks(text_blob))

    def fill(v: object) -> object:
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return {"@D": digest, "@T": sha(text_blob)}.get(v, v) if isinstance(v, str) else v

    before = tree(tmp_path)
    with pytest.raises(CorralError) as exc:
        await store.create("bad", **{k: fill(v) for k, v in kwargs.items()})
    assert http_status(exc.value) == status
    assert text in exc.value.message
    assert tree(tmp_path) == before


async def test_create_replaces_and_prunes_old_layers(tmp_path: Path, tiny_gguf: Path) -> None:
    store = Store(tmp_path)
    digest = await upload(store, tiny_gguf)
    await store.create("m", files={"m.gguf": digest}, system="one")
    old_system = store.blob_path(sha(b"one"))
    assert old_system.exists()
    await store.create("m", files={"m.gguf": digest}, system="two")
    assert not old_system.exists()
    assert store.resolve("m").system == "two"

    keep = Store(tmp_path, noprune=True)
    await keep.create("m", files={"m.gguf": digest}, system="three")
    assert store.blob_path(sha(b"two")).exists()


async def test_concurrent_creates_of_one_name_do_not_corrupt(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    store = Store(tmp_path)
    digest = await upload(store, tiny_gguf)
    systems = [f"system {i}" for i in range(8)]
    await asyncio.gather(
        *(store.create("race", files={"m.gguf": digest}, system=s) for s in systems)
    )
    rec = store.resolve("race")
    assert rec.system in systems
    # every blob left is referenced (no torn manifest, no lost layer)
    assert {p.name for p in (tmp_path / "blobs").iterdir()} == {
        lay.digest.replace(":", "-") for lay in rec.manifest.all_layers()
    }


async def test_delete_during_create_keeps_the_blobs_create_uses(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    store = Store(tmp_path)
    digest = await upload(store, tiny_gguf)
    await store.create("a", files={"m.gguf": digest})
    parsed, go_on = asyncio.Event(), asyncio.Event()

    async def hold(msg: dict) -> None:
        if msg["status"] == "parsing GGUF":
            parsed.set()
            await go_on.wait()

    creating = asyncio.create_task(store.create("b", files={"m.gguf": digest}, progress=hold))
    await parsed.wait()
    await store.delete("a")  # the GGUF is unreferenced now, but "b" is about to use it
    assert store.has_blob(digest)
    go_on.set()
    rec = await creating
    assert rec.model_digest == digest and store.has_blob(digest)


async def test_copy_and_delete_errors_keep_store(tmp_path: Path, tiny_gguf: Path) -> None:
    ollama_store(tmp_path, tiny_gguf)
    store = Store(tmp_path)
    before = tree(tmp_path)
    for call, status in [
        (store.copy("missing", "x"), 404),
        (store.copy("../etc", "x"), 400),
        (store.copy("llama3.2", "../../escape"), 400),
        (store.copy("llama3.2", "/abs/x/y/z"), 400),
        (store.delete("missing"), 404),
        (store.delete("../../blobs/x"), 400),
    ]:
        with pytest.raises(CorralError) as exc:
            await call
        assert http_status(exc.value) == status
    assert tree(tmp_path) == before
    with pytest.raises(CorralError, match="invalid"):
        store.blob_path("sha256:../../manifests")


# ---- prune ----------------------------------------------------------------------------------


def test_prune_removes_unreferenced_and_partials(tmp_path: Path, tiny_gguf: Path) -> None:
    ollama_store(tmp_path, tiny_gguf)
    blobs = tmp_path / "blobs"
    kept = set(os.listdir(blobs))
    old = time.time() - 7200
    stale = {
        "sha256-" + "1" * 64,
        "sha256-" + "2" * 64 + "-partial",
        "sha256-" + "2" * 64 + "-partial-0",
        "tmp-123",
    }
    for n in stale:
        (blobs / n).write_bytes(b"junk")
        os.utime(blobs / n, (old, old))
    (blobs / ("sha256-" + "3" * 64)).write_bytes(b"fresh upload, not yet referenced")
    (blobs / ("sha256:" + "4" * 64)).write_bytes(b"legacy name")
    os.utime(blobs / ("sha256:" + "4" * 64), (old, old))
    (tmp_path / "manifests/registry.ollama.ai/empty/dir").mkdir(parents=True)
    assert Store(tmp_path).prune() == 4
    assert set(os.listdir(blobs)) == kept | {"sha256-" + "3" * 64, "sha256-" + "4" * 64}
    assert not (tmp_path / "manifests/registry.ollama.ai/empty").exists()
    assert Store(tmp_path).resolve("llama3.2").template == OLLAMA_TEMPLATE
    # with grace 0 the fresh unreferenced ones go too
    Store(tmp_path).prune(grace=0)
    assert set(os.listdir(blobs)) == kept


def test_gguf_variants(tmp_path: Path) -> None:
    from corral.daemon import gguf_info

    emb = gguf_info.read_info(make_gguf(tmp_path / "e.gguf", arch="bert", embedding=True))
    assert emb.is_embedding
    assert templates.capabilities(emb) == ["embedding"]
    chat = gguf_info.read_info(
        make_gguf(
            tmp_path / "c.gguf", chat_template="{% if tools %}{{ tools }}{% endif %}<think></think>"
        )
    )
    assert templates.capabilities(chat) == ["completion", "tools", "thinking"]
    assert templates.capabilities(chat, template="{{ .Prompt }}{{ .Suffix }}") == [
        "completion",
        "insert",
    ]
    assert templates.capabilities(chat, template="{{ .Tools }}", has_projector=True) == [
        "completion",
        "tools",
        "vision",
    ]
    # vision keys in the model GGUF alone are not enough: images need the projector
    vision_keys = msgspec.structs.replace(chat, has_vision=True)
    assert "vision" not in templates.capabilities(vision_keys)
    assert chat.layer_bytes and len(chat.layer_bytes) == chat.block_count
    assert chat.token_embd_bytes > 0 and chat.output_bytes > 0
    assert gguf_info.read_info(tmp_path / "c.gguf") is chat  # cached
    info = gguf_info.model_info(chat)
    assert "tokenizer.chat_template" not in info and "general.name" not in info
    assert info["tokenizer.ggml.tokens"] == []
    assert len(gguf_info.model_info(chat, verbose=True)["tokenizer.ggml.tokens"]) == 16


def test_fast_gguf_reader_matches_gguf_package(tmp_path: Path, tiny_gguf: Path) -> None:
    from gguf import GGUFReader

    from corral.daemon import gguf_info

    path = make_gguf(tmp_path / "t.gguf", chat_template="{{ messages }}", embedding=True)
    for p in (tiny_gguf, path):
        reader = GGUFReader(str(p))
        want = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            v = field.contents()
            want[key] = (
                [float(f"{x:.7g}") if isinstance(x, float) else x for x in v]
                if isinstance(v, list)
                else (float(f"{v:.7g}") if isinstance(v, float) else v)
            )
        assert gguf_info.read_metadata(p) == want
        info = gguf_info.read_info(p)
        assert [(t.name, t.type, t.shape, t.n_bytes) for t in info.tensors] == [
            (t.name, t.tensor_type.name, [int(x) for x in t.shape], int(t.n_bytes))
            for t in reader.tensors
        ]
        assert info.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)


def test_gguf_reader_rejects_garbage(tmp_path: Path, tiny_gguf: Path) -> None:
    from corral.daemon import gguf_info

    (tmp_path / "not.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    (tmp_path / "short.gguf").write_bytes(tiny_gguf.read_bytes()[:200])
    for name in ("not.gguf", "short.gguf"):
        with pytest.raises(ValueError):
            gguf_info.read_info(tmp_path / name)
