"""The operator's policy file (``CORRAL_POLICY=/path/policy.toml``): per-model slots, defaults,
pins, priorities, queue limits, replicas and GPUs.

    [models."llama3.1:70b"]
    pinned = true            # never evicted, loaded at start
    num_parallel = 2         # slots per runner (else OLLAMA_NUM_PARALLEL)
    gpus = ["0"]             # GPU ids its runners may use

    [models."qwen2.5*"]      # a glob (fnmatch: * ? [...]) over model names
    priority = "low"         # class of its requests that send no X-Corral-Priority
    max_queue = 32           # its own 503 threshold (OLLAMA_MAX_QUEUE still counts)
    keep_alive = "10m"       # default when a request does not say (seconds, or a Go duration)
    num_ctx = 8192           # default when neither the request nor the Modelfile says
    replicas = 2             # most runners of it at once

Which rule applies to a model name: every glob that matches it in file order, then its exact
entry, each key taken from the last of them that sets it (so ``[models."*"]`` can give
everyone a default and a model's own table overrides it). A name without a tag also matches its
``:latest`` form, both ways.

:func:`load` reads and checks the file (``tomllib``); anything wrong raises
:class:`PolicyError` naming the file and the line. Pure apart from reading the file; no
environment, no logging.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from corral.daemon.config import keep_alive_from_json
from corral.scheduler import PRIORITIES, ModelPolicy, Priority

KEYS = (
    "num_parallel",
    "keep_alive",
    "num_ctx",
    "pinned",
    "priority",
    "max_queue",
    "replicas",
    "gpus",
)


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file and line."""


