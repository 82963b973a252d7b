"""Request parsing shared by the inference routes: bodies, keep_alive, options, format, think.

Every function here either returns a clean value or raises ``ApiError`` with Ollama's text
(reference §1.1, §1.15, §2). Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import msgspec

from corral.daemon.api.errors import ApiError
from corral.daemon.config import keep_alive_from_json
from corral.daemon.store import KNOWN_PARAMS, type_param

# The api.Runner options: they decide how a model is loaded (a change forces a reload).
LOAD_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread",
                          "draft_num_predict", "low_vram", "f16_kv", "logits_all", "vocab_only",
                          "use_mlock", "numa"})

_KIND = {bool: "boolean", int: "integer", float: "float32", list: "array"}


class Message(msgspec.Struct, omit_defaults=True):
    role: str = ""
    content: str | None = ""
    thinking: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str = ""
    tool_call_id: str = ""


class GenerateRequest(msgspec.Struct):
    model: str = ""
    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool | None = None
    raw: bool = False
    format: Any = None
    keep_alive: Any = None
    images: list[str] | None = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    truncate: bool | None = None
    shift: bool | None = None


class ChatRequest(msgspec.Struct):
    model: str = ""
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    stream: bool | None = None
    format: Any = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    truncate: bool | None = None
    shift: bool | None = None


class EmbedRequest(msgspec.Struct):
    model: str = ""
    input: Any = None
    truncate: bool | None = None
    dimensions: int | None = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None


class EmbeddingsRequest(msgspec.Struct):
    model: str = ""
    prompt: str = ""
    keep_alive: Any = None
    options: dict[str, Any] | None = None


def decode(raw: bytes, kind: type[Any]) -> Any:
    """A JSON request body -> ``kind``; empty -> 400 ``missing request body``; bad -> 400."""
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        raise ApiError(400, f"invalid request body: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"invalid JSON in request body: {e}") from None


def keep_alive(value: Any) -> float | None:
    """The request's ``keep_alive`` in seconds (``math.inf`` = forever, None = not given)."""
    try:
        return keep_alive_from_json(value)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def request_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """A request's ``options`` typed as Go decodes them into ``api.Options``: numbers for number
    fields (ints truncated), bools, a list of strings for ``stop``; unknown keys are dropped.
    A wrong type is Ollama's ``option "x" must be of type ...`` (a 500 there, as here)."""
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key not in KNOWN_PARAMS or value is None:
            continue
        try:
            typed = type_param(key, value)
        except ApiError as e:
            raise ApiError(500, e.message) from None
        if isinstance(value, str) or (key == "stop" and not isinstance(value, list)):
            # Go's JSON decoding never converts a string into a number or bool
            raise ApiError(500, f'option "{key}" must be of type {_KIND[type(typed)]}')
        out[key] = typed
    return out


def merge_options(model_params: dict[str, Any] | None, request: dict[str, Any] | None) -> dict[str, Any]:
    """Ollama's merge: defaults (left to the runner / SamplingOptions) <- Modelfile parameters <-
    request options. Only known keys survive."""
    merged = {k: v for k, v in (model_params or {}).items() if k in KNOWN_PARAMS}
    merged.update(request_options(request))
    return merged


def parse_format(value: Any) -> str | dict[str, Any] | None:
    """``format``: ``"json"``, a JSON-schema object, or unset (``null``/``""``)."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, dict):
        return value
    raw = json.dumps(value, separators=(",", ":"))
    raise ApiError(500, f'invalid format: {json.dumps(raw)}; expected "json" or a valid JSON Schema object')


def parse_think(value: Any) -> tuple[bool, str, bool]:
    """``think`` -> (enabled, level, explicitly set). Levels: high, medium, low, max."""
    if value is None:
        return False, "", False
    if isinstance(value, bool):
        return value, "", True
    if isinstance(value, str) and value in ("high", "medium", "low", "max"):
        return True, value, True
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true", "", True
    raise ApiError(400, f'invalid think value: {json.dumps(value)} '
                        '(must be "high", "medium", "low", "max", true, or false)')


def check_images(images: list[str] | None) -> list[bytes]:
    """Images are plain standard base64; a bad one is Go's ``illegal base64 data`` 400."""
    out = []
    for img in images or []:
        try:
            out.append(base64.b64decode(img, validate=True))
        except (binascii.Error, ValueError):
            pos = next((i for i, c in enumerate(img) if c not in _B64), len(img))
            raise ApiError(400, f"illegal base64 data at input byte {pos}") from None
    return out


_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
