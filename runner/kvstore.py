"""Saved prompt caches on disk: one file per saved prefix, checked before it is believed.

The files live in ``<dir>/<key hash>/<token hash>.kv``. The key (:func:`cache_key`) is
everything that decides whether a saved KV state can go back into a context: the llama.cpp
build, the model and projector digests, the slot size, the number of KV streams (one per slot),
the KV types and flash attention. A runner only ever looks into its own key's directory, and
re-checks the whole key written in each file's header.

File layout (little-endian)::

    b"CORRALKV" | u32 format | u32 header length | header JSON | u32 crc32(header JSON)
    tokens (int64 each: image cells are negative ids) | sections (KV state, checkpoints)

The header lists the tokens' crc32 and each section's boundary (how many leading tokens the
state covers), offset, length and crc32; the file ends exactly where its last section ends. A
file whose magic, format, key, header checksum, size or token checksum is wrong is removed when
the directory is scanned; a section whose checksum is wrong is refused (and the file removed)
when it is read. Files are written to a temporary name and renamed, so a reader sees whole
files only.

Budgets: ``disk_bytes`` caps the whole directory (all keys): before a file is written, the least
recently used files go until it fits (a restore touches its file, so mtime is the last use).
``memory_bytes`` is what may stay in the page cache: after saves, files beyond it (least recently
used first) are dropped from memory with ``posix_fadvise(DONTNEED)``, and a runner's load asks
the kernel to read its key's newest files ahead (``WILLNEED``) within it. A full disk, a
read-only directory or any other OSError makes a save fail quietly (counted), never a request.

No llama_cpp here: runner/kvcache.py moves the bytes in and out of the context.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

log = structlog.get_logger(__name__)

FORMAT = 1
MAGIC = b"CORRALKV"
_HEAD = struct.Struct("<8sII")  # magic, format, header length
_CRC = struct.Struct("<I")
SUFFIX = ".kv"
MAX_ENTRIES = 256  # newest files of a key read at a scan (older ones wait for the cap)
STALE_TMP = 3600.0  # s: a temporary file this old was left by a runner that died mid-write
_BLOB = re.compile(r"sha256[-:]([0-9a-f]{64})")


class Section(msgspec.Struct, frozen=True, array_like=True):
    """``kind`` "state" (the whole sequence) or "checkpoint" (the partial state, SWA or
    recurrent, at ``boundary``); ``boundary`` = tokens covered."""

    kind: str
    boundary: int
    offset: int
    length: int
    crc: int


class Header(msgspec.Struct, frozen=True):
    key: dict[str, Any]
    n_tokens: int
    tokens_crc: int
    sections: list[Section]
    saved_at: float = 0.0


_header_decoder = msgspec.json.Decoder(Header)
_encoder = msgspec.json.Encoder(order="sorted")


def model_digest(path: str) -> str:
    """The digest naming a model file: a store blob is content-addressed (``sha256-<hex>``, the
    store verifies it when it writes the blob); any other file is named by its path, size and
    modification time (hashing gigabytes at every load would cost seconds)."""
    m = _BLOB.fullmatch(os.path.basename(path))
    if m:
        return "sha256:" + m.group(1)
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
    return "file:" + hashlib.sha256(ident.encode()).hexdigest()[:32]


def cache_key(**fields: Any) -> dict[str, Any]:
    """The key as stored (JSON-safe values; the format version included)."""
    return {"format": FORMAT, **fields}


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(_encoder.encode(key)).hexdigest()[:24]


def token_hash(tokens: np.ndarray) -> str:
    return hashlib.sha256(tokens.astype("<i8").tobytes()).hexdigest()[:32]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two int64 arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class Entry:
    """One saved prefix of this key, as scanned: its tokens and sections (bytes not read)."""

    __slots__ = ("path", "tokens", "sections", "size", "mtime")

    def __init__(self, path: Path, tokens: np.ndarray, sections: list[Section], size: int) -> None:
        self.path = path
        self.tokens = tokens
        self.sections = sections
        self.size = size
        self.mtime = 0.0

    @property
    def state(self) -> Section:
        return next(s for s in self.sections if s.kind == "state")

    def boundaries(self) -> list[Section]:
        return sorted(self.sections, key=lambda s: s.boundary)


class Corrupt(Exception):
    """A file that must not be used (and is removed)."""


def _read_exact(f: Any, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise Corrupt("truncated")
    return data


def read_entry(path: Path, key: dict[str, Any]) -> Entry:
    """The header and tokens of ``path``, checked (Corrupt otherwise)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic, fmt, hlen = _HEAD.unpack(_read_exact(f, _HEAD.size))
        if magic != MAGIC or fmt != FORMAT or hlen > size:
            raise Corrupt("not a cache file of this format")
        raw = _read_exact(f, hlen)
        (crc,) = _CRC.unpack(_read_exact(f, _CRC.size))
        if zlib.crc32(raw) != crc:
            raise Corrupt("header checksum")
        try:
            head = _header_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise Corrupt(f"header: {e}") from None
        if head.key != key:
            raise Corrupt("another key")
        tok = _read_exact(f, 8 * head.n_tokens)
        if zlib.crc32(tok) != head.tokens_crc:
            raise Corrupt("token checksum")
        end = f.tell()
        for s in head.sections:
            if s.offset != end or s.boundary > head.n_tokens or s.boundary <= 0:
                raise Corrupt("section layout")
            end += s.length
        if end != size or not any(s.kind == "state" for s in head.sections):
            raise Corrupt("size")
    tokens = np.frombuffer(tok, dtype="<i8").astype(np.int64)
    return Entry(path, tokens, list(head.sections), size)


