"""Request parsing shared by the inference routes: bodies, keep_alive, format, think, images.

Every function here either returns a clean value or raises ``ApiError`` with Ollama's text
(reference §1.1, §1.15, §2). Pure: no I/O, no clock. A request's ``options`` are typed and
merged with the Modelfile's once, by ``params.RequestOptions.build``; here only the warning
about the ones that have no effect (:func:`ignored_options`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from typing import Annotated, Any

import msgspec

from corral.daemon.api.errors import ApiError
from corral.daemon.config import keep_alive_from_json
from corral.daemon.params import INT64_MAX, INT64_MIN, KNOWN_PARAMS
from corral.daemon.prompt.thinking import NO_THINK, Think

Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
# A token id (llama.cpp's int32 llama_token; negative ids do not exist).
Token = Annotated[int, msgspec.Meta(ge=0, le=(1 << 31) - 1)]


class ToolCallFunction(msgspec.Struct, omit_defaults=True):
    name: str = ""
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    index: Int64 | None = None


class ToolCall(msgspec.Struct, omit_defaults=True):
    """``api.ToolCall``: the shape is checked, the dict form goes on to the templates."""

    function: ToolCallFunction
    id: str = ""


class ToolFunction(msgspec.Struct):
    name: str = ""
    description: str = ""
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct):
    """``api.Tool`` (only checked: templates read the request's dicts)."""

    type: str = ""
    function: ToolFunction | None = None


class _Tools(msgspec.Struct):
    """What a ``tools`` field is checked against (it stays the client's JSON for templates)."""

    tools: list[Tool]


class Message(msgspec.Struct, omit_defaults=True):
    role: str = ""
    content: str | None = ""
    thinking: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str = ""
    tool_call_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The message as the templates read it: every field, tool calls as plain dicts."""
        d = msgspec.structs.asdict(self)
        if self.tool_calls is not None:
            d["tool_calls"] = msgspec.to_builtins(self.tool_calls)
        return d


class GenerateRequest(msgspec.Struct):
    model: str = ""
    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    context: list[Token] | None = None
    stream: bool | None = None
    raw: bool = False
    format: Any = None
    keep_alive: Any = None
    images: list[str] | None = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool = False
    top_logprobs: Int64 = 0
    debug_render_only: bool = msgspec.field(default=False, name="_debug_render_only")


class ChatRequest(msgspec.Struct):
    model: str = ""
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None  # each checked against Tool by decode()
    stream: bool | None = None
    format: Any = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool = False
    top_logprobs: Int64 = 0
    debug_render_only: bool = msgspec.field(default=False, name="_debug_render_only")


class EmbedRequest(msgspec.Struct):
    model: str = ""
    input: Any = None
    truncate: bool | None = None
    dimensions: Int64 | None = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None


class EmbeddingsRequest(msgspec.Struct):
    model: str = ""
    prompt: str = ""
    keep_alive: Any = None
    options: dict[str, Any] | None = None


def decode_json(raw: bytes) -> Any:
    """A request body as JSON values; empty -> 400 ``missing request body``; malformed (also
    NaN, Infinity, numbers beyond float64, lone surrogates, nesting too deep) -> 400."""
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        return msgspec.json.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as e:
        raise ApiError(400, f"invalid JSON in request body: {e}") from None


@functools.cache
def _wire_names(kind: type[msgspec.Struct]) -> dict[str, str]:
    """lower-cased wire name -> wire name of each field of ``kind`` (``msgspec.structs.fields``
    evaluates the type annotations: ~50 µs a call, so once per type)."""
    return {f.encode_name.lower(): f.encode_name for f in msgspec.structs.fields(kind)}


def fold_keys(data: Any, kind: type[msgspec.Struct]) -> Any:
    """Go's field matching: top-level keys of ``data`` that equal a field of ``kind`` ignoring
    case are renamed to it (an exact-case key wins over a differently cased duplicate)."""
    if not isinstance(data, dict):
        return data
    fields = _wire_names(kind)
    folded: dict[str, Any] = {}
    for key, value in data.items():
        wire = fields.get(key.lower()) or key
        if wire not in folded or key == wire:
            folded[wire] = value
    return folded


def convert(data: Any, kind: type[msgspec.Struct]) -> Any:
    """Decoded JSON -> ``kind`` with Go's ``encoding/json`` rules for a struct: ``null`` is an
    empty object, keys fold as :func:`fold_keys`, unknown keys are ignored, a wrong type is a
    400 naming the field. A ``tools`` field is checked against :class:`Tool`."""
    try:
        out = msgspec.convert(fold_keys({} if data is None else data, kind), type=kind)
        tools = getattr(out, "tools", None)
        if tools:
            msgspec.convert({"tools": tools}, type=_Tools)  # errors say $.tools[i]...
    except msgspec.ValidationError as e:
        raise ApiError(400, f"invalid request body: {e}") from None
    return out


def decode(raw: bytes, kind: type[Any]) -> Any:
    """A JSON request body -> ``kind`` (:func:`decode_json` then :func:`convert`)."""
    return convert(decode_json(raw), kind)


def keep_alive(value: Any) -> float | None:
    """The request's ``keep_alive`` in seconds (``math.inf`` = forever, None = not given)."""
    try:
        return keep_alive_from_json(value)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


# Options Ollama knows (current or legacy names clients still send) that corral's runner does
# not implement: mirostat sampling, tail-free sampling, newline penalty, speculative decoding
# and the legacy load flags. They are accepted and ignored, and named in a warning.
UNHONOURED_OPTIONS = frozenset(
    {
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "tfs_z",
        "penalize_newline",
        "draft_num_predict",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mlock",
        "numa",
    }
)


def ignored_options(options: dict[str, Any] | None) -> list[str]:
    """The keys of a request's ``options`` that will have no effect: unknown to Ollama, or
    known but not implemented here (:data:`UNHONOURED_OPTIONS`). Sorted."""
    return sorted(
        k
        for k, v in (options or {}).items()
        if v is not None and (k not in KNOWN_PARAMS or k in UNHONOURED_OPTIONS)
    )


def parse_format(value: Any) -> str | dict[str, Any] | None:
    """``format``: ``"json"``, a JSON-schema object, or unset (``null``/``""``)."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, dict):
        return value
    raw = json.dumps(value, separators=(",", ":"))
    # Ollama's text; its status is 500, ours 400: the request is wrong, not the server
    raise ApiError(
        400, f'invalid format: {json.dumps(raw)}; expected "json" or a valid JSON Schema object'
    )


def parse_think(value: Any) -> Think:
    """``think`` -> (enabled, level, explicitly set). Levels: high, medium, low, max."""
    if value is None:
        return NO_THINK
    if isinstance(value, bool):
        return Think(value, "", True)
    if isinstance(value, str) and value in ("high", "medium", "low", "max"):
        return Think(True, value, True)
    if isinstance(value, str) and value in ("true", "false"):
        return Think(value == "true", "", True)
    raise ApiError(
        400,
        f"invalid think value: {json.dumps(value)} "
        '(must be "high", "medium", "low", "max", true, or false)',
    )


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