class ModelRule(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What one table (or the merge of the tables that match a name) sets; None = not set."""

    num_parallel: int | None = None
    keep_alive: float | None = None  # seconds, inf = forever
    num_ctx: int | None = None
    pinned: bool | None = None
    priority: Priority | None = None
    max_queue: int | None = None
    replicas: int | None = None
    gpus: tuple[str, ...] | None = None

    def merged(self, over: ModelRule) -> ModelRule:
        """This rule with every key ``over`` sets replaced."""
        return msgspec.structs.replace(
            self,
            **{k: v for k in KEYS if (v := getattr(over, k)) is not None},
        )

    def scheduler_policy(self, name: str) -> ModelPolicy:
        return ModelPolicy(
            name=name,
            num_parallel=self.num_parallel or 0,
            pinned=bool(self.pinned),
            priority=Priority.NORMAL if self.priority is None else self.priority,
            max_queue=self.max_queue or 0,
            replicas=self.replicas or 1,
            gpus=self.gpus or (),
        )

    def describe(self) -> dict[str, Any]:
        """The keys it sets, as an operator wrote them (for /api/ps and ``corral doctor``)."""
        out: dict[str, Any] = {}
        for k in KEYS:
            v = getattr(self, k)
            if v is None:
                continue
            if k == "priority":
                v = v.name.lower()
            elif k == "keep_alive":
                v = -1 if math.isinf(v) else v
            elif k == "gpus":
                v = list(v)
            out[k] = v
        return out


NO_RULE = ModelRule()


class Policy(msgspec.Struct, frozen=True):
    """A loaded policy file: its tables in file order (pattern, rule), and where it came from."""

    rules: tuple[tuple[str, ModelRule], ...] = ()
    path: str | None = None

    def matches(self, name: str) -> list[str]:
        """The patterns that apply to ``name``, least specific first."""
        names = {name}
        if name.endswith(":latest"):
            names.add(name.removesuffix(":latest"))
        elif ":" not in name:
            names.add(name + ":latest")
        globs = [
            p
            for p, _ in self.rules
            if _is_glob(p) and any(fnmatch.fnmatchcase(n, p) for n in names)
        ]
        exact = [p for p, _ in self.rules if not _is_glob(p) and p in names]
        return globs + exact

    def rule_for(self, name: str) -> ModelRule:
        """What applies to model ``name`` (:data:`NO_RULE` when nothing matches)."""
        if not self.rules:
            return NO_RULE
        by = dict(self.rules)
        rule = NO_RULE
        for p in self.matches(name):
            rule = rule.merged(by[p])
        return rule

    def pinned_patterns(self) -> list[str]:
        return [p for p, r in self.rules if r.pinned]


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _line_of(lines: list[str], table: str | None, key: str | None = None) -> int:
    """The 1-based line of ``[models."table"]`` (and of ``key`` in it), best effort."""
    start = 0
    if table is not None:
        head = re.compile(r"\s*\[\s*models\s*\.\s*(?:\"|')?" + re.escape(table) + r"(?:\"|')?\s*\]")
        for i, line in enumerate(lines):
            if head.match(line):
                start = i
                break
        else:
            return 1
    if key is None:
        return start + 1
    k = re.compile(r"\s*" + re.escape(key) + r"\s*=")
    for i in range(start + (table is not None), len(lines)):
        if lines[i].lstrip().startswith("["):
            break
        if k.match(lines[i]):
            return i + 1
    return start + 1


def _positive_int(value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"must be an integer >= {minimum}, not {value!r}")
    return value


def _check(key: str, value: Any) -> Any:
    """One key's value, typed; ValueError with the reason when it is wrong."""
    if key in ("num_parallel", "max_queue", "replicas"):
        return _positive_int(value)
    if key == "num_ctx":
        return _positive_int(value, 4)
    if key == "pinned":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}")
        return value
    if key == "priority":
        p = PRIORITIES.get(value) if isinstance(value, str) else None
        if p is None:
            raise ValueError(f'must be "high", "normal" or "low", not {value!r}')
        return p
    if key == "keep_alive":
        try:
            return keep_alive_from_json(value)
        except ValueError as e:
            raise ValueError(f'must be seconds or a duration like "10m": {e}') from None
    if key == "gpus":
        if not isinstance(value, list) or not value:
            raise ValueError(f'must be a non-empty list of GPU ids like ["0", "1"], not {value!r}')
        ids = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise ValueError(f"GPU ids are strings or integers, not {v!r}")
            ids.append(str(v))
        return tuple(ids)
    raise ValueError(f"unknown key (known: {', '.join(KEYS)})")


def parse(text: str, path: str = "<policy>") -> Policy:
    """The policy in ``text``; :class:`PolicyError` naming ``path`` and the line when wrong."""
    lines = text.splitlines()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{path}: {e}") from None
    for top in doc:
        if top != "models":
            n = next((i + 1 for i, ln in enumerate(lines) if top in ln), 1)
            raise PolicyError(f'{path}:{n}: unknown table "{top}" (only [models."NAME"] tables)')
    models = doc.get("models", {})
    if not isinstance(models, dict):
        raise PolicyError(f"{path}:{_line_of(lines, None, 'models')}: models must be tables")
    rules = []
    for pattern, table in models.items():
        where = _line_of(lines, pattern)
        if not isinstance(table, dict):
            raise PolicyError(f'{path}:{where}: models."{pattern}" must be a table of keys')
        if not pattern.strip():
            raise PolicyError(f"{path}:{where}: an empty model name")
        values = {}
        for key, value in table.items():
            try:
                values[key] = _check(key, value)
            except ValueError as e:
                n = _line_of(lines, pattern, key)
                raise PolicyError(f'{path}:{n}: models."{pattern}".{key}: {e}') from None
        rules.append((pattern, ModelRule(**values)))
    return Policy(tuple(rules), path)


def load(path: str | Path) -> Policy:
    """Read and check the policy file at ``path`` (blocking: a small file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: cannot read the policy file: {e}") from None
    return parse(text, str(path))


__all__ = ["NO_RULE", "ModelRule", "Policy", "PolicyError", "load", "parse"]
