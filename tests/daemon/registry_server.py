"""Test helpers for the store and registry: a loopback Ollama/OCI registry and tiny GGUF files.

``RegistryServer`` is a small in-memory registry on 127.0.0.1 (aiohttp) that speaks the subset
of the distribution API Ollama uses: manifests GET/HEAD/PUT, blobs GET (with Range)/HEAD, and
the upload flow POST/PATCH/PUT. Knobs let tests break it on purpose:

* ``cut_after[digest] = n``: the next blob GET sends the right headers but closes after n bytes
  (one shot);
* ``stall_after[digest] = n``: blob GETs send n bytes, then hang until the server closes;
* ``corrupt.add(digest)``: a blob GET serves different bytes of the same length;
* ``fail_blob[digest] = status``: blob GETs answer that status;
* ``token = "..."``: every /v2 request needs ``Authorization: Bearer <token>``, else 401 with a
  Bearer challenge whose realm (``/token``) hands the token out.

Every request is recorded in ``requests`` as (method, path, Range header).

``make_gguf(path, ...)`` writes a small valid GGUF with the ``gguf`` package, with knobs the shared
``tiny_gguf`` fixture does not have (chat template, embedding pooling, architecture).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestServer

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OLLAMA_TEMPLATE = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_gguf(
    path: str | Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    n_layers: int = 2,
    n_embd: int = 8,
    vocab: int = 16,
    chat_template: str | None = None,
    embedding: bool = False,
    file_type: int = 1,
    name: str = "tiny",
) -> Path:
    """Write a small but well-formed GGUF (F16/F32 tensors of a toy transformer)."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(2 * n_embd)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(n_embd // 2)
    w.add_value_length(n_embd // 2)
    w.add_file_type(file_type)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if embedding:
        w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_tensor(
        "token_embd.weight", rng.random((vocab, n_embd), dtype=np.float32).astype(np.float16)
    )
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.random(n_embd, dtype=np.float32))
        w.add_tensor(
            f"blk.{i}.attn_q.weight",
            rng.random((n_embd, n_embd), dtype=np.float32).astype(np.float16),
        )
    w.add_tensor("output_norm.weight", rng.random(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", rng.random((vocab, n_embd), dtype=np.float32).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class RegistryServer:
    """In-memory registry. Use ``async with RegistryServer() as reg`` and ``reg.host``."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.uploads: dict[str, bytearray] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_after: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self._closing = asyncio.Event()
        self.corrupt: set[str] = set()
        self.fail_blob: dict[str, int] = {}
        self.token: str | None = None
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/token", self._token)
        r = app.router
        r.add_route("*", "/v2/{ns}/{model}/manifests/{tag}", self._manifest)
        r.add_route("*", "/v2/{ns}/{model}/blobs/uploads/", self._start_upload)
        r.add_route("*", "/v2/{ns}/{model}/blobs/{digest}", self._blob)
        r.add_route("*", "/v2/uploads/{id}", self._upload)
        self._server = TestServer(app, host="127.0.0.1")

    async def __aenter__(self) -> RegistryServer:
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        await self._server.close()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.port}"

    def publish(
        self,
        repo: str,
        tag: str,
        layers: list[tuple[str, bytes]],
        config: Mapping[str, Any] | None = None,
    ) -> bytes:
        """Store blobs and a manifest for ``repo:tag``; returns the manifest bytes."""
        cfg = json.dumps(
            dict(
                config
                or {
                    "model_format": "gguf",
                    "model_family": "llama",
                    "model_families": ["llama"],
                    "model_type": "1K",
                    "file_type": "F16",
                }
            )
        ).encode()
        self.blobs[sha256(cfg)] = cfg
        entries = []
        for media, data in layers:
            self.blobs[sha256(data)] = data
            entries.append({"mediaType": media, "digest": sha256(data), "size": len(data)})
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_V2,
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "digest": sha256(cfg),
                    "size": len(cfg),
                },
                "layers": entries,
            },
            indent=3,
        ).encode()  # unlike ours: proves pulls keep the bytes verbatim
        self.manifests[(repo, tag)] = manifest
        return manifest

    def blob_requests(self, digest: str) -> list[str | None]:
        return [rng for m, p, rng in self.requests if m == "GET" and p.endswith(digest)]

    # ---- handlers ---------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token is None or not request.path.startswith("/v2/"):
            return await handler(request)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self._log(request)
            realm = f"http://{self.host}/token"
            return web.Response(
                status=401,
                headers={
                    "WWW-Authenticate": (
                        f'Bearer realm="{realm}",service="test",scope="repository:x:pull"'
                    )
                },
            )
        return await handler(request)

    async def _token(self, request: web.Request) -> web.Response:
        assert request.query.get("service") == "test"
        return web.json_response({"token": self.token})

    def _log(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path, request.headers.get("Range")))

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        key = (
            f"{request.match_info['ns']}/{request.match_info['model']}",
            request.match_info["tag"],
        )
        if request.method == "PUT":
            self.manifests[key] = await request.read()
            return web.Response(status=201)
        data = self.manifests.get(key)
        if data is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        return web.Response(
            body=data if request.method == "GET" else None,
            content_type=MANIFEST_V2,
            headers={"Docker-Content-Digest": sha256(data)},
        )

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        digest = request.match_info["digest"]
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        if digest in self.fail_blob:
            return web.Response(status=self.fail_blob[digest], text="broken on purpose")
        if digest in self.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        start, end, status = 0, len(data) - 1, 200
        if rng := request.headers.get("Range"):
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end, status = int(a), (int(b) if b else len(data) - 1), 206
        body = data[start : end + 1]
        resp = web.StreamResponse(status=status)
        resp.content_length = len(body)
        resp.content_type = "application/octet-stream"
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        await resp.prepare(request)
        if (stall := self.stall_after.get(digest)) is not None:
            await resp.write(body[: max(0, stall - start)])
            await self._closing.wait()
            return resp
        cut = self.cut_after.pop(digest, None)
        if cut is not None:
            sent = max(0, cut - start)
            await resp.write(body[:sent])
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp

    async def _start_upload(self, request: web.Request) -> web.Response:
        self._log(request)
        upload_id = uuid.uuid4().hex
        self.uploads[upload_id] = bytearray()
        return web.Response(status=202, headers={"Location": f"/v2/uploads/{upload_id}"})

    async def _upload(self, request: web.Request) -> web.Response:
        self._log(request)
        upload_id = request.match_info["id"]
        buf = self.uploads.get(upload_id)
        if buf is None:
            return web.Response(status=404)
        if request.method == "PATCH":
            start = int(request.headers["Content-Range"].split("-")[0])
            if start != len(buf):
                return web.Response(status=416)
            buf.extend(await request.read())
            return web.Response(status=202, headers={"Location": f"/v2/uploads/{upload_id}"})
        if request.method == "PUT":
            buf.extend(await request.read())
            digest = request.query.get("digest", "")
            if sha256(bytes(buf)) != digest:
                return web.json_response({"errors": [{"code": "DIGEST_INVALID"}]}, status=400)
            self.blobs[digest] = bytes(buf)
            del self.uploads[upload_id]
            return web.Response(status=201)
        return web.Response(status=405)
