"""Ollama-format model store: names, manifests, content-addressed blobs, create/copy/delete/prune.

Layout under the root (``OLLAMA_MODELS``), the same one Ollama writes, so both can share it::

    manifests/<host>/<namespace>/<model>/<tag>     manifest JSON (Docker distribution v2 shape)
    blobs/sha256-<64 hex>                          content-addressed blobs

Contracts:
* Every name and digest that reaches a path is validated first (:func:`parse_name`,
  :func:`parse_digest`); anything that could leave the store is ``InvalidRequest``.
* Writes are atomic: a temp file in the target directory, fsync, ``os.replace``. A reader sees
  the old file or the new one, never a torn one. Writers of one name (create, pull) are
  serialised by a per-name lock; manifest commits, deletes and blob garbage collection by one
  store-wide lock, so a delete never removes a blob that a concurrent create is about to
  reference, and never waits for a pull of that name to finish.
* A full disk (ENOSPC, EDQUOT) is ``NoSpace("write <file>: no space left on device")``
  (Go's wording, as Ollama prints it); the temp file is removed and no manifest changes.
* Blobs in use are never collected: create/pull pin what they will reference
  (:meth:`Store.pinned`), the supervisor holds a model's blob from a request's arrival until its
  runner is gone (:meth:`Store.hold`). A blob that lost its last manifest while pinned or held is
  removed when the last pin or hold goes.
* Large blob I/O runs in a worker thread; small reads (manifests, config, text layers) are done
  inline: they are a few KiB.
* A model's digest is the sha256 of its manifest bytes; pulled manifests are kept byte for byte.

Length: over 900 lines because one lock discipline (per-name locks, the commit lock, pins and
holds) covers names, manifests, blobs, create, copy, delete and prune; the parameter table is
``params``, template checks ``templates``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import functools
import hashlib
import os
import re
import stat
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog

from corral.daemon import gguf_info
from corral.daemon.errors import (
    CorralError,
    Failed,
    InvalidRequest,
    NoSpace,
    NotFound,
    model_not_found,
)
from corral.daemon.human import human_number
from corral.daemon.params import typed_params
from corral.daemon.prompt.gotemplate import TemplateError
from corral.daemon.prompt.templates import GoTemplate

log = structlog.get_logger(__name__)

# ---------------------------------------------------------------------------------------------
# Names

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
INVALID_NAME = "invalid model name"
_MISSING = "!MISSING!"  # a part promised by a separator but empty: never valid
_PART_CHARS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_HOST_CHARS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-:]*\Z")


@dataclass(frozen=True, slots=True)
class ModelName:
    """A fully qualified model name. Only :func:`parse_name` builds valid ones."""

    host: str
    namespace: str
    model: str
    tag: str
    scheme: str = "https"

    @property
    def full(self) -> str:
        """``host/namespace/model:tag`` (Ollama's ``DisplayLongest``-with-host form)."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def display(self) -> str:
        """Ollama's ``DisplayShortest``: default host and ``library`` namespace dropped."""
        if self.host.casefold() == DEFAULT_HOST:
            if self.namespace.casefold() == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return self.full

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    def key(self) -> tuple[str, ...]:
        """Case-insensitive identity (Ollama matches names on disk ignoring case)."""
        return tuple(p.casefold() for p in self.parts)

    def __str__(self) -> str:
        return self.display


def _cut_last(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return (s[:i] or _MISSING), (s[i + len(sep) :] or _MISSING), True


def _valid_part(kind: str, s: str) -> bool:
    limit = 350 if kind == "host" else 80
    if not 1 <= len(s) <= limit:
        return False
    if kind == "host":
        return _HOST_CHARS.match(s) is not None
    if kind == "namespace" and "." in s:
        return False
    return _PART_CHARS.match(s) is not None


def parse_name(text: str, *, error: str = INVALID_NAME) -> ModelName:
    """Parse ``[scheme://][host/][namespace/]model[:tag]`` as Ollama does, filling defaults.

    Raises ``InvalidRequest(error)`` for anything that is not a valid name: bad characters,
    empty parts (``a//b``), ``..`` or ``.`` parts, too many slashes, absolute paths.
    """
    if not isinstance(text, str) or not text:
        raise InvalidRequest(error)
    s, tag, host, namespace, scheme = text, "", "", "", "https"
    # Parse from the right; a ':' after the last '/' starts the tag.
    if s.rfind(":") > s.rfind("/"):
        s, tag, _ = _cut_last(s, ":")
    s, model, promised = _cut_last(s, "/")
    if not promised:
        model = s
    else:
        s, namespace, promised = _cut_last(s, "/")
        if not promised:
            namespace = s
        else:
            before, sep, after = s.partition("://")
            if sep:
                scheme, host = before, after
            else:
                host = s
    name = ModelName(
        host=host or DEFAULT_HOST,
        namespace=namespace or DEFAULT_NAMESPACE,
        model=model,
        tag=tag or DEFAULT_TAG,
        scheme=scheme or "https",
    )
    if scheme not in ("http", "https"):
        raise InvalidRequest(error)
    for kind, part in zip(("host", "namespace", "model", "tag"), name.parts, strict=True):
        if not _valid_part(kind, part):
            raise InvalidRequest(error)
    return name


# ---------------------------------------------------------------------------------------------
# Digests

_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})\Z")
INVALID_DIGEST = "invalid digest format"


