"""API keys: the key file, who a key is, which models it may use, and its per-minute limits.

Pure domain code (no HTTP): the api layer's ``auth`` middleware asks a :class:`Keyring` who sent
a request and a :class:`Limiter` whether that key may go on; ``corral key create`` writes the
file. The file (``CORRAL_API_KEYS_FILE``) is TOML; a key is stored only as its SHA-256::

    [[keys]]
    name = "ci"                  # shown in logs and metrics (never the key itself)
    sha256 = "9f86d08..."        # hex SHA-256 of the key's UTF-8 bytes
    scope = "inference"          # or "admin" (everything, model management included)
    models = ["llama3*", "gemma3:270m"]   # optional: names or globs; absent = every model
    requests_per_minute = 60     # optional, 0 = unlimited
    tokens_per_minute = 20000    # optional: generated tokens, 0 = unlimited

A plain SHA-256 suffices because keys are random 256-bit secrets (``new_secret``), not
passwords: nothing is gained by guessing through the hash.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
import secrets
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from corral.daemon.errors import InvalidRequest
from corral.daemon.models.store import ModelName, parse_name

Scope = Literal["inference", "admin"]
SCOPES: tuple[Scope, ...] = ("inference", "admin")
SECRET_PREFIX = "corral-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_GLOB = re.compile(r"[*?\[]")


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the file, the entry and the field."""


class ApiKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry of the key file."""

    name: str
    sha256: str
    scope: Scope = "inference"
    models: tuple[str, ...] = ()
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    # the class of its requests that send no X-Corral-Priority and whose model's policy names none
    priority: Literal["high", "normal", "low"] | None = None

    def allows_model(self, model: str) -> bool:
        """Whether this key may use the model named ``model`` (as a client wrote it). A key
        without ``models`` may use every model; a name that does not parse matches nothing."""
        if not self.models:
            return True
        try:
            name = parse_name(model)
        except InvalidRequest:
            return False
        return any(_matches(p, name) for p in self.models)


def _matches(pattern: str, name: ModelName) -> bool:
    """A plain pattern is a model name (``llama3`` = ``llama3:latest``, any case); a glob
    (``*``, ``?``, ``[...]``) matches the short or the full form of the name, ignoring case."""
    if not _GLOB.search(pattern):
        try:
            return parse_name(pattern).key() == name.key()
        except InvalidRequest:
            return False
    p = pattern.casefold()
    return any(fnmatch.fnmatchcase(s.casefold(), p) for s in (name.display, name.full))


class _KeyFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[ApiKey] = []


def hash_secret(secret: str) -> str:
    """The hex SHA-256 a key file stores for ``secret``."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def new_secret() -> str:
    """A fresh key: ``corral-`` and 43 URL-safe characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


class Keyring:
    """The keys of one key file, looked up by the hash of what a client sent."""

    def __init__(self, keys: list[ApiKey], source: Path | None = None) -> None:
        self.keys = keys
        self.source = source
        self._by_hash = {k.sha256: k for k in keys}

    def find(self, secret: str) -> ApiKey | None:
        return self._by_hash.get(hash_secret(secret))

    @classmethod
    def parse(cls, text: str, source: Path | None = None) -> Keyring:
        """Keys from the file's text. Raises :class:`KeyFileError` for anything doubtful: a
        typo must not open (or silently drop) a key."""
        where = str(source) if source is not None else "key file"
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise KeyFileError(f"{where}: not TOML: {e}") from None
        try:
            keys = msgspec.convert(data, type=_KeyFile).keys
        except msgspec.ValidationError as e:
            raise KeyFileError(f"{where}: {e}") from None
        seen: set[str] = set()
        for i, k in enumerate(keys):
            at = f"{where}: keys[{i}]"
            if not _NAME.fullmatch(k.name):
                raise KeyFileError(
                    f"{at}.name: {k.name!r} is not a key name (1-64 of A-Z a-z 0-9 . _ @ -, "
                    "starting with a letter or digit)"
                )
            if k.name in seen:
                raise KeyFileError(f"{at}.name: {k.name!r} is used twice")
            seen.add(k.name)
            if not _HEX64.fullmatch(k.sha256):
                raise KeyFileError(f"{at}.sha256: expected 64 lower-case hex digits")
            if any(not m for m in k.models):
                raise KeyFileError(f"{at}.models: an empty name")
            for field in ("requests_per_minute", "tokens_per_minute"):
                if getattr(k, field) < 0:
                    raise KeyFileError(f"{at}.{field}: must be 0 (unlimited) or more")
        hashes = [k.sha256 for k in keys]
        if len(set(hashes)) != len(hashes):
            raise KeyFileError(f"{where}: two entries have the same sha256")
        return cls(keys, source)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Keys from ``path`` (blocking file read). Raises :class:`KeyFileError`."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"{path}: cannot read the key file: {e}") from None
        return cls.parse(text, path)


def entry_toml(key: ApiKey) -> str:
    """``key`` as a ``[[keys]]`` table (strings as JSON strings, which TOML reads the same)."""
    lines = ["[[keys]]", f"name = {json.dumps(key.name)}", f"sha256 = {json.dumps(key.sha256)}"]
    lines.append(f"scope = {json.dumps(key.scope)}")
    if key.models:
        lines.append(f"models = [{', '.join(json.dumps(m) for m in key.models)}]")
    if key.requests_per_minute:
        lines.append(f"requests_per_minute = {key.requests_per_minute}")
    if key.tokens_per_minute:
        lines.append(f"tokens_per_minute = {key.tokens_per_minute}")
    if key.priority:
        lines.append(f"priority = {json.dumps(key.priority)}")
    return "\n".join(lines) + "\n"


def add_key(path: Path, key: ApiKey) -> None:
    """Append ``key`` to the key file at ``path`` (created with mode 0600 if missing). The new
    text is checked as a whole (unique name, valid fields) before it atomically replaces the
    file; on error the file is unchanged and :class:`KeyFileError` says why."""
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = ""
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e}") from None
    sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
    text = old + sep + entry_toml(key)
    Keyring.parse(text, path)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- per-key limits ---------------------------------------------------------------------------

LimitKind = Literal["requests", "tokens"]


@dataclass(slots=True)
class _Bucket:
    """A token bucket holding at most one minute's allowance, refilled continuously."""

    per_minute: int
    level: float
    at: float

    def refill(self, now: float) -> None:
        rate = self.per_minute / 60.0
        self.level = min(float(self.per_minute), self.level + (now - self.at) * rate)
        self.at = now

    def wait_for(self, need: float) -> float:
        """Seconds until the level reaches ``need`` (after :meth:`refill`)."""
        return max(0.0, (need - self.level) * 60.0 / self.per_minute)