def _advise(path: Path, advice: int) -> None:
    """posix_fadvise over the whole file (a no-op where the call does not exist)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, advice)
        finally:
            os.close(fd)


def _drop_from_memory(path: Path) -> None:
    if hasattr(os, "posix_fadvise"):
        _advise(path, os.POSIX_FADV_DONTNEED)


def _read_ahead(path: Path) -> None:
    if hasattr(os, "posix_fadvise"):
        _advise(path, os.POSIX_FADV_WILLNEED)


class Store:
    """The saved prefixes of one key (read, write, scan) and the budgets of the whole directory.
    Used by one thread at a time (the runner's decode thread, then its stop)."""

    def __init__(
        self, root: str | Path, key: dict[str, Any], disk_bytes: int, memory_bytes: int
    ) -> None:
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key_hash(key)
        self.disk_bytes = disk_bytes
        self.memory_bytes = memory_bytes
        self.entries: list[Entry] = []
        self.dropped = 0  # files refused and removed since the last take_dropped()
        self._seen: tuple[int, int] | None = None  # the directory's (mtime_ns, inode) at scan

    # -- reading -------------------------------------------------------------------------------

    def scan(self) -> list[Entry]:
        """The entries of this key, newest first (re-read only when the directory changed)."""
        try:
            st = self.dir.stat()
        except OSError:
            self.entries, self._seen = [], None
            return self.entries
        seen = (st.st_mtime_ns, st.st_ino)
        if seen == self._seen:
            return self.entries
        known = {e.path: e for e in self.entries}
        files: list[tuple[float, int, Path]] = []
        with contextlib.suppress(OSError):
            for p in self.dir.iterdir():
                if p.suffix != SUFFIX:
                    continue
                with contextlib.suppress(OSError):
                    fst = p.stat()
                    files.append((fst.st_mtime, fst.st_size, p))
        files.sort(key=lambda t: -t[0])
        out: list[Entry] = []
        for mtime, size, p in files[:MAX_ENTRIES]:
            e = known.get(p)
            if e is None or e.size != size:
                try:
                    e = read_entry(p, self.key)
                except (Corrupt, OSError, ValueError) as exc:
                    self._remove(p, str(exc))
                    continue
            e.mtime = mtime
            out.append(e)
        self.entries, self._seen = out, seen
        return out

    def read(self, entry: Entry, section: Section) -> bytearray | None:
        """A section's bytes, checksum verified; None (and the file removed) when it does not
        match, or the file changed or vanished since the scan."""
        try:
            with open(entry.path, "rb") as f:
                if os.fstat(f.fileno()).st_size != entry.size:
                    raise Corrupt("changed since the scan")
                buf = bytearray(section.length)
                f.seek(section.offset)
                if f.readinto(buf) != section.length:
                    raise Corrupt("truncated")
        except FileNotFoundError:
            self._forget(entry)
            return None
        except (Corrupt, OSError) as exc:
            self.remove(entry, str(exc))
            return None
        if zlib.crc32(buf) != section.crc:
            self.remove(entry, "section checksum")
            return None
        return buf

    def touch(self, entry: Entry) -> None:
        """Mark ``entry`` used now (LRU order)."""
        with contextlib.suppress(OSError):
            os.utime(entry.path)
            entry.mtime = time.time()

    def remove(self, entry: Entry, why: str) -> None:
        self._remove(entry.path, why)
        self._forget(entry)

    def _forget(self, entry: Entry) -> None:
        if entry in self.entries:
            self.entries.remove(entry)

    def _remove(self, path: Path, why: str) -> None:
        log.warning("saved prompt cache refused and removed", file=str(path), reason=why)
        self.dropped += 1
        with contextlib.suppress(OSError):
            path.unlink()

    # -- writing -------------------------------------------------------------------------------

    def save(
        self, tokens: np.ndarray, state: bytes | bytearray, checkpoints: list[tuple[int, bytes]]
    ) -> int:
        """Write one prefix: its tokens, its whole state and partial-state checkpoints
        ``(boundary, bytes)``. Returns the bytes written, 0 when it was not saved (over the
        cap, full disk, unwritable directory: logged, never raised)."""
        tokens = np.ascontiguousarray(tokens, dtype="<i8")
        parts: list[tuple[str, int, bytes | bytearray]] = [("state", len(tokens), state)]
        parts += [("checkpoint", b, data) for b, data in checkpoints]
        tok = tokens.tobytes()
        base_sections = [(k, b, len(d), zlib.crc32(d)) for k, b, d in parts]
        # the header lists offsets that depend on its own length: settle the length first
        hlen, now = 0, round(time.time(), 3)
        while True:
            offset = _HEAD.size + hlen + _CRC.size + len(tok)
            sections = []
            for kind, b, length, crc in base_sections:
                sections.append(Section(kind, b, offset, length, crc))
                offset += length
            head = Header(self.key, len(tokens), zlib.crc32(tok), sections, now)
            head_raw = _encoder.encode(head)
            if len(head_raw) == hlen:
                break
            hlen = len(head_raw)
        size = offset
        if size > self.disk_bytes:
            return 0
        path = self.dir / (token_hash(tokens) + SUFFIX)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._make_room(size, keep=path)
            with open(tmp, "wb") as f:
                f.write(_HEAD.pack(MAGIC, FORMAT, len(head_raw)))
                f.write(head_raw)
                f.write(_CRC.pack(zlib.crc32(head_raw)))
                f.write(tok)
                for _, _, data in parts:
                    f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("prompt cache not saved", file=str(path), error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()
            return 0
        return size

    def _files(self) -> Iterator[tuple[float, int, Path]]:
        """(mtime, size, path) of every cache file under the root (all keys); stale temporary
        files are removed on the way."""
        now = time.time()
        with contextlib.suppress(OSError):
            for sub in self.root.iterdir():
                if not sub.is_dir():
                    continue
                with contextlib.suppress(OSError):
                    for p in sub.iterdir():
                        with contextlib.suppress(OSError):
                            st = p.stat()
                            if p.suffix == SUFFIX:
                                yield st.st_mtime, st.st_size, p
                            elif ".kv.tmp" in p.name and now - st.st_mtime > STALE_TMP:
                                p.unlink()

    def _make_room(self, size: int, keep: Path) -> None:
        """Remove least recently used files (any key) until ``size`` more bytes fit the cap."""
        files = sorted(self._files())
        total = sum(s for _, s, p in files if p != keep)
        for _, s, p in files:
            if total + size <= self.disk_bytes:
                break
            if p == keep:
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                total -= s

    def fit_memory(self) -> None:
        """Drop the files beyond the memory budget (least recently used) from the page cache."""
        used = 0
        for _, s, p in sorted(self._files(), reverse=True):
            used += s
            if used > self.memory_bytes:
                _drop_from_memory(p)

    def read_ahead(self) -> None:
        """Ask the kernel to read this key's newest files (within the memory budget) ahead."""
        used = 0
        for e in self.scan():
            used += e.size
            if used > self.memory_bytes:
                break
            _read_ahead(e.path)

    def take_dropped(self) -> int:
        n, self.dropped = self.dropped, 0
        return n