def parse_digest(text: Any) -> str:
    """``sha256:<hex>`` or ``sha256-<hex>`` -> canonical ``sha256:<lowercase hex>``; else 400."""
    m = _DIGEST.match(text) if isinstance(text, str) else None
    if m is None:
        raise InvalidRequest(INVALID_DIGEST)
    return "sha256:" + m.group(1).lower()


def blob_filename(digest: str) -> str:
    return parse_digest(digest).replace(":", "-")


# ---------------------------------------------------------------------------------------------
# Manifest and config wire types

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
_MEDIA = "application/vnd.ollama.image."
MEDIA_MODEL = _MEDIA + "model"
MEDIA_ADAPTER = _MEDIA + "adapter"
MEDIA_PROJECTOR = _MEDIA + "projector"
MEDIA_TEMPLATE = _MEDIA + "template"
MEDIA_PROMPT = _MEDIA + "prompt"  # legacy name of the template layer
MEDIA_SYSTEM = _MEDIA + "system"
MEDIA_PARAMS = _MEDIA + "params"
MEDIA_MESSAGES = _MEDIA + "messages"
MEDIA_LICENSE = _MEDIA + "license"


class Layer(msgspec.Struct, frozen=True, omit_defaults=True):
    mediaType: str
    digest: str
    size: int
    from_: str = msgspec.field(default="", name="from")
    name: str = ""


class Manifest(msgspec.Struct, frozen=True, omit_defaults=False):
    config: Layer
    layers: list[Layer]
    schemaVersion: int = 2
    mediaType: str = MANIFEST_V2

    def all_layers(self) -> list[Layer]:
        return [*self.layers, self.config]

    def size(self) -> int:
        return sum(layer.size for layer in self.all_layers())


class RootFS(msgspec.Struct, frozen=True):
    type: str = "layers"
    diff_ids: list[str] = msgspec.field(default_factory=list)


class ConfigBlob(msgspec.Struct, frozen=True, omit_defaults=True):
    """Ollama's ConfigV2; unknown keys are ignored on read."""

    model_format: str = ""
    model_family: str = ""
    model_families: list[str] | None = None
    model_type: str = ""
    file_type: str = ""
    renderer: str = ""
    parser: str = ""
    requires: str = ""
    remote_host: str = ""
    remote_model: str = ""
    capabilities: list[str] | None = None
    context_length: int = 0
    embedding_length: int = 0
    base_name: str = ""
    architecture: str = ""
    os: str = ""
    rootfs: RootFS | None = None


class Details(msgspec.Struct, frozen=True):
    """``details`` of /api/tags, /api/ps and /api/show; all keys always present."""

    parent_model: str
    format: str
    family: str
    families: list[str] | None
    parameter_size: str
    quantization_level: str


_manifest_decoder = msgspec.json.Decoder(Manifest)
_config_decoder = msgspec.json.Decoder(ConfigBlob)


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """Everything the daemon needs to know about one local model (read from its manifest).

    ``parameters`` values are typed (numbers as numbers, ``stop`` a list of strings).
    ``model_path`` is None for manifests without a GGUF model layer (remote stubs, safetensors).
    """

    name: str  # display name, e.g. "gemma3:270m"
    full_name: str  # "registry.ollama.ai/library/gemma3:270m"
    model_name: ModelName
    digest: str  # hex sha256 of the manifest bytes
    manifest: Manifest
    model_path: Path | None
    model_digest: str | None
    template: str | None
    system: str | None
    parameters: dict[str, Any]
    messages: list[dict[str, Any]]
    license: list[str]
    adapters: list[Path]
    projectors: list[Path]
    config: ConfigBlob
    size: int
    modified_at: float  # manifest mtime, seconds since the epoch
    details: Details
    manifest_path: Path = field(repr=False, default=Path())


