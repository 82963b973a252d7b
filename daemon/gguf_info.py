"""GGUF metadata and tensor facts, read once per blob.

:func:`read_info` returns a frozen :class:`GGUFInfo`; results are cached by (file, size, mtime),
so each blob is parsed once per daemon run, and (:func:`use_disk_cache`, the daemon's cache
directory) once for all runs. Parsing memory-maps the file and only touches the
header (key/values and tensor infos), but a 256k-token vocabulary still takes a moment:
async callers use :func:`read_info_async`, which parses in a worker thread (a cache hit is
returned inline).

The supervisor turns a ``GGUFInfo`` into the scheduler's ModelFacts; /api/show uses
:func:`model_info`, :func:`tensor_list` and :func:`capabilities`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import re
import struct
import threading
from pathlib import Path
from typing import Any

import msgspec

# Arrays longer than this are shown as [] in /api/show unless verbose (Ollama's rule).
SHOW_ARRAY_LIMIT = 5
# Keys /api/show never lists in model_info.
_HIDDEN_KEYS = ("general.name", "tokenizer.chat_template")


class TensorInfo(msgspec.Struct, frozen=True):
    name: str
    type: str  # ggml type name, e.g. "Q4_K", "F16"
    shape: list[int]  # GGUF order (ne0 first), as /api/show prints it
    n_elements: int
    n_bytes: int


class GGUFInfo(msgspec.Struct, frozen=True):
    """What the daemon needs from one GGUF file. Integers are None when the key is absent."""

    path: str
    architecture: str
    name: str
    file_type: int | None
    file_type_name: str  # Ollama's quantization label: "Q4_K_M", "F16", ...
    parameter_count: int
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None  # max over layers when the file stores one per layer
    key_length: int | None
    value_length: int | None
    sliding_window: int | None
    vocab_size: int | None
    chat_template: str | None
    pooling_type: int | None
    is_embedding: bool  # "<arch>.pooling_type" present (Ollama's rule)
    has_vision: bool  # "<arch>.vision.*" keys or a vision encoder (clip)
    is_projector: bool  # a clip/mmproj file, stored as a projector layer
    layer_bytes: list[int]  # bytes of the tensors of blk.N, index N
    output_bytes: int  # output.weight (+ output_norm)
    token_embd_bytes: int
    tensor_bytes: int  # all tensors
    metadata: dict[str, Any]  # every key/value; arrays longer than 5 replaced by []
    tensors: list[TensorInfo]
    bos_token: str = ""  # token texts for a Jinja chat template ("" without one)
    eos_token: str = ""


_FileKey = tuple[int, int, int, int]
_cache: dict[_FileKey, GGUFInfo] = {}
_cache_lock = threading.Lock()
_key_locks: dict[_FileKey, threading.Lock] = {}


def _file_key(path: Path) -> _FileKey:
    """The file itself (device, inode: every link and symlink to it shares the key) and its
    version (size, mtime). One stat call."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# Parses kept on disk too (the daemon's cache directory), so a daemon restart reads a few KB
# instead of walking a 262k-token vocabulary again (~0.1 s quiet, 0.35 s at a load of 5 on
# 2 cores, for Gemma 3 270M: the first request after a restart waits for it). None: memory only.
_disk: Path | None = None
DISK_FORMAT = 1  # part of every file's name: a new GGUFInfo layout never reads an old file
_disk_decoder = msgspec.msgpack.Decoder(GGUFInfo)
_disk_encoder = msgspec.msgpack.Encoder()


def use_disk_cache(directory: Path | None) -> None:
    """Keep parses in ``directory`` as well (None: in memory only). Files are named by the
    format, the file's real path and its (device, inode, size, mtime): a changed file is parsed
    again; an unreadable or undecodable cache file is parsed again and rewritten."""
    global _disk
    _disk = directory


def _disk_file(p: Path, key: _FileKey) -> Path | None:
    if _disk is None:
        return None
    ident = f"{DISK_FORMAT}\0{os.path.realpath(p)}\0{key}".encode()
    return _disk / f"{hashlib.sha256(ident).hexdigest()[:32]}.v{DISK_FORMAT}.msgpack"


