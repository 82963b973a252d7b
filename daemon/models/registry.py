"""Pull and push models with Ollama's registry protocol (Docker distribution v2 endpoints).

Pull: ``GET /v2/<ns>/<model>/manifests/<tag>``, then every layer and the config blob with ranged
parallel GETs into ``blobs/sha256-<hex>-partial`` (progress per part in ``-partial-<N>`` JSON
files, Ollama's format, so a restarted pull continues where the last one stopped), then each new
blob is hashed; a match is renamed into place, a mismatch is deleted and the pull fails without
touching anything already stored. Finally the manifest is written byte for byte. A full disk
ends the pull at once (no retries, as Ollama aborts on ENOSPC) with no manifest written; the
``-partial`` file keeps what was written and a later pull resumes from there. The routes answer
every failure of a transfer with Ollama's status, 500 (see ``api/native_models``); the texts are
Ollama's, an unreachable registry's in Go's words (:func:`go_request_error`).

Push: per blob ``HEAD`` (present -> skip), else ``POST .../blobs/uploads/``, ``PATCH`` the bytes
in parts, ``PUT <location>?digest=``; then ``PUT .../manifests/<tag>``.

The registry base URL of a name is ``https://<host>``; ``insecure`` switches to ``http``.
``base_url_for`` overrides the mapping (tests, mirrors). Progress messages are Ollama's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import re
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
import msgspec
import structlog

from corral.daemon.errors import CorralError, Failed, InvalidRequest, NotFound, RegistryUnreachable
from corral.daemon.models.store import (
    MANIFEST_V2,
    Layer,
    Manifest,
    ModelName,
    ModelRecord,
    ProgressFn,
    Store,
    disk_writes,
    parse_digest,
    parse_name,
    report_progress,
)

log = structlog.get_logger(__name__)

USER_AGENT = "ollama/0.13.0 (corral)"
ACCEPT_MANIFEST = ", ".join(
    [
        MANIFEST_V2,
        "application/vnd.oci.image.manifest.v1+json",
    ]
)
MB = 1_000_000
NUM_PARTS = 16


class Part(msgspec.Struct):
    """One byte range of a download; the JSON of a ``-partial-<N>`` file (Ollama's field names)."""

    N: int
    Offset: int
    Size: int
    Completed: int = 0

    @property
    def done(self) -> bool:
        return self.Completed >= self.Size


class _Blob(msgspec.Struct):
    digest: str
    size: int


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# One in-flight download per (store, digest): a second pull of the same blob waits for the first.
_blob_locks: weakref.WeakKeyDictionary[Store, dict[str, asyncio.Lock]] = weakref.WeakKeyDictionary()


def _blob_lock(store: Store, digest: str) -> asyncio.Lock:
    return _blob_locks.setdefault(store, {}).setdefault(digest, asyncio.Lock())


class _Throttle:
    """Progress at most every ``interval`` seconds, plus the forced ones. A report held back is
    sent once the interval has passed even if nothing else happens (a stalled download still
    shows how far it got). ``close()`` drops a held-back report; call it when the transfer ends.
    """

    def __init__(self, progress: ProgressFn | None, interval: float = 0.06) -> None:
        self.progress, self.interval, self.last = progress, interval, 0.0
        self._pending: dict[str, Any] | None = None
        self._timer: asyncio.Task[None] | None = None

    async def __call__(self, msg: dict[str, Any], *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self._pending = None
            self.last = now
            await report_progress(self.progress, msg)
            return
        self._pending = msg
        if self._timer is None or self._timer.done():
            self._timer = asyncio.ensure_future(self._trailing(self.last + self.interval - now))

    async def _trailing(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._pending is not None:
            msg, self._pending = self._pending, None
            self.last = time.monotonic()
            await report_progress(self.progress, msg)

    def close(self) -> None:
        self._pending = None
        if self._timer is not None:
            self._timer.cancel()


def _progress_msg(verb: str, digest: str, total: int, completed: int) -> dict[str, Any]:
    msg: dict[str, Any] = {"status": f"{verb} {_short(digest)}", "digest": digest, "total": total}
    if completed:
        msg["completed"] = completed
    return msg


class Registry:
    """Registry client bound to a store. Stateless between calls apart from the blob locks.

    Knobs (defaults are Ollama's): ``min_part``/``max_part`` byte bounds of a download part,
    ``max_streams`` concurrent part downloads, ``retries`` per part with ``backoff`` seconds
    (doubled each time), ``stall_timeout`` seconds without a byte before a part is retried,
    ``write_batch`` bytes buffered per disk write, ``progress_interval`` seconds between reports.
    """

    def __init__(
        self,
        store: Store,
        *,
        base_url_for: Callable[[ModelName], str] | None = None,
        min_part: int = 100 * MB,
        max_part: int = 1000 * MB,
        max_streams: int = NUM_PARTS,
        retries: int = 6,
        backoff: float = 1.0,
        stall_timeout: float = 30.0,
        write_batch: int = 1 << 20,
        progress_interval: float = 0.06,
    ) -> None:
        self.store = store
        self.base_url_for = base_url_for
        self.min_part, self.max_part = min_part, max_part
        self.max_streams = max_streams
        self.retries, self.backoff = retries, backoff
        self.stall_timeout = stall_timeout
        self.write_batch, self.progress_interval = write_batch, progress_interval

    # ---- plumbing -----------------------------------------------------------------------------

    def base_url(self, name: ModelName, insecure: bool) -> str:
        if self.base_url_for is not None:
            return self.base_url_for(name).rstrip("/")
        if name.scheme == "http" and not insecure:
            raise InvalidRequest("insecure protocol http")
        return f"{'http' if insecure else name.scheme}://{name.host}"

    def _session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.stall_timeout)
        # trust_env: HTTP(S)_PROXY, NO_PROXY (and ~/.netrc) apply, as Go's ProxyFromEnvironment
        # in Ollama: a pull behind a corporate proxy works
        return aiohttp.ClientSession(
            timeout=timeout, headers={"User-Agent": USER_AGENT}, trust_env=True
        )

    @staticmethod
    def _repo(name: ModelName) -> str:
        return f"{name.namespace}/{name.model}"

    async def _request(
        self, session: aiohttp.ClientSession, method: str, url: str, auth: dict[str, str], **kw: Any
    ) -> aiohttp.ClientResponse:
        """One request; a 401 with a Bearer challenge fetches a token and retries once."""
        headers = {**kw.pop("headers", {}), **auth}
        resp = await session.request(method, url, headers=headers, **kw)
        if resp.status != 401 or "data" in kw:
            return resp
        challenge = resp.headers.get("WWW-Authenticate", "")
        resp.release()
        token = await self._token(session, challenge)
        if token is None:
            return await session.request(method, url, headers=headers, **kw)
        auth["Authorization"] = f"Bearer {token}"
        return await session.request(method, url, headers={**headers, **auth}, **kw)

    @staticmethod
    async def _token(session: aiohttp.ClientSession, challenge: str) -> str | None:
        if not challenge.lower().startswith("bearer "):
            return None
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm:
            return None
        params["ts"] = str(int(time.time()))
        params["nonce"] = str(random.getrandbits(63))
        async with session.get(f"{realm}?{urlencode(params)}") as resp:
            if resp.status != 200:
                return None
            data = await resp.json(content_type=None)
        return data.get("token") if isinstance(data, dict) else None

    def _part_size(self, total: int) -> int:
        return max(1, min(max(total // NUM_PARTS, self.min_part), self.max_part))

    # ---- pull ---------------------------------------------------------------------------------

    async def pull(
        self, name: ModelName | str, *, insecure: bool = False, progress: ProgressFn | None = None
    ) -> ModelRecord:
        """Pull ``name`` into the store; raises a CorralError (``Failed`` for registry or transfer
        failures)."""
        name = parse_name(name) if isinstance(name, str) else name
        base = self.base_url(name, insecure)
        repo = self._repo(name)
        auth: dict[str, str] = {}
        async with self.store.name_lock(name), self._session() as session:
            with self.store.pinned() as pin:
                await self._pull_locked(session, name, base, repo, auth, pin, progress)
        await report_progress(progress, {"status": "success"})
        return self.store.resolve(name)

    async def _pull_locked(
        self,
        session: aiohttp.ClientSession,
        name: ModelName,
        base: str,
        repo: str,
        auth: dict[str, str],
        pin: Callable[[str], None],
        progress: ProgressFn | None,
    ) -> bytes:
        """Fetch the manifest and the blobs it lists, verify them, write the manifest."""
        await report_progress(progress, {"status": "pulling manifest"})
        raw = await self._get_manifest(session, f"{base}/v2/{repo}/manifests/{name.tag}", auth)
        try:
            manifest = msgspec.json.decode(raw, type=Manifest)
            blobs = [
                _Blob(parse_digest(layer.digest), layer.size) for layer in manifest.all_layers()
            ]
        except (msgspec.DecodeError, CorralError) as e:
            raise Failed(f"pull model manifest: invalid manifest: {e}") from None
        for blob in blobs:  # protected from a concurrent delete until the manifest is written
            pin(blob.digest)
        fresh: list[str] = []
        for blob in blobs:
            if await self._download(session, base, repo, blob, auth, progress):
                fresh.append(blob.digest)
        await report_progress(progress, {"status": "verifying sha256 digest"})
        for digest in fresh:
            await self._verify_and_commit(digest)
        await report_progress(progress, {"status": "writing manifest"})
        await self.store.write_manifest(name, raw)
        return raw

    async def _get_manifest(
        self, session: aiohttp.ClientSession, url: str, auth: dict[str, str]
    ) -> bytes:
        try:
            resp = await self._request(
                session, "GET", url, auth, headers={"Accept": ACCEPT_MANIFEST}
            )
            async with resp:
                body = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            # the registry could not be reached: an upstream failure, not ours
            raise RegistryUnreachable(f"pull model manifest: {go_request_error(url, e)}") from None
        if resp.status == 404:
            raise NotFound("pull model manifest: file does not exist")
        if resp.status >= 400:
            raise Failed(
                f"pull model manifest: {resp.status}: {body.decode('utf-8', 'replace').strip()}"
            )
        return body

    def _partial(self, digest: str) -> Path:
        return self.store.blob_path(digest).with_name(
            self.store.blob_path(digest).name + "-partial"
        )

    def _load_parts(self, digest: str, size: int) -> list[Part]:
        """Existing part files of an interrupted download, or a fresh plan. Blocking, small."""
        data = self._partial(digest)
        parts: list[Part] = []
        if data.is_file() and data.stat().st_size == size:
            for f in sorted(data.parent.glob(data.name + "-*")):
                with contextlib.suppress(msgspec.DecodeError, OSError):
                    parts.append(msgspec.json.decode(f.read_bytes(), type=Part))
            parts.sort(key=lambda p: p.Offset)
            covered = sum(p.Size for p in parts)
            contiguous = all(a.Offset + a.Size == b.Offset for a, b in itertools.pairwise(parts))
            if parts and covered == size and parts[0].Offset == 0 and contiguous:
                return parts
        self._discard_partial(digest)
        step = self._part_size(size)
        parts = [
            Part(N=i, Offset=off, Size=min(step, size - off))
            for i, off in enumerate(range(0, size, step))
        ]
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(data, "wb") as out:
            out.truncate(size)
        for p in parts:
            self._save_part(digest, p)
        return parts

    def _save_part(self, digest: str, part: Part) -> None:
        path = self._partial(digest).with_name(f"{self._partial(digest).name}-{part.N}")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(msgspec.json.encode(part))
        os.replace(tmp, path)

    def _discard_partial(self, digest: str) -> None:
        data = self._partial(digest)
        for f in data.parent.glob(data.name + "*"):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    async def _download(
        self,
        session: aiohttp.ClientSession,
        base: str,
        repo: str,
        blob: _Blob,
        auth: dict[str, str],
        progress: ProgressFn | None,
    ) -> bool:
        """Fetch one blob into its ``-partial`` file; False when it was already stored."""
        async with _blob_lock(self.store, blob.digest):
            if self.store.has_blob(blob.digest):  # cache hit: not downloaded, not re-verified
                await report_progress(
                    progress, _progress_msg("pulling", blob.digest, blob.size, blob.size)
                )
                return False
            with disk_writes(self._partial(blob.digest)):
                parts = await asyncio.to_thread(self._load_parts, blob.digest, blob.size)
            url = f"{base}/v2/{repo}/blobs/{blob.digest}"
            throttle = _Throttle(progress, self.progress_interval)
            done = lambda: sum(p.Completed for p in parts)  # noqa: E731
            await throttle(_progress_msg("pulling", blob.digest, blob.size, done()), force=True)
            sem = asyncio.Semaphore(self.max_streams)

            async def run(part: Part) -> None:
                async with sem:
                    await self._download_part(
                        session,
                        url,
                        blob,
                        part,
                        auth,
                        lambda: throttle(_progress_msg("pulling", blob.digest, blob.size, done())),
                    )

            try:
                async with asyncio.TaskGroup() as tg:
                    for part in parts:
                        if not part.done:
                            tg.create_task(run(part))
            except ExceptionGroup as group:  # surface the first part's failure as itself
                raise _first_leaf(group) from None
            finally:
                throttle.close()
            await throttle(_progress_msg("pulling", blob.digest, blob.size, done()), force=True)
            return True

    async def _download_part(
        self,
        session: aiohttp.ClientSession,
        url: str,
        blob: _Blob,
        part: Part,
        auth: dict[str, str],
        tick: Callable[[], Any],
    ) -> None:
        """Download the rest of ``part`` with retries; its Completed is saved after each try."""
        attempt = 0
        while not part.done:
            start = part.Offset + part.Completed
            end = part.Offset + part.Size - 1
            try:
                resp = await self._request(
                    session, "GET", url, auth, headers={"Range": f"bytes={start}-{end}"}
                )
                async with resp:
                    if resp.status not in (200, 206):
                        body = (await resp.read()).decode("utf-8", "replace").strip()
                        raise _TransferError(f"{resp.status}: {body}")
                    if resp.status == 200 and start != 0:
                        raise _TransferError("registry ignored the Range header")
                    with disk_writes(self._partial(blob.digest)):
                        await self._write_stream(
                            blob.digest, part, resp.content.iter_chunked(1 << 16), tick
                        )
            except (TimeoutError, aiohttp.ClientError, _TransferError, OSError) as e:
                attempt += 1
                if attempt > self.retries:
                    raise Failed(
                        f"download failed for {blob.digest}: {e or type(e).__name__}"
                    ) from None
                log.warning(
                    "registry.part_retry",
                    digest=blob.digest,
                    part=part.N,
                    attempt=attempt,
                    error=str(e),
                )
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            finally:  # Completed on disk never exceeds the bytes written (resume point)
                with contextlib.suppress(OSError):
                    await asyncio.shield(asyncio.to_thread(self._save_part, blob.digest, part))

    async def _write_stream(
        self, digest: str, part: Part, chunks: AsyncIterator[bytes], tick: Callable[[], Any]
    ) -> None:
        """Write a response body at the part's current offset; Completed counts written bytes."""
        f = await asyncio.to_thread(open, self._partial(digest), "r+b")
        try:
            buf: list[bytes] = []
            pending = 0

            def flush(data: bytes, at: int) -> None:
                f.seek(at)
                f.write(data)

            async def drain() -> None:
                nonlocal buf, pending
                data = b"".join(buf)[: part.Size - part.Completed]
                await asyncio.to_thread(flush, data, part.Offset + part.Completed)
                part.Completed += len(data)
                buf, pending = [], 0
                await tick()

            try:
                async for chunk in chunks:
                    buf.append(chunk)
                    pending += len(chunk)
                    if pending >= self.write_batch:
                        await drain()
            finally:  # bytes received before a broken connection still count for the resume
                if buf:
                    await drain()
        finally:
            await asyncio.to_thread(f.close)
        if not part.done:
            raise _TransferError("connection closed before the part was complete")

    async def _verify_and_commit(self, digest: str) -> None:
        """Hash the finished ``-partial`` file; rename it into place or delete it on mismatch."""
        data = self._partial(digest)
        got = await asyncio.to_thread(_sha256_file, data)
        if got != digest:
            await asyncio.to_thread(self._discard_partial, digest)
            raise Failed(
                f"digest mismatch, file must be downloaded again: want {digest}, got {got}"
            )

        def commit() -> None:
            with open(data, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(data, self.store.blob_path(digest))
            self._discard_partial(digest)

        with disk_writes(data):
            await asyncio.to_thread(commit)

    # ---- push ---------------------------------------------------------------------------------

    async def push(
        self, name: ModelName | str, *, insecure: bool = False, progress: ProgressFn | None = None
    ) -> None:
        """Upload the blobs of local model ``name`` the registry lacks, then its manifest."""
        name = parse_name(name) if isinstance(name, str) else name
        record = self.store.resolve(name)
        base = self.base_url(name, insecure)
        repo = self._repo(name)
        raw = record.manifest_path.read_bytes()
        auth: dict[str, str] = {}
        await report_progress(progress, {"status": "retrieving manifest"})
        async with self._session() as session:
            for layer in record.manifest.all_layers():
                await self._upload(session, base, repo, layer, auth, progress)
            await report_progress(progress, {"status": "pushing manifest"})
            try:
                resp = await self._request(
                    session,
                    "PUT",
                    f"{base}/v2/{repo}/manifests/{name.tag}",
                    auth,
                    data=raw,
                    headers={"Content-Type": MANIFEST_V2},
                )
                async with resp:
                    body = await resp.read()
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                raise Failed(f"push manifest: {e or type(e).__name__}") from None
            if resp.status >= 400:
                raise Failed(
                    f"push manifest: {resp.status}: {body.decode('utf-8', 'replace').strip()}"
                )
        await report_progress(progress, {"status": "success"})

    async def _upload(
        self,
        session: aiohttp.ClientSession,
        base: str,
        repo: str,
        layer: Layer,
        auth: dict[str, str],
        progress: ProgressFn | None,
    ) -> None:
        digest = parse_digest(layer.digest)
        path = self.store.blob_path(digest)
        size = path.stat().st_size
        blob_url = f"{base}/v2/{repo}/blobs/{digest}"
        try:
            resp = await self._request(session, "HEAD", blob_url, auth)
            resp.release()
            if resp.status == 200:
                await report_progress(progress, _progress_msg("pushing", digest, size, size))
                return
            resp = await self._request(session, "POST", f"{base}/v2/{repo}/blobs/uploads/", auth)
            async with resp:
                await resp.read()
            if resp.status not in (201, 202):
                raise Failed(f"push {digest}: start upload: {resp.status}")
            location = urljoin(
                blob_url,
                resp.headers.get("Docker-Upload-Location") or resp.headers.get("Location", ""),
            )
            throttle = _Throttle(progress)
            await throttle(_progress_msg("pushing", digest, size, 0), force=True)
            step = self._part_size(size)
            sent = 0
            for offset in range(0, size, step):
                length = min(step, size - offset)
                resp = await session.patch(
                    location,
                    data=_file_chunks(path, offset, length),
                    headers={
                        **auth,
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + length - 1}",
                        "Content-Length": str(length),
                    },
                )
                async with resp:
                    await resp.read()
                if resp.status not in (202, 204):
                    raise Failed(f"push {digest}: upload part: {resp.status}")
                location = urljoin(
                    location,
                    resp.headers.get("Docker-Upload-Location")
                    or resp.headers.get("Location")
                    or location,
                )
                sent += length
                await throttle(_progress_msg("pushing", digest, size, sent))
            sep = "&" if "?" in location else "?"
            resp = await session.put(f"{location}{sep}digest={digest}", headers=auth)
            async with resp:
                body = await resp.read()
            if resp.status not in (200, 201, 204):
                raise Failed(
                    f"push {digest}: finish upload: {resp.status}: "
                    f"{body.decode('utf-8', 'replace').strip()}"
                )
            throttle.close()
            await throttle(_progress_msg("pushing", digest, size, size), force=True)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise Failed(f"push {digest}: {e or type(e).__name__}") from None


class _TransferError(Exception):
    pass


def go_request_error(url: str, e: BaseException, method: str = "GET") -> str:
    """A request to ``url`` that failed with ``e``, in the words of Go's HTTP client (Ollama's
    error texts carry them): ``Get "<url>": dial tcp 127.0.0.1:9: connect: connection refused``,
    ``dial tcp: lookup <host>: no such host``, ``dial tcp <addr>: i/o timeout``; an error Go has
    no fixed text for keeps its own."""
    parts = urlsplit(url)
    addr = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    os_error = getattr(e, "os_error", None)
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        detail = f"tls: failed to verify certificate: {e.certificate_error}"
    elif isinstance(os_error, socket.gaierror):
        no_host = os_error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
        detail = f"dial tcp: lookup {parts.hostname}: " + (
            "no such host" if no_host else _lower(os_error.strerror or str(os_error))
        )
    elif isinstance(os_error, OSError) and os_error.errno is not None:
        detail = f"dial tcp {addr}: connect: {_lower(os.strerror(os_error.errno))}"
    elif isinstance(e, _CONNECT_TIMEOUT):
        detail = f"dial tcp {addr}: i/o timeout"
    else:
        detail = str(e) or type(e).__name__
    return f'{method.capitalize()} "{url}": {detail}'


_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", ())  # aiohttp >= 3.10


def _lower(text: str) -> str:
    """C's strerror as Go's syscall texts write it (lower-case first letter)."""
    return text[:1].lower() + text[1:]


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _file_chunks(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """The bytes ``[offset, offset+length)`` of ``path`` in 1 MiB chunks read in a thread."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        await asyncio.to_thread(f.seek, offset)
        left = length
        while left > 0:
            chunk = await asyncio.to_thread(f.read, min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        f.close()