ProgressFn = Callable[[dict[str, Any]], Awaitable[None] | None]
# Fetches a missing model into the store (``Registry.pull`` bound to its options).
PullFn = Callable[[ModelName, ProgressFn | None], Awaitable[Any]]


async def report_progress(progress: ProgressFn | None, msg: dict[str, Any]) -> None:
    """Hand ``msg`` to ``progress`` (if any), awaiting it when it is a coroutine function."""
    if progress is not None:
        res = progress(msg)
        if res is not None:
            await res


# ---------------------------------------------------------------------------------------------
# Parameters

# api.Options / api.Runner field types (Ollama HEAD plus legacy names still sent by clients).
# ---------------------------------------------------------------------------------------------
# Small helpers


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp in the same dir, fsync, replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_writes(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a full disk or quota while writing ``path`` into ``NoSpace``; other errors
    pass through unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        log.warning("store.disk_full", path=str(path), error=os.strerror(e.errno))
        raise NoSpace(f"write {path}: {os.strerror(e.errno).lower()}") from None


def _valid_relative(path: str) -> bool:
    """Go's ``fs.ValidPath``: slash-separated, no empty, '.' or '..' elements, not absolute."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    if path == ".":
        return True
    return all(part not in ("", ".", "..") for part in path.split("/"))


GGUF_MAGIC = b"GGUF"


# ---------------------------------------------------------------------------------------------
# The store


class Store:
    """The model store rooted at ``root``. One instance per daemon; methods are loop-bound.

    ``noprune`` (``OLLAMA_NOPRUNE``) keeps the blobs a model loses when it is replaced (create or
    pull over an existing name). Deleting a model removes its unused blobs either way, as Ollama.
    """

    def __init__(self, root: str | os.PathLike[str], *, noprune: bool = False) -> None:
        self.root = Path(root)
        self.manifests_dir = self.root / "manifests"
        self.blobs_dir = self.root / "blobs"
        self.noprune = noprune
        self._name_locks: dict[tuple[str, ...], asyncio.Lock] = {}
        self._commit_lock = asyncio.Lock()
        self._pins: Counter[str] = Counter()  # digest -> pins and holds
        self._orphans: set[str] = set()  # unreferenced but pinned when last collected
        # manifest path -> ((inode, size, mtime_ns), record): see _read_record
        self._records: dict[Path, tuple[tuple[int, int, int], ModelRecord]] = {}
        # a name as clients spell it -> its manifest path, for names found with that spelling
        self._exact_paths: dict[str, Path] = {}

    @contextlib.contextmanager
    def pinned(self, *, drop_new_on_error: bool = False) -> Iterator[Callable[[str], None]]:
        """Protect blobs an unfinished create/pull will reference from garbage collection.

        Yields ``pin(digest)``; every pin is released when the block ends. With
        ``drop_new_on_error``, blobs that did not exist when pinned and that no manifest uses
        are removed if the block fails (a failed create leaves no layers of its own behind).
        """
        mine: list[str] = []
        new: list[str] = []

        def pin(digest: str) -> None:
            d = parse_digest(digest)
            self._pins[d] += 1
            mine.append(d)
            if drop_new_on_error and not self.has_blob(d):
                new.append(d)

        try:
            yield pin
        except BaseException:
            self._orphans.update(new)
            raise
        finally:
            for d in mine:
                self._unpin(d)

    def hold(self, blob_path: str | os.PathLike[str]) -> None:
        """Keep the blob at ``blob_path`` (a model's ``model_path``) while a request or a runner
        uses it, even if its last manifest goes (a copy or delete onto a name being loaded).
        Paths outside the store's blob naming are ignored. Pair with :meth:`release`."""
        d = self._digest_of(os.fspath(blob_path))
        if d is not None:
            self._pins[d] += 1

    def release(self, blob_path: str | os.PathLike[str]) -> None:
        """End a :meth:`hold`; the blob goes if nothing references or holds it any more."""
        d = self._digest_of(os.fspath(blob_path))
        if d is not None and self._pins.get(d, 0) > 0:
            self._unpin(d)

    @staticmethod
    @functools.lru_cache(maxsize=256)  # every request holds and releases its model's blob
    def _digest_of(blob_path: str) -> str | None:
        m = re.fullmatch(r"sha256-([0-9a-f]{64})", os.path.basename(blob_path))
        return f"sha256:{m.group(1)}" if m else None

    def _unpin(self, d: str) -> None:
        self._pins[d] -= 1
        if self._pins[d] > 0:
            return
        del self._pins[d]
        if d in self._orphans:
            self._orphans.discard(d)
            if d not in self.referenced_digests():
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(d).unlink()
                    log.info("store.blob_removed", digest=d, reason="unreferenced, released")

    # ---- paths ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Path of a blob; the digest is validated (400 on anything else)."""
        return self.blobs_dir / blob_filename(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests_dir.joinpath(*name.parts)

    def name_lock(self, name: ModelName) -> asyncio.Lock:
        """The lock serialising writers of one model name (case-insensitive)."""
        return self._name_locks.setdefault(name.key(), asyncio.Lock())

    def _existing(self, name: ModelName) -> ModelName | None:
        """The on-disk spelling of ``name`` (exact first, then case-insensitive), or None."""
        if self.manifest_path(name).is_file():
            return name
        key = name.key()
        for found in self._manifest_names():
            if found.key() == key:
                return found
        return None

    def _manifest_names(self) -> list[ModelName]:
        """Names of all manifests: files exactly four levels under manifests/ with valid parts."""
        names: list[ModelName] = []
        if not self.manifests_dir.is_dir():
            return names
        for path in self.manifests_dir.glob("*/*/*/*"):
            if not path.is_file():
                continue
            host, ns, model, tag = path.relative_to(self.manifests_dir).parts
            try:
                name = parse_name(f"{host}/{ns}/{model}:{tag}")
            except CorralError:
                continue
            if name.parts == (host, ns, model, tag):
                names.append(name)
        return names

    # ---- reading ----------------------------------------------------------------------------

    def resolve(self, name: str | ModelName) -> ModelRecord:
        """The model called ``name``; ``InvalidRequest`` for a bad name, ``NotFound`` when absent.

        Fast path (every inference request): a name that resolved before to its exact spelling
        on disk costs one stat of that manifest while the file is unchanged."""
        if isinstance(name, str):
            path = self._exact_paths.get(name)
            if path is not None:
                record = self._current_record(path)
                if record is not None:
                    return record
        parsed = parse_name(name) if isinstance(name, str) else name
        found = self._existing(parsed)
        if found is None:
            raise model_not_found(str(name) if isinstance(name, str) else parsed.display)
        try:
            record = self._read_record(found)
        except FileNotFoundError:
            raise model_not_found(str(name) if isinstance(name, str) else parsed.display) from None
        if isinstance(name, str) and found == parsed:  # not a case-insensitive match
            if len(self._exact_paths) >= 1024:
                self._exact_paths.clear()
            self._exact_paths[name] = record.manifest_path
        return record

    def exists(self, name: str | ModelName) -> bool:
        parsed = parse_name(name) if isinstance(name, str) else name
        return self._existing(parsed) is not None

    def read_manifest(self, name: ModelName) -> tuple[Manifest, bytes]:
        raw = self.manifest_path(name).read_bytes()
        try:
            return _manifest_decoder.decode(raw), raw
        except msgspec.DecodeError as e:
            raise Failed(f"invalid manifest for {name.display}: {e}") from None

    def _read_text(self, layer: Layer) -> str:
        return self.blob_path(layer.digest).read_text(encoding="utf-8")

    def _read_record(self, name: ModelName) -> ModelRecord:
        """The record of manifest ``name``, re-read only when the manifest file changed (another
        inode, size or mtime: every writer replaces the file, Ollama too). Blobs are content-
        addressed, so an unchanged manifest means an unchanged record. Records are shared
        between callers: treat them and their lists and dicts as read-only."""
        path = self.manifest_path(name)
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._records.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        record = self._parse_record(name, path, st.st_mtime)
        self._records[path] = (key, record)
        return record

    def _current_record(self, path: Path) -> ModelRecord | None:
        """The cached record of the manifest at ``path`` if that is still a regular file and
        unchanged, else None."""
        cached = self._records.get(path)
        if cached is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or cached[0] != (st.st_ino, st.st_size, st.st_mtime_ns):
            return None
        return cached[1]

    def _parse_record(self, name: ModelName, path: Path, mtime: float) -> ModelRecord:
        manifest, raw = self.read_manifest(name)
        config = ConfigBlob()
        if manifest.config.digest:
            with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
                config = _config_decoder.decode(self.blob_path(manifest.config.digest).read_bytes())
        model_path = model_digest = template = system = None
        parent = ""
        params: dict[str, Any] = {}
        messages: list[dict[str, Any]] = []
        licenses: list[str] = []
        adapters: list[Path] = []
        projectors: list[Path] = []
        for layer in manifest.layers:
            mt = layer.mediaType
            if mt == MEDIA_MODEL:
                if model_path is None:
                    model_path, model_digest = (
                        self.blob_path(layer.digest),
                        parse_digest(layer.digest),
                    )
                    parent = layer.from_
            elif mt == MEDIA_ADAPTER:
                adapters.append(self.blob_path(layer.digest))
            elif mt == MEDIA_PROJECTOR:
                projectors.append(self.blob_path(layer.digest))
            elif mt in (MEDIA_TEMPLATE, MEDIA_PROMPT):
                template = self._read_text(layer)
            elif mt == MEDIA_SYSTEM:
                system = self._read_text(layer)
            elif mt == MEDIA_LICENSE:
                licenses.append(self._read_text(layer))
            elif mt == MEDIA_PARAMS:
                data = msgspec.json.decode(self.blob_path(layer.digest).read_bytes())
                if isinstance(data, dict):
                    with contextlib.suppress(CorralError):
                        data = typed_params(data)
                    params = data
            elif mt == MEDIA_MESSAGES:
                data = msgspec.json.decode(self.blob_path(layer.digest).read_bytes())
                if isinstance(data, list):
                    messages = [m for m in data if isinstance(m, dict)]
        details = Details(
            parent_model=parent,
            format=config.model_format or "gguf",
            family=config.model_family,
            families=config.model_families,
            parameter_size=config.model_type,
            quantization_level=config.file_type,
        )
        return ModelRecord(
            name=name.display,
            full_name=name.full,
            model_name=name,
            digest=hashlib.sha256(raw).hexdigest(),
            manifest=manifest,
            model_path=model_path,
            model_digest=model_digest,
            template=template,
            system=system,
            parameters=params,
            messages=messages,
            license=licenses,
            adapters=adapters,
            projectors=projectors,
            config=config,
            size=manifest.size(),
            modified_at=mtime,
            details=details,
            manifest_path=path,
        )

    def list(self) -> list[ModelRecord]:
        """All readable models, newest first. Unreadable manifests are logged and skipped."""
        records = []
        for name in self._manifest_names():
            try:
                records.append(self._read_record(name))
            except (CorralError, OSError, msgspec.DecodeError) as e:
                log.warning("store.bad_manifest", name=name.full, error=str(e))
        records.sort(key=lambda r: r.modified_at, reverse=True)
        return records

    def referenced_digests(self) -> set[str]:
        """Every blob digest referenced by any readable manifest (config included)."""
        refs: set[str] = set()
        for name in self._manifest_names():
            try:
                manifest, _ = self.read_manifest(name)
            except (CorralError, OSError):
                continue
            for layer in manifest.all_layers():
                with contextlib.suppress(CorralError):
                    refs.add(parse_digest(layer.digest))
        return refs

    # ---- blobs ------------------------------------------------------------------------------

    async def write_blob_stream(self, digest: str, chunks: AsyncIterator[bytes]) -> bool:
        """Store the bytes of ``chunks`` as blob ``digest``; True if written, False if present.

        The sha256 is computed while streaming; on a mismatch nothing is left behind and
        ``InvalidRequest('digest mismatch, expected "…", got "…"')`` is raised. Disk writes and
        hashing run in a worker thread, in batches of about 1 MiB.
        """
        want = parse_digest(digest)
        final = self.blob_path(want)
        if final.is_file():
            return False
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.blobs_dir / f"tmp-{uuid.uuid4().hex}"
        h = hashlib.sha256()
        with disk_writes(tmp):
            f = await asyncio.to_thread(open, tmp, "wb")
        try:
            buf: list[bytes] = []
            pending = 0

            def flush(data: bytes) -> None:
                h.update(data)
                f.write(data)

            with disk_writes(tmp):
                async for chunk in chunks:
                    buf.append(chunk)
                    pending += len(chunk)
                    if pending >= 1 << 20:
                        await asyncio.to_thread(flush, b"".join(buf))
                        buf, pending = [], 0
                if buf:
                    await asyncio.to_thread(flush, b"".join(buf))
            got = "sha256:" + h.hexdigest()
            if got != want:
                raise InvalidRequest(f'digest mismatch, expected "{want}", got "{got}"')

            def commit() -> None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, final)

            with disk_writes(tmp):
                await asyncio.to_thread(commit)
            return True
        finally:
            with contextlib.suppress(OSError):  # a close that cannot flush: the file goes anyway
                f.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def write_blob_bytes(self, data: bytes) -> Layer:
        """Store a small blob; returns a layer stub (media type to be filled by the caller)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.is_file():
            with disk_writes(path):
                await asyncio.to_thread(_atomic_write, path, data)
        return Layer(mediaType="", digest=digest, size=len(data))

    # ---- writing manifests -----------------------------------------------------------------

    async def write_manifest(self, name: ModelName, data: bytes) -> None:
        """Commit ``data`` as the manifest of ``name`` after checking its blobs are all present.

        Blobs of a replaced manifest that nothing references any more are removed unless
        ``noprune``. Caller holds ``name_lock(name)`` when it also did other work for the name.
        """
        manifest = _manifest_decoder.decode(data)
        async with self._commit_lock:
            for layer in manifest.all_layers():
                if not self.has_blob(layer.digest):
                    raise Failed(f"blob {parse_digest(layer.digest)} is missing")
            existing = self._existing(name)
            target = existing or name
            old: list[Layer] = []
            if existing is not None:
                with contextlib.suppress(CorralError, OSError):
                    old = self.read_manifest(existing)[0].all_layers()
            with disk_writes(self.manifest_path(target)):
                await asyncio.to_thread(_atomic_write, self.manifest_path(target), data)
            if old and not self.noprune:
                self._remove_unreferenced(old)

    def _remove_unreferenced(self, layers: builtins.list[Layer]) -> int:
        """Remove those of ``layers``' blobs no manifest references. Call under _commit_lock."""
        refs = self.referenced_digests()
        removed = 0
        for layer in layers:
            try:
                digest = parse_digest(layer.digest)
            except CorralError:
                continue
            if digest in refs:
                continue
            if digest in self._pins:
                self._orphans.add(digest)  # removed when its last pin or hold goes
                continue
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()
                removed += 1
        return removed

    def _prune_empty_dirs(self, start: Path) -> None:
        d = start
        while d != self.manifests_dir and self.manifests_dir in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent

    async def copy(self, src: str, dst: str) -> ModelName:
        """Copy the manifest of ``src`` to ``dst`` byte for byte (blobs are shared)."""
        s = parse_name(src, error=f'source "{src}" is invalid')
        d = parse_name(dst, error=f'destination "{dst}" is invalid')
        found = self._existing(s)
        if found is None:
            raise NotFound(f'model "{src}" not found')
        async with self.name_lock(d):
            data = self.manifest_path(found).read_bytes()
            await self.write_manifest(d, data)
        return d

    async def delete(self, name: str) -> ModelRecord:
        """Remove the manifest of ``name`` and every blob of it that no other manifest uses."""
        parsed = parse_name(name, error=f'name "{name}" is invalid')
        # Not the name lock: a delete must not wait for a pull or create of that name (it may
        # take hours); manifest writes are serialised with it by the commit lock.
        async with self._commit_lock:
            found = self._existing(parsed)
            if found is None:
                raise NotFound(f"model '{name}' not found")
            record = self._read_record(found)
            path = self.manifest_path(found)
            path.unlink()
            self._records.pop(path, None)
            self._prune_empty_dirs(path.parent)
            self._remove_unreferenced(record.manifest.all_layers())
        return record

    def prune(self, *, grace: float = 3600.0) -> int:
        """Start-up housekeeping: remove unreferenced blobs, stale partial/temp files, empty dirs.

        Files modified less than ``grace`` seconds ago are kept (a download or upload of a
        previous run may still be resumed). Synchronous: call before serving. Returns the count.
        """
        removed = 0
        if self.blobs_dir.is_dir():
            refs = self.referenced_digests()
            now = time.time()
            for path in self.blobs_dir.iterdir():
                name = path.name
                m = re.fullmatch(r"sha256[-:]([0-9a-f]{64})", name)
                if m and ":" in name:  # legacy blob name: rename like Ollama's fixBlobs
                    target = self.blobs_dir / f"sha256-{m.group(1)}"
                    if not target.exists():
                        os.replace(path, target)
                    continue
                if m and (f"sha256:{m.group(1)}" in refs or f"sha256:{m.group(1)}" in self._pins):
                    continue
                try:
                    if now - path.stat().st_mtime < grace or not path.is_file():
                        continue
                    path.unlink()
                    removed += 1
                except FileNotFoundError:
                    continue
        if self.manifests_dir.is_dir():
            for d in sorted(
                self.manifests_dir.glob("**/"), key=lambda p: len(p.parts), reverse=True
            ):
                if d != self.manifests_dir:
                    with contextlib.suppress(OSError):
                        d.rmdir()
        log.info("store.pruned", removed=removed, root=str(self.root))
        return removed

    # ---- create -----------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        from_: str | None = None,
        files: Mapping[str, str] | None = None,
        adapters: Mapping[str, str] | None = None,
        template: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        messages: builtins.list[dict[str, Any]] | None = None,
        license: str | builtins.list[str] | None = None,
        quantize: str | None = None,
        progress: ProgressFn | None = None,
        pull: PullFn | None = None,
    ) -> ModelRecord:
        """Create (or replace) model ``name`` in the current ``/api/create`` form.

        Emits Ollama's status messages through ``progress``. Every check a request can fail
        (names, files, template, messages, parameters) runs before anything is written, so a
        rejected create leaves the store as it was; a later I/O failure leaves the manifests
        unchanged and removes the small layer blobs it wrote.

        A ``from_`` model missing here is fetched with ``pull(name, progress)`` first (Ollama's
        ``parseFromModel``), its progress in the same stream; without ``pull`` it is a 404. A
        failed pull writes no manifest and ends the create with the pull's error.
        """
        target = parse_name(name)
        async with self.name_lock(target):
            with self.pinned(drop_new_on_error=True) as pin:
                return await self._create(
                    target,
                    pin,
                    from_=from_,
                    files=files,
                    adapters=adapters,
                    template=template,
                    system=system,
                    parameters=parameters,
                    messages=messages,
                    license=license,
                    quantize=quantize,
                    progress=progress,
                    pull=pull,
                )

    async def _create(
        self,
        target: ModelName,
        pin: Callable[[str], None],
        *,
        from_: str | None,
        files: Mapping[str, str] | None,
        adapters: Mapping[str, str] | None,
        template: str | None,
        system: str | None,
        parameters: Mapping[str, Any] | None,
        messages: builtins.list[dict[str, Any]] | None,
        license: str | builtins.list[str] | None,
        quantize: str | None,
        progress: ProgressFn | None,
        pull: PullFn | None,
    ) -> ModelRecord:
        if quantize:
            raise InvalidRequest(
                f"quantization to {quantize!r} is not supported by corral; "
                "quantize the GGUF with llama.cpp's llama-quantize first"
            )
        if not from_ and not files:
            raise InvalidRequest("neither 'from' or 'files' was specified")
        # Everything a client can get wrong is checked before the first blob is written.
        if template is not None:
            try:
                GoTemplate(template)
            except TemplateError as e:
                raise InvalidRequest(f"template error: {e}") from None
        clean_messages = None
        if messages is not None:
            clean_messages = []
            for m in messages:
                role = m.get("role") if isinstance(m, Mapping) else None
                if role not in ("system", "user", "assistant", "tool"):
                    raise InvalidRequest(
                        'message role must be one of "system", "user", or "assistant"'
                    )
                clean_messages.append(
                    {k: v for k, v in m.items() if v not in (None, "", [])} | {"role": role}
                )
        new_params = typed_params(parameters) if parameters else {}

        layers: list[Layer] = []
        config = ConfigBlob(model_format="gguf")
        inherited_params: dict[str, Any] = {}
        if from_:
            source_name = parse_name(from_)
            # Not when the source is the target: its name lock is ours (the pull would wait on it).
            if (
                pull is not None
                and source_name.key() != target.key()
                and not self.exists(source_name)
            ):
                await pull(source_name, progress)
            source = self.resolve(from_)
            for layer in source.manifest.all_layers():
                pin(layer.digest)
            config = source.config
            for layer in source.manifest.layers:
                if layer.mediaType == MEDIA_PARAMS:
                    inherited_params = dict(source.parameters)
                    continue
                if (
                    layer.mediaType in (MEDIA_MODEL, MEDIA_ADAPTER, MEDIA_PROJECTOR)
                    and not layer.from_
                ):
                    layer = msgspec.structs.replace(layer, from_=source.name)
                layers.append(layer)

        if files:
            model_layers, projector_layers = [], []
            families: list[str] = []
            for fname, digest in files.items():
                layer, info = await self._gguf_layer(fname, digest, progress, gguf_info, pin)
                if info.architecture == "clip" or info.is_projector:
                    projector_layers.append(
                        msgspec.structs.replace(layer, mediaType=MEDIA_PROJECTOR)
                    )
                    continue
                model_layers.append(msgspec.structs.replace(layer, mediaType=MEDIA_MODEL))
                config = ConfigBlob(
                    model_format="gguf",
                    model_family=info.architecture,
                    model_type=human_number(info.parameter_count) if info.parameter_count else "",
                    file_type=info.file_type_name,
                    context_length=info.context_length or 0,
                    embedding_length=info.embedding_length or 0,
                )
                if info.architecture and info.architecture not in families:
                    families.append(info.architecture)
            if len(model_layers) != 1:
                raise InvalidRequest(
                    "exactly one GGUF model file is required"
                    if not model_layers
                    else "only one GGUF model file is supported"
                )
            config = msgspec.structs.replace(config, model_families=families or None)
            layers = [lay for lay in layers if lay.mediaType not in (MEDIA_MODEL, MEDIA_PROJECTOR)]
            layers[:0] = model_layers + projector_layers

        if adapters:
            if len(adapters) > 1:
                raise InvalidRequest("only one adapter is currently supported")
            fname, digest = next(iter(adapters.items()))
            layer, _ = await self._gguf_layer(fname, digest, progress, gguf_info, pin)
            layers = [lay for lay in layers if lay.mediaType != MEDIA_ADAPTER]
            layers.append(msgspec.structs.replace(layer, mediaType=MEDIA_ADAPTER))

        async def text_layer(media: str, text: str, *, replace: tuple[str, ...]) -> None:
            nonlocal layers
            layers = [lay for lay in layers if lay.mediaType not in replace]
            await self._add_small(layers, media, text.encode(), progress, pin)

        if template is not None:
            await text_layer(MEDIA_TEMPLATE, template, replace=(MEDIA_TEMPLATE, MEDIA_PROMPT))
        if system is not None:
            await text_layer(MEDIA_SYSTEM, system, replace=(MEDIA_SYSTEM,))
        if license is not None:
            texts = [license] if isinstance(license, str) else list(license)
            layers = [lay for lay in layers if lay.mediaType != MEDIA_LICENSE]
            for text in texts:
                await self._add_small(layers, MEDIA_LICENSE, text.encode(), progress, pin)
        if clean_messages is not None:
            layers = [lay for lay in layers if lay.mediaType != MEDIA_MESSAGES]
            await self._add_small(
                layers, MEDIA_MESSAGES, msgspec.json.encode(clean_messages), progress, pin
            )
        merged = dict(inherited_params)
        merged.update(new_params)
        if merged:
            await self._add_small(layers, MEDIA_PARAMS, msgspec.json.encode(merged), progress, pin)

        config = msgspec.structs.replace(
            config,
            architecture=config.architecture or "amd64",
            os=config.os or "linux",
            rootfs=RootFS(diff_ids=[parse_digest(lay.digest) for lay in layers]),
        )
        config_bytes = msgspec.json.encode(config)
        pin("sha256:" + hashlib.sha256(config_bytes).hexdigest())
        config_layer = await self.write_blob_bytes(config_bytes)
        config_layer = msgspec.structs.replace(config_layer, mediaType=CONFIG_MEDIA)
        manifest = Manifest(config=config_layer, layers=layers)
        await report_progress(progress, {"status": "writing manifest"})
        await self.write_manifest(target, msgspec.json.encode(manifest) + b"\n")
        await report_progress(progress, {"status": "success"})
        return self.resolve(target)

    async def _add_small(
        self,
        layers: builtins.list[Layer],
        media: str,
        data: bytes,
        progress: ProgressFn | None,
        pin: Callable[[str], None],
    ) -> None:
        pin("sha256:" + hashlib.sha256(data).hexdigest())
        layer = await self.write_blob_bytes(data)
        await report_progress(progress, {"status": f"using existing layer {layer.digest}"})
        layers.append(msgspec.structs.replace(layer, mediaType=media))

    async def _gguf_layer(
        self,
        fname: str,
        digest: str,
        progress: ProgressFn | None,
        gguf_info: Any,
        pin: Callable[[str], None],
    ) -> tuple[Layer, Any]:
        """Validate one uploaded file of a create request and read its GGUF metadata."""
        if not _valid_relative(fname):
            raise InvalidRequest("file path must be relative")
        d = parse_digest(digest)
        pin(d)
        path = self.blob_path(d)
        if not path.is_file():
            raise InvalidRequest(f'blob "{d}" not found; upload it with POST /api/blobs/{d} first')
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            if fname.endswith((".safetensors", ".json", ".bin", ".pth", ".model")):
                raise InvalidRequest(
                    "importing safetensors/PyTorch files is not supported by "
                    "corral; convert the model to GGUF first"
                )
            raise InvalidRequest("supplied file was not in GGUF format")
        await report_progress(progress, {"status": "parsing GGUF"})
        try:
            info = await gguf_info.read_info_async(path)
        except Exception as e:  # any reader failure is a bad upload
            raise InvalidRequest(f"invalid GGUF file {fname}: {e}") from None
        await report_progress(progress, {"status": f"using existing layer {d}"})
        return Layer(mediaType=MEDIA_MODEL, digest=d, size=path.stat().st_size), info
