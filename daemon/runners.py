"""Runner processes: spawn, handshake, exit watch, stop escalation, stderr tail.

One :class:`RunnerProcess` owns one ``python -m corral.runner`` child (STYLE rules 8, 9):

* **spawn** in its own session/process group (``start_new_session=True``) so a stop can signal
  the whole group; the ``LaunchSpec`` is written as one JSON line on stdin and stdin then stays
  open (EOF tells the child the daemon is gone). :meth:`RunnerProcess.spawn` alone starts a
  *spare* runner (``--spare ENGINE``: its imports done while it waits, then its ``Warm`` line:
  :attr:`RunnerProcess.warm`, :meth:`RunnerProcess.wait_warm`); :meth:`RunnerProcess.start`
  later sends it the spec, with the same handshake as a runner spawned by ``start`` itself.
* **handshake**: :meth:`RunnerProcess.start` reads the child's stdout events (``Loading``...
  then ``Ready`` or ``LoadFailed``). It fails at once when the child exits, and after
  ``load_timeout`` seconds *without progress*: any byte on stdout or stderr pushes the stall
  deadline forward (Ollama's ``OLLAMA_LOAD_TIMEOUT`` semantics; ``<= 0`` or None = no limit).
* **stderr tail**: the last lines of the child's stderr are kept (bounded); the last
  error-looking one is what client-facing errors quote.
* **exit watch**: the process's exit is noticed when the child watcher reaps it (no polling);
  once its pipes are drained (bounded) ``on_exit(runner, returncode)`` is called exactly once,
  whatever the cause of the exit.
* **stop** = SIGTERM to the group, bounded wait, SIGKILL to the group, then wait for the reap.
* **reports**: ``KvCacheReport`` lines (what the saved prompt cache did) go to ``on_report``.
* **request pipe**: after Ready, completions go to the runner as lines on its stdin and their
  events come back on the event pipe (``Relay`` lines, one ``RelayStep`` line per decode step
  with the text of all its streams, a ``Refused`` line; see runner/server.py):
  ``RunnerProcess.requests`` (:class:`RequestPipe`) gives a request an id and the queue its
  events are put in, :data:`GONE` once the event pipe has closed.

Contracts: ``start()`` either returns ``Ready`` with the child running, or raises
:class:`RunnerStartError` (or is cancelled) with the child stopped and reaped. ``stop()`` is
idempotent, safe to call concurrently and before/after ``start()``, and returns only once the
child is reaped. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, cast

import msgspec
import structlog

from corral.runner.protocol import (
    MAX_REQUEST,
    Cancel,
    CompletionChunk,
    CompletionRequest,
    KvCacheReport,
    LaunchSpec,
    LoadFailed,
    Loading,
    Ready,
    Refused,
    Relay,
    RelayStep,
    Submit,
    Warm,
    decode_event,
    encode,
)
from corral.scheduler.estimate import is_out_of_memory

log = structlog.get_logger(__name__)

RUNNER_ARGV: tuple[str, ...] = (sys.executable, "-m", "corral.runner")
STDERR_TAIL_LINES = 20
MAX_LINE = 8192  # longer stderr lines are cut (a runaway log line must not grow memory)
MAX_EVENT_LINE = 256 << 20  # the event pipe carries only the runner's own JSON lines; a
# done record lists the prompt + generated tokens
GONE = object()  # put in every open request's queue once the event pipe has closed


class BadLine(NamedTuple):
    """Put in a request's queue for an event-pipe line naming it that does not decode."""

    error: str


class _Ids(msgspec.Struct):
    """The request ids a line names, read loosely (a line that does not decode as an event)."""

    id: int = 0
    ids: list[int] = msgspec.field(default_factory=list)


_ids_decoder = msgspec.json.Decoder(_Ids)
PIPE_DRAIN_AFTER_EXIT = 1.0  # seconds to wait for a dead child's pipes before closing them

