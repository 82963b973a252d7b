"""Ollama's model parameters: which keys exist, the type of each, and how a value is typed.

One table for everyone who reads a parameter: Modelfile ``PARAMETER`` lines and ``/api/create``
``parameters`` (the store), request ``options`` (the api layer) and the default model. Types are
Ollama's ``api.Options``/``api.Runner`` field types; the error text is Ollama's
(``option "x" must be of type integer``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from corral.daemon.errors import InvalidRequest

_INT_PARAMS = frozenset({
    "num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
    "main_gpu", "num_thread", "draft_num_predict", "mirostat",
})
_FLOAT_PARAMS = frozenset({
    "top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "tfs_z", "mirostat_tau", "mirostat_eta",
})
_BOOL_PARAMS = frozenset({
    "use_mmap", "penalize_newline", "numa", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mlock",
})
_LIST_PARAMS = frozenset({"stop"})
KNOWN_PARAMS = _INT_PARAMS | _FLOAT_PARAMS | _BOOL_PARAMS | _LIST_PARAMS


def _bad_param(key: str, kind: str) -> InvalidRequest:
    return InvalidRequest( f'option "{key}" must be of type {kind}')


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
        if isinstance(value, bool):
            raise _bad_param(key, "integer")
        if isinstance(value, (int, float)):
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            try:
                return int(float(str(value).strip()))
            except ValueError:
                raise _bad_param(key, "integer") from None
    if key in _FLOAT_PARAMS:
        if isinstance(value, bool):
            raise _bad_param(key, "float32")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise _bad_param(key, "float32") from None
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


def typed_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: type_param(k, v) for k, v in params.items()}