class Limiter:
    """Requests per minute and generated tokens per minute, per key name.

    A request is admitted while its key's request bucket holds one request and its token
    bucket is not in debt; generated tokens are charged when known, so a long answer may take
    the token bucket below zero and the key waits until it refills. State is per key name and
    survives a key file reload (new limits apply from then on). Time is an argument.
    """

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, LimitKind], _Bucket] = {}

    def _bucket(self, key: ApiKey, kind: LimitKind, now: float) -> _Bucket | None:
        per_minute = key.requests_per_minute if kind == "requests" else key.tokens_per_minute
        if per_minute <= 0:
            self._buckets.pop((key.name, kind), None)
            return None
        b = self._buckets.get((key.name, kind))
        if b is None:
            b = self._buckets[(key.name, kind)] = _Bucket(per_minute, float(per_minute), now)
        else:
            b.refill(now)
            if b.per_minute != per_minute:  # the key file changed: keep the level, clamp it
                b.per_minute = per_minute
                b.level = min(b.level, float(per_minute))
        return b

    def admit(self, key: ApiKey, now: float) -> tuple[LimitKind, int] | None:
        """None and one request taken from ``key``'s allowance, or the exhausted limit and
        the whole seconds to wait (``Retry-After``, at least 1); nothing is taken then."""
        tokens = self._bucket(key, "tokens", now)
        if tokens is not None and tokens.level < 0:
            return "tokens", max(1, math.ceil(tokens.wait_for(0.0)))
        requests = self._bucket(key, "requests", now)
        if requests is not None:
            if requests.level < 1:
                return "requests", max(1, math.ceil(requests.wait_for(1.0)))
            requests.level -= 1
        return None

    def charge(self, key: ApiKey, tokens: int, now: float) -> None:
        """``tokens`` generated for ``key`` (may leave its token bucket in debt)."""
        b = self._bucket(key, "tokens", now)
        if b is not None:
            b.level -= tokens