# Lines that look like an error, in llama.cpp's, CUDA's and Python's words (Ollama keeps
# "error:", "CUDA error", "cudaMalloc failed", "GGML_ASSERT", "panic:" ...).
_ERROR_LINE = re.compile(
    r"error|fail|panic|assert|abort|fatal|exception|out of memory|not enough memory|killed|"
    r"segmentation fault|no such file|invalid|unable to|cannot",
    re.IGNORECASE,
)


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` up to ``timeout`` s (None: forever); False on timeout.

    Uses ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11 ``wait_for`` can swallow
    a cancellation that races with the awaited event, leaving a cancelled task running.
    """
    if event.is_set():
        return True
    if timeout is None:
        await event.wait()
        return True
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


# How a start failed: the runner said so (its LoadFailed event), exited, made no progress for the
# load timeout, could not be spawned, or was stopped before it was ready.
StartErrorKind = Literal["failed", "exited", "stalled", "spawn", "stopped"]


class RunnerStartError(Exception):
    """The runner did not become ready. ``reason`` is client-facing (Ollama's wording)."""

    def __init__(self, reason: str, *, oom: bool = False, kind: StartErrorKind = "failed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.oom = oom
        self.kind: StartErrorKind = kind


def describe_returncode(returncode: int | None) -> str:
    """Go's ``exec.ExitError`` text: ``exit status 1`` / ``signal: killed``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = (signal.strsignal(-returncode) or f"signal {-returncode}").lower()
        except ValueError:
            name = f"signal {-returncode}"
        return f"signal: {name}"
    return f"exit status {returncode}"


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def thp_mode(setting: Path = THP_SETTING) -> str | None:
    """The kernel's transparent huge page mode, the bracketed word of ``setting``
    (``always`` / ``madvise`` / ``never``); None without the file (not Linux)."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else None


def huge_pages_usable(setting: Path = THP_SETTING, libc: str | None = None) -> bool:
    """Whether a runner's large buffers will get transparent huge pages: Linux with THP
    ``[always]``, or ``[madvise]`` and glibc (whose malloc then asks, see :func:`child_env`).
    False elsewhere (macOS, ``[never]``, ``[madvise]`` with another C library)."""
    mode = thp_mode(setting)
    if mode == "always":
        return True
    libc = platform.libc_ver()[0] if libc is None else libc
    return mode == "madvise" and libc == "glibc"


def child_env(
    visible_devices: str | None, base: Mapping[str, str] | None = None, *, huge_pages: bool = False
) -> dict[str, str] | None:
    """The child's environment: inherited, with CUDA_VISIBLE_DEVICES narrowed when given, and
    with ``huge_pages`` glibc's malloc asked to put its large blocks (llama.cpp's weights when
    not memory-mapped, its KV cache and compute buffers) in transparent huge pages
    (``GLIBC_TUNABLES``; read by glibc at start, ignored by other C libraries). A hugetlb
    tunable the user set wins; their other tunables are kept.

    None means "inherit unchanged" (the cheap common case).
    """
    if visible_devices is None and base is None and not huge_pages:
        return None
    env = dict(os.environ if base is None else base)
    if visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices
    tunables = env.get("GLIBC_TUNABLES", "")
    if huge_pages and "glibc.malloc.hugetlb=" not in tunables:
        env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGE_MALLOC}" if tunables else HUGE_PAGE_MALLOC
    return env


class RequestPipe:
    """The daemon's end of a runner's request pipe: :meth:`open` gives a request its id and
    the queue its events arrive in (CompletionChunk, CompletionDone, CompletionError, Refused,
    then :data:`GONE` if the runner's event pipe closes first); :meth:`submit` writes it, one
    line; :meth:`close` forgets it, with a Cancel line when the runner has not ended it.
    ``write`` sends bytes on the runner's stdin; :meth:`dispatch` takes the runner's answers
    (decoded event-pipe lines), :meth:`gone` the event pipe's end. Event loop thread only."""

    __slots__ = ("_write", "_queues", "_ids", "_gone")

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._queues: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._gone = False

    def open(self) -> tuple[int, asyncio.Queue]:
        relay_id = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[relay_id] = queue
        if self._gone:
            queue.put_nowait(GONE)
        return relay_id, queue

    def submit(self, relay_id: int, request: CompletionRequest) -> None:
        """Write the request; one over the runner's MAX_REQUEST is refused here (413)."""
        line = encode(Submit(id=relay_id, request=request))
        if len(line) > MAX_REQUEST:
            error = f"{len(line)} bytes, the limit is {MAX_REQUEST}"
            self.dispatch(Refused(id=relay_id, status=413, error=error))
            return
        self._write(line + b"\n")

    def close(self, relay_id: int, *, cancel: bool) -> None:
        """Late events for ``relay_id`` are dropped from now on; ``cancel``: the runner stops
        its job (the request ended here before the runner ended it)."""
        self._queues.pop(relay_id, None)
        if cancel and not self._gone:
            self._write(encode(Cancel(id=relay_id)) + b"\n")

    @property
    def open_count(self) -> int:
        """Requests opened and not closed yet."""
        return len(self._queues)

    def dispatch(self, event: Relay | RelayStep | Refused) -> None:
        queues = self._queues
        if isinstance(event, RelayStep):  # one decode step's text, many streams
            for relay_id, text in zip(event.ids, event.content, strict=False):
                queue = queues.get(relay_id)
                if queue is not None:
                    queue.put_nowait(CompletionChunk(content=text))
            return
        queue = queues.get(event.id)
        if queue is not None:
            queue.put_nowait(event.event if type(event) is Relay else event)

    def bad_line(self, line: bytes, error: Exception) -> None:
        """An event-pipe line that does not decode: each open request it names gets a
        :class:`BadLine` (a line naming none is only logged, as any stray output)."""
        try:
            named = _ids_decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        for relay_id in {named.id, *named.ids}:
            queue = self._queues.get(relay_id)
            if queue is not None:
                queue.put_nowait(BadLine(f"bad line from runner: {error}"))

    def gone(self) -> None:
        if not self._gone:
            self._gone = True
            for queue in self._queues.values():
                queue.put_nowait(GONE)


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, owner: RunnerProcess) -> None:
        self._owner = owner

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._owner._on_data(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._owner._on_pipe_closed(fd)

    def process_exited(self) -> None:
        self._owner._on_process_exited()


class RunnerProcess:
    """One runner child process. Use from the event loop thread only."""

    def __init__(
        self,
        runner_id: str,
        *,
        env: Mapping[str, str] | None = None,
        on_exit: Callable[[RunnerProcess, int], None] | None = None,
        on_report: Callable[[RunnerProcess, KvCacheReport], None] | None = None,
        argv: Sequence[str] = RUNNER_ARGV,
        stderr_lines: int = STDERR_TAIL_LINES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner_id = runner_id
        self._env = dict(env) if env is not None else None
        self._on_exit = on_exit
        self._on_report = on_report
        self._argv = tuple(argv)
        self._clock = clock
        self._transport: asyncio.SubprocessTransport | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._last_error: str = ""
        self._partial: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self._open_pipes: set[int] = set()
        self._events: collections.deque[Loading | Ready | LoadFailed] = collections.deque()
        self._last_activity = 0.0
        self._wake = asyncio.Event()  # something happened (data, event, exit)
        self._exited = asyncio.Event()  # the child was reaped
        self._done = asyncio.Event()  # reaped, pipes drained/closed, on_exit called
        self._watcher: asyncio.Task[None] | None = None
        self.pid: int | None = None
        self.returncode: int | None = None
        self.ready: Ready | None = None
        self.stopping = False  # stop() was called: the exit is expected
        self._spawning = False
        self._spawned = asyncio.Event()  # subprocess_exec finished (or failed)
        self._started = False  # start() was called (a spare waits for it after spawn())
        self.warm = False  # a spare's Warm line came: its warm-up is done
        # set once a spare is warm or no longer waiting (taken, stopping, exited)
        self._settled = asyncio.Event()
        self._spawn_error = ""
        self._stdin: asyncio.WriteTransport | None = None  # after the LaunchSpec was written
        self.requests = RequestPipe(self._send)

    # ------------------------------------------------------------------ public

    @property
    def running(self) -> bool:
        return self._transport is not None and not self._exited.is_set()

    def stderr_tail(self) -> list[str]:
        return list(self._tail)

    def last_error(self) -> str:
        """The last error-looking stderr line, else '' (routine log lines are never quoted)."""
        return self._last_error

    def exit_reason(self) -> str:
        """Client-facing text for an exit: ``llama runner process has terminated: ...``."""
        text = f"llama runner process has terminated: {describe_returncode(self.returncode)}"
        last = self.last_error()
        return f"{text}: {last}" if last else text

    async def spawn(self, extra_argv: Sequence[str] = ()) -> None:
        """Spawn the child without a LaunchSpec yet: a spare runner (``extra_argv`` is then
        ``--spare ENGINE``) that does its imports while it waits for :meth:`start`. Raises
        :class:`RunnerStartError` (kind ``spawn``) when the process cannot be started."""
        if self._transport is not None or self._spawning:
            raise RuntimeError("RunnerProcess spawned twice")
        if self.stopping:
            raise RunnerStartError("runner stopped before it started", kind="stopped")
        loop = asyncio.get_running_loop()
        self._spawning = True
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _Protocol(self),
                *self._argv,
                *extra_argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=self._env,
            )
        except OSError as exc:
            self._spawn_error = f"unable to start runner: {exc}"
            self._exited.set()
            self._settled.set()
            self._done.set()
            raise RunnerStartError(self._spawn_error, kind="spawn") from exc
        finally:
            self._spawning = False
            self._spawned.set()
        self._transport = transport
        self.pid = transport.get_pid()
        self._open_pipes = {1, 2}
        self._watcher = asyncio.create_task(
            self._watch_exit(), name=f"runner-exit-{self.runner_id}"
        )
        log.debug("runner spawned", runner_id=self.runner_id, pid=self.pid, spare=bool(extra_argv))

    def attach(
        self,
        on_exit: Callable[[RunnerProcess, int], None],
        on_report: Callable[[RunnerProcess, KvCacheReport], None],
    ) -> None:
        """The owner's callbacks (see ``__init__``), for a spare spawned before its owner."""
        self._on_exit = on_exit
        self._on_report = on_report

    @property
    def env(self) -> dict[str, str] | None:
        """The child's environment (None: the daemon's own, inherited)."""
        return self._env

    @property
    def spare(self) -> bool:
        """Spawned (or being spawned) by :meth:`spawn`, alive and still waiting for its
        LaunchSpec: :meth:`start` may take it."""
        return (
            (self.running or self._spawning)
            and not self._started
            and not self.stopping
            and not self._exited.is_set()
        )

    async def wait_warm(self) -> bool:
        """Block until this spare is warm (True) or no longer a waiting spare (False: taken by
        :meth:`start` before its warm-up ended, stopping or exited)."""
        await self._settled.wait()
        return self.warm and self.spare

    async def start(self, spec: LaunchSpec, *, load_timeout: float | None) -> Ready:
        """Spawn the child (unless :meth:`spawn` did), send ``spec`` and wait for the handshake
        (see the module contract)."""
        if self._started:
            raise RuntimeError("RunnerProcess.start() called twice")
        self._started = True
        self._settled.set()
        if self._spawning:  # a spare still being spawned
            await self._spawned.wait()
        if self._transport is None:
            if self._exited.is_set():  # the spare's spawn failed
                raise RunnerStartError(self._spawn_error, kind="spawn")
            await self.spawn()
        assert self._transport is not None
        transport = self._transport
        self._last_activity = self._clock()  # the stall timer runs from the spec, not the spawn
        try:
            if self.stopping:  # stop() was called while we were spawning
                raise RunnerStartError("runner stopped while starting", kind="stopped")
            # a write transport, though not an asyncio.WriteTransport instance on uvloop
            stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
            stdin.write(encode(spec) + b"\n")
            self._stdin = stdin
            # What the child received, for tests and debugging (e2e tests match it to /api/ps
            # by pid: layers, tensor split and main GPU must agree with the placement).
            log.debug(
                "runner launch spec",
                runner_id=self.runner_id,
                pid=self.pid,
                cuda_visible_devices=(self._env or {}).get("CUDA_VISIBLE_DEVICES"),
                spec=msgspec.to_builtins(spec),
            )
            ready = await self._handshake(load_timeout)
        except BaseException:
            # Cancelled or failed: leave no child behind (the contract of start()).
            await asyncio.shield(self._terminate(grace=1.0))
            raise
        self.ready = ready
        return ready

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the group, wait up to ``grace`` s, SIGKILL the group, wait for the reap.

        Returns the child's return code (None if it was never spawned). A stop before or during
        the spawn makes ``start()`` fail with kind ``"stopped"``.
        """
        self.stopping = True
        self._settled.set()
        if self._spawning:
            await self._spawned.wait()
        return await self._terminate(grace)

    async def _terminate(self, grace: float) -> int | None:
        """The stop escalation without marking the exit as asked for (start()'s cleanup)."""
        if self._transport is None:
            return None
        if not self._exited.is_set():
            self._signal_group(signal.SIGTERM)
            if not await wait_event(self._done, grace):
                log.warning(
                    "runner ignored SIGTERM, killing its process group",
                    runner_id=self.runner_id,
                    pid=self.pid,
                    grace=grace,
                )
                self._signal_group(signal.SIGKILL)
        await self._done.wait()
        return self.returncode

    async def wait_exited(self) -> int | None:
        """Block until the child is reaped and on_exit ran."""
        await self._done.wait()
        return self.returncode

    # ------------------------------------------------------------------ internals

    def _signal_group(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _handshake(self, load_timeout: float | None) -> Ready:
        limit = load_timeout if load_timeout is not None and load_timeout > 0 else None
        exited_at: float | None = None
        while True:
            # 1. Events in arrival order: Loading is progress, Ready/LoadFailed end the wait.
            while self._events:
                ev = self._events.popleft()
                if isinstance(ev, Ready):
                    return ev
                if isinstance(ev, LoadFailed):
                    await self._wait_exit_after_failed()
                    last = self.last_error()
                    reason = ev.reason
                    raise (
                        RunnerStartError(reason, oom=ev.oom, kind="failed")
                        if reason
                        else RunnerStartError(last or self.exit_reason(), oom=ev.oom, kind="failed")
                    )
            now = self._clock()
            # 2. The child is gone: fail at once (after its pipes are drained, so a LoadFailed line
            #    written just before the exit still wins and the stderr tail is complete).
            if self._exited.is_set():
                exited_at = exited_at if exited_at is not None else now
                if not (self._open_pipes and now - exited_at < PIPE_DRAIN_AFTER_EXIT):
                    await self._done.wait()
                    if self._events:
                        continue
                    raise RunnerStartError(
                        self.exit_reason(), oom=is_out_of_memory(self.last_error()), kind="exited"
                    )
            # 3. Stall: no byte from the child for load_timeout seconds.
            timeout: float | None = None
            if limit is not None:
                timeout = self._last_activity + limit - now
                if timeout <= 0:
                    raise RunnerStartError(_stall_text(limit, self.last_error()), kind="stalled")
            if exited_at is not None:
                drain_left = exited_at + PIPE_DRAIN_AFTER_EXIT - now
                timeout = drain_left if timeout is None else min(timeout, drain_left)
            self._wake.clear()
            await wait_event(self._wake, timeout)

    async def _wait_exit_after_failed(self) -> None:
        """After LoadFailed the child exits by itself; wait a moment so the stderr tail is full."""
        await wait_event(self._done, PIPE_DRAIN_AFTER_EXIT)

    def _on_data(self, fd: int, data: bytes) -> None:
        self._last_activity = self._clock()
        buf = self._partial[fd]
        if not buf and data.endswith(b"\n"):  # whole lines, as a relay step comes: no copies
            for line in data[:-1].split(b"\n"):
                self._on_line(fd, line)
            self._wake.set()
            return
        buf.extend(data)
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            self._on_line(fd, line)
        limit = MAX_EVENT_LINE if fd == 1 else MAX_LINE
        if len(buf) > limit:
            line = bytes(buf[:limit])
            buf.clear()
            self._on_line(fd, line)
        self._wake.set()

    def _on_line(self, fd: int, raw: bytes) -> None:
        if fd == 1:
            stripped = raw.strip()
            if stripped.startswith(b"{"):
                try:
                    event = decode_event(stripped)
                    if isinstance(event, RelayStep | Relay | Refused):
                        self.requests.dispatch(event)
                        return
                    if isinstance(event, KvCacheReport):
                        if self._on_report is not None:
                            self._on_report(self, event)
                        return
                    if isinstance(event, Warm):
                        self.warm = True
                        self._settled.set()
                        return
                    self._events.append(event)
                    return
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    # a line the runner wrote for open requests that does not decode (a
                    # protocol bug): they fail with it rather than wait for nothing
                    self.requests.bad_line(stripped, e)
        text = raw.decode("utf-8", errors="replace").rstrip()
        if not text.strip():
            return
        if fd == 2:
            self._tail.append(text)
            if _ERROR_LINE.search(text):
                self._last_error = text.strip()
        log.debug("runner output", runner_id=self.runner_id, fd=fd, line=text)

    def _on_pipe_closed(self, fd: int) -> None:
        if fd in self._partial and self._partial[fd]:
            line = bytes(self._partial[fd])
            self._partial[fd].clear()
            self._on_line(fd, line)
        self._open_pipes.discard(fd)
        if fd == 1:
            self.requests.gone()
        self._wake.set()

    def _send(self, data: bytes) -> None:
        """Bytes for the runner's request pipe (its stdin); nothing once it has exited (its
        event pipe's end tells every open request)."""
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(data)

    def _on_process_exited(self) -> None:
        assert self._transport is not None
        self.returncode = self._transport.get_returncode()
        self._exited.set()
        self._settled.set()
        self._wake.set()

    async def _watch_exit(self) -> None:
        """The exit watcher: reaped -> drain pipes (bounded) -> close -> on_exit, exactly once."""
        await self._exited.wait()
        deadline = self._clock() + PIPE_DRAIN_AFTER_EXIT
        while self._open_pipes and self._clock() < deadline:
            self._wake.clear()
            if not await wait_event(self._wake, deadline - self._clock()):
                break
        if self._open_pipes:
            # Something else in the group holds our pipes: nothing of a dead runner may live on.
            self._signal_group(signal.SIGKILL)
        assert self._transport is not None
        self._transport.close()
        self.requests.gone()
        self._done.set()
        self._wake.set()
        log.debug(
            "runner exited",
            runner_id=self.runner_id,
            pid=self.pid,
            returncode=self.returncode,
            expected=self.stopping,
        )
        if self._on_exit is not None:
            self._on_exit(self, self.returncode if self.returncode is not None else -1)


def _stall_text(limit: float, last: str) -> str:
    text = f"timed out waiting for llama runner to start (no progress for {limit:g}s)"
    return f"{text} - {last}" if last else text