def _from_disk(f: Path | None) -> GGUFInfo | None:
    if f is None:
        return None
    try:
        return _disk_decoder.decode(f.read_bytes())
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _to_disk(f: Path | None, info: GGUFInfo) -> None:
    if f is None:
        return
    tmp = f.with_name(f"{f.name}.tmp{os.getpid()}")
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(_disk_encoder.encode(info))
        tmp.replace(f)
    except OSError:  # a cache: a read-only or full disk only costs the next parse
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse (or fetch from the cache) the GGUF at ``path``. Blocks; raises on a non-GGUF file."""
    p = Path(path)
    key = _file_key(p)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            return hit
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:  # one parse per file even when several callers ask at once
        with _cache_lock:
            hit = _cache.get(key)
        if hit is None:
            f = _disk_file(p, key)
            hit = _from_disk(f)
            if hit is None:
                hit = _parse(p)
                _to_disk(f, hit)
            with _cache_lock:
                _cache[key] = hit
                _key_locks.pop(key, None)
        return hit


async def read_info_async(path: str | os.PathLike[str]) -> GGUFInfo:
    """:func:`read_info` for the event loop: a cached parse that is still current costs one
    stat call and is returned inline; a parse runs in a worker thread."""
    try:
        key = _file_key(Path(path))
    except OSError:
        key = None  # read_info raises the real error in the thread
    if key is not None:
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
    return await asyncio.to_thread(read_info, path)


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


# ---- a fast header reader -------------------------------------------------------------------
# gguf.GGUFReader builds numpy views for every array element: 14 s for the 262k-token vocabulary
# of Gemma 3 on our CPUs. The header format is simple, so we walk it with struct and skip long
# arrays unless asked for them, using the gguf package's type tables (0.1 s for the same file).

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


class _Header(msgspec.Struct):
    meta: dict[str, Any]
    tensors: list[TensorInfo]
    array_lengths: dict[str, int]
    special: dict[str, str] = {}  # "bos"/"eos" -> token text (with a chat template)


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]

    def value(self, vtype: int, *, full: bool, key: str, lengths: dict[str, int]) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype])
            return float(f"{v:.7g}") if vtype == _FLOAT32 else v
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype} for {key}")
        itype, count = self.unpack("<I"), self.unpack("<Q")
        lengths[key] = count
        keep = full or count <= SHOW_ARRAY_LIMIT
        if itype in _SCALARS:
            size = struct.calcsize(_SCALARS[itype])
            if not keep:
                self.pos += size * count
                return []
            out = list(struct.unpack_from(f"<{count}{_SCALARS[itype][1]}", self.buf, self.pos))
            self.pos += size * count
            return [float(f"{x:.7g}") for x in out] if itype == _FLOAT32 else out
        if itype == _STRING:
            if not keep:
                for _ in range(count):
                    self.skip_string()
                return []
            return [self.string() for _ in range(count)]
        return [self.value(itype, full=full, key=key, lengths={}) for _ in range(count)]


def _read_header(path: Path, *, full: bool) -> _Header:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            c = _Cursor(buf)
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError("not a GGUF file (bad magic)")
            c.pos = 4
            version = c.unpack("<I")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
            meta: dict[str, Any] = {}
            lengths: dict[str, int] = {}
            tokens_at = -1
            for _ in range(n_kv):
                key = c.string()
                if key == "tokenizer.ggml.tokens":
                    tokens_at = c.pos
                meta[key] = c.value(
                    c.unpack("<I"),
                    full=full or key == "tokenizer.chat_template",
                    key=key,
                    lengths=lengths,
                )
            special = _special_tokens(buf, tokens_at, meta) if tokens_at >= 0 else {}
            tensors = []
            for _ in range(n_tensors):
                name = c.string()
                dims = [c.unpack("<Q") for _ in range(c.unpack("<I"))]
                ttype = GGMLQuantizationType(c.unpack("<I"))
                c.unpack("<Q")  # data offset
                n_el = 1
                for d in dims:
                    n_el *= d
                block, type_size = GGML_QUANT_SIZES[ttype]
                tensors.append(
                    TensorInfo(
                        name=name,
                        type=ttype.name,
                        shape=dims,
                        n_elements=n_el,
                        n_bytes=n_el * type_size // block,
                    )
                )
        except struct.error:
            raise ValueError("truncated GGUF header") from None
        finally:
            buf.release()
    return _Header(meta=meta, tensors=tensors, array_lengths=lengths, special=special)


def _special_tokens(buf: memoryview, tokens_at: int, meta: dict[str, Any]) -> dict[str, str]:
    """The text of the BOS and EOS tokens (``tokenizer.ggml.{bos,eos}_token_id`` indexes into
    ``tokenizer.ggml.tokens``), for Jinja chat templates' ``bos_token``/``eos_token``. Only for
    a model with a chat template; skips up to the larger id (~50 ms for a 128k vocabulary)."""
    if not isinstance(meta.get("tokenizer.chat_template"), str):
        return {}
    raw = {name: meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos")}
    ids = {k: v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}
    c = _Cursor(buf)
    c.pos = tokens_at + 4  # after the key: item type, count
    if not ids or struct.unpack_from("<I", buf, c.pos - 4)[0] != _ARRAY:
        return {}
    itype, count = c.unpack("<I"), c.unpack("<Q")
    if itype != _STRING:
        return {}
    wanted = {v: k for k, v in ids.items() if 0 <= v < count}
    out: dict[str, str] = {}
    for i in range(max(wanted, default=-1) + 1):
        if i in wanted:
            text = c.string()
            for name, tid in ids.items():
                if tid == i:
                    out[name] = text
        else:
            c.skip_string()
    return out


def read_metadata(path: str | os.PathLike[str], *, full: bool = True) -> dict[str, Any]:
    """All key/values of the GGUF (uncached); ``full=False`` replaces long arrays with []."""
    return _read_header(Path(path), full=full).meta


def _file_type_name(ft: int | None) -> str:
    from gguf import LlamaFileType

    if ft is None:
        return "unknown"
    try:
        name = LlamaFileType(ft).name
    except ValueError:
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _int(meta: dict[str, Any], key: str) -> int | None:
    v = meta.get(key)
    if isinstance(v, list):
        nums = [x for x in v if isinstance(x, (int, float))]
        return int(max(nums)) if nums else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(v)
    return None


_BLOCK = re.compile(r"blk\.(\d+)\.")


def _parse(path: Path) -> GGUFInfo:
    header = _read_header(path, full=False)
    meta = header.meta
    chat_template = meta.pop("tokenizer.chat_template", None)
    if not isinstance(chat_template, str):
        chat_template = None
    arch = str(meta.get("general.architecture") or "")
    layer_bytes: dict[int, int] = {}
    output_bytes = token_embd_bytes = total = n_params = 0
    for t in header.tensors:
        total += t.n_bytes
        n_params += t.n_elements
        if m := _BLOCK.match(t.name):
            layer_bytes[int(m.group(1))] = layer_bytes.get(int(m.group(1)), 0) + t.n_bytes
        elif t.name.startswith("output"):
            output_bytes += t.n_bytes
        elif t.name.startswith("token_embd"):
            token_embd_bytes += t.n_bytes
    if "general.parameter_count" not in meta and n_params:
        meta["general.parameter_count"] = n_params
    param_count = _int(meta, "general.parameter_count") or 0
    n_layers = max(layer_bytes) + 1 if layer_bytes else 0
    file_type = _int(meta, "general.file_type")
    vocab = _int(meta, f"{arch}.vocab_size")
    if vocab is None:
        vocab = header.array_lengths.get("tokenizer.ggml.tokens")
    is_projector = arch == "clip" or any(k.startswith("clip.") for k in meta)
    has_vision = is_projector or any(k.startswith(f"{arch}.vision.") for k in meta)
    pooling = _int(meta, f"{arch}.pooling_type")
    return GGUFInfo(
        path=str(path),
        architecture=arch,
        name=str(meta.get("general.name") or ""),
        file_type=file_type,
        file_type_name=_file_type_name(file_type),
        parameter_count=param_count,
        context_length=_int(meta, f"{arch}.context_length"),
        embedding_length=_int(meta, f"{arch}.embedding_length"),
        block_count=_int(meta, f"{arch}.block_count"),
        head_count=_int(meta, f"{arch}.attention.head_count"),
        head_count_kv=_int(meta, f"{arch}.attention.head_count_kv"),
        key_length=_int(meta, f"{arch}.attention.key_length"),
        value_length=_int(meta, f"{arch}.attention.value_length"),
        sliding_window=_int(meta, f"{arch}.attention.sliding_window"),
        vocab_size=vocab,
        chat_template=chat_template,
        pooling_type=pooling,
        is_embedding=f"{arch}.pooling_type" in meta,
        has_vision=has_vision,
        is_projector=is_projector,
        layer_bytes=[layer_bytes.get(i, 0) for i in range(n_layers)],
        output_bytes=output_bytes,
        token_embd_bytes=token_embd_bytes,
        tensor_bytes=total,
        metadata=meta,
        tensors=header.tensors,
        bos_token=header.special.get("bos", ""),
        eos_token=header.special.get("eos", ""),
    )


def model_info(info: GGUFInfo, *, verbose: bool = False) -> dict[str, Any]:
    """/api/show ``model_info``: the key/values minus name and chat template; long arrays are
    [] unless ``verbose`` (then the file is re-read for the full arrays)."""
    meta = read_metadata(info.path, full=True) if verbose else info.metadata
    out = {k: v for k, v in meta.items() if k not in _HIDDEN_KEYS}
    if "general.parameter_count" not in out and info.parameter_count:
        out["general.parameter_count"] = info.parameter_count
    return dict(sorted(out.items()))


def tensor_list(info: GGUFInfo) -> list[dict[str, Any]]:
    """/api/show ``tensors``."""
    return [{"name": t.name, "type": t.type, "shape": t.shape} for t in info.tensors]
