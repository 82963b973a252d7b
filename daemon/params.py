"""Ollama's model parameters: which keys exist, the type of each, and how a value is typed.

One table for everyone who reads a parameter: Modelfile ``PARAMETER`` lines and ``/api/create``
``parameters`` (the store), request ``options`` (the api layer) and the default model. Types are
Ollama's ``api.Options``/``api.Runner`` field types; the error text is Ollama's
(``option "x" must be of type integer``).

:class:`RequestOptions` is a request's options parsed once: built by
:meth:`RequestOptions.build` from the model's Modelfile parameters overridden by the request's
``options`` (the only place they are merged), then read as typed fields by the scheduler's load
options (``model_inputs.runner_options``) and the runner's sampling options
(:meth:`RequestOptions.sampling`), neither of which checks a type again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from corral.daemon.errors import Failed, InvalidRequest
from corral.runner.protocol import SamplingOptions

_INT_PARAMS = frozenset(
    {
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "draft_num_predict",
        "mirostat",
    }
)
_FLOAT_PARAMS = frozenset(
    {
        "top_p",
        "min_p",
        "typical_p",
        "temperature",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "tfs_z",
        "mirostat_tau",
        "mirostat_eta",
    }
)
_BOOL_PARAMS = frozenset(
    {
        "use_mmap",
        "penalize_newline",
        "numa",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mlock",
    }
)
_LIST_PARAMS = frozenset({"stop"})
KNOWN_PARAMS = _INT_PARAMS | _FLOAT_PARAMS | _BOOL_PARAMS | _LIST_PARAMS


def _bad_param(key: str, kind: str) -> InvalidRequest:
    return InvalidRequest(f'option "{key}" must be of type {kind}')


def type_param(key: str, value: Any) -> Any:
    """One Modelfile/create parameter value -> its typed form (raises InvalidRequest on a bad one).

    Strings are converted by the key's type; ``stop`` always becomes a list of strings; values of
    unknown keys are kept as given (Ollama stores them and ignores them at run time).
    """
    if key in _LIST_PARAMS:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise _bad_param(key, "array")
        return list(items)
    if key in _INT_PARAMS:
        return _number(key, value, int, "integer")
    if key in _FLOAT_PARAMS:
        return _number(key, value, float, "float32")
    if key in _BOOL_PARAMS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "t"):
            return True
        if text in ("false", "0", "f"):
            return False
        raise _bad_param(key, "boolean")
    return value


def _number(key: str, value: Any, cast: Callable[[Any], Any], kind: str) -> Any:
    """A number option: JSON numbers cast as they are; text parsed, "3.0" accepted for an int."""
    if isinstance(value, bool):
        raise _bad_param(key, kind)
    if isinstance(value, (int, float)):
        return cast(value)
    text = str(value).strip()
    try:
        return cast(text)
    except ValueError:
        try:
            return cast(float(text))
        except (ValueError, OverflowError):  # OverflowError: "inf" / "1e999" for an integer
            raise _bad_param(key, kind) from None


def typed_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: type_param(k, v) for k, v in params.items()}


# Go's ``int`` (int64): a JSON number outside it is a decode error there, never a wrap-around here.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

_KIND = {bool: "boolean", int: "integer", float: "float32", list: "array"}


def type_option(key: str, value: Any) -> Any:
    """One request ``options`` value of a known key, typed as Go decodes JSON into
    ``api.Options``: numbers for number fields (ints truncated), bools (only ``true`` /
    ``false``: Go refuses ``1``, ``0`` or ``"true"`` for a bool), a list of strings for
    ``stop``. A wrong type is Ollama's ``option "x" must be of type ...`` (InvalidRequest: 400,
    where Ollama answers 500 for this client error); an integer outside int64 (``1e30``) is
    ``option "x" is out of range: ...``, where Go would silently wrap it."""
    if key in _BOOL_PARAMS and not isinstance(value, bool):
        raise _bad_param(key, "boolean")
    typed = type_param(key, value)
    if isinstance(value, str) or (key == "stop" and not isinstance(value, list)):
        # Go's JSON decoding never converts a string into a number or bool
        raise _bad_param(key, _KIND[type(typed)])
    if type(typed) is int and not INT64_MIN <= typed <= INT64_MAX:
        raise InvalidRequest(f'option "{key}" is out of range: {value}')
    return typed


class RequestOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Every option Ollama knows (``api.Runner`` + ``api.Options``), typed; None = not given
    (the runner's or the scheduler's default applies). Build it with :meth:`build`; a value
    here is never checked again."""

    # api.Runner: how the model is loaded (a change forces a reload)
    num_ctx: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    use_mmap: bool | None = None
    num_thread: int | None = None
    # legacy load flags Ollama still accepts (typed, then ignored here)
    draft_num_predict: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mlock: bool | None = None
    numa: bool | None = None
    # api.Options: how tokens are predicted (the runner's SamplingOptions)
    num_keep: int | None = None
    seed: int | None = None
    num_predict: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_last_n: int | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] | None = None
    # sampling options Ollama knows and the runner does not implement (typed, then ignored)
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    tfs_z: float | None = None
    penalize_newline: bool | None = None

    @classmethod
    def build(
        cls, parameters: Mapping[str, Any] | None, options: Mapping[str, Any] | None
    ) -> RequestOptions:
        """Ollama's merge, the one place it happens: Modelfile ``parameters`` <- request
        ``options``; unknown keys and nulls are dropped. A request value of the wrong type
        raises InvalidRequest (:func:`type_option`); a stored parameter that does not type (a
        corrupt params blob: the store keeps it as read) raises Failed."""
        fields: dict[str, Any] = {}
        for key, value in (parameters or {}).items():
            if key in KNOWN_PARAMS and value is not None:
                try:
                    fields[key] = type_param(key, value)
                except InvalidRequest as e:
                    raise Failed(f"model parameter: {e.message}") from None
        for key, value in (options or {}).items():
            if key in KNOWN_PARAMS and value is not None:
                fields[key] = type_option(key, value)
        if "stop" in fields:
            fields["stop"] = tuple(fields["stop"])
        return cls(**fields)

    def sampling(self) -> SamplingOptions:
        """The runner's sampling options: the given predict options over the runner's defaults."""
        given = {k: v for k in _SAMPLING if (v := getattr(self, k)) is not None}
        if self.stop is not None:
            given["stop"] = list(self.stop)
        return SamplingOptions(**given)


# the predict options the runner implements (each is a RequestOptions field: tests check both)
_SAMPLING = SamplingOptions.__struct_fields__
