"""``python -m corral.runner``: one model, one process.

``python -m corral.runner --probe`` prints one EngineProbe JSON line (runner/devices.py) and exits.

``python -m corral.runner --spare ENGINE`` is a spare runner (docs/DESIGN.md "Spare runner"): the
daemon starts it before it knows which model it will load, so it does its imports (and, for the
real engine, llama.cpp's backend initialisation) while nobody waits, then waits at step 2 like
any runner, named ``corral-spare`` (``/proc/self/comm``) until its LaunchSpec comes. Its warm-up
done, it writes one ``Warm`` event. A failed warm-up changes nothing (``Warm`` is written all the
same): the load then fails (or works) as it would have in a fresh runner.
Every runner names itself ``corral-runner`` once it has read its LaunchSpec.

Sequence (docs/DESIGN.md "Runner process protocol"):
1. stdout becomes the event pipe: its fd is duplicated for events and fd 1 is pointed at stderr,
   so nothing else (llama.cpp, a stray print) can corrupt the pipe.
2. Read one LaunchSpec JSON line from stdin (a bad line: LoadFailed, exit 2; EOF: exit 0).
3. Loading events, load the engine in a worker thread; failure: LoadFailed(reason, oom), exit 1.
4. Bind 127.0.0.1:0, emit Ready(port, pid, n_ctx, memory...), serve HTTP, and read the request
   pipe: stdin's lines after the LaunchSpec (Submit, Cancel), on the event loop.
5. stdin EOF (the daemon is gone): cancel everything, exit 0. SIGTERM/SIGINT: refuse new work,
   let in-flight work finish within LaunchSpec.grace_period, cancel the rest, exit 0.
   Either one during the load exits 0 at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

import msgspec
import structlog
from aiohttp import web

from corral.runner.common import LoadError
from corral.runner.eventloop import loop_factory
from corral.runner.protocol import (
    LaunchSpec,
    LoadFailed,
    Loading,
    Ready,
    Warm,
    decode_launch,
    encode,
)

log = structlog.get_logger("corral.runner")

STOP_SAVE_SLACK = 0.8  # s: saves end this long before the daemon's SIGKILL would come
SAVE_WITHOUT_DAEMON = 10.0  # s of saving after stdin EOF (the daemon is gone, nobody kills us)


class EventPipe:
    """Writes lifecycle events, one JSON line each, on the original stdout. Thread-safe."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, event: msgspec.Struct) -> None:
        self.write(encode(event) + b"\n")

    def write(self, data: bytes) -> None:
        """Whole lines, all of them (a pipe may take a long write in parts); blocks while the
        daemon's end of the pipe is full."""
        with self._lock:
            try:
                done = self._out.write(data) or 0  # a short line goes whole (PIPE_BUF)
                if done < len(data):
                    view = memoryview(data)[done:]
                    while view:
                        view = view[self._out.write(view) or 0 :]
            except (BrokenPipeError, ValueError):
                pass  # the daemon stopped reading; stdin EOF will end us


def take_stdout() -> EventPipe:
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return EventPipe(os.fdopen(fd, "wb", buffering=0))


def configure_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"]),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)


def make_engine(spec: LaunchSpec):
    if spec.engine == "fake":
        from corral.runner.fake import FakeEngine

        return FakeEngine(spec)
    from corral.runner.engine import Engine  # loads llama.cpp: only a real-engine runner

    return Engine(spec)


async def run(spec: LaunchSpec, events: EventPipe, rest: bytes = b"") -> int:
    """Load, serve and stop one runner; ``rest``: what followed the LaunchSpec line in its read
    of stdin (the request pipe's first bytes; none by the protocol)."""
    from corral.runner.server import PipeReader, PipeRelay, RunnerServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    why: list[str] = []
    loading = True

    stopped_at: list[float] = []

    def request_stop(reason: str) -> None:  # on the loop
        if loading:
            log.info("runner exiting during load", reason=reason)
            os._exit(0)
        why.append(reason)
        stopped_at.append(time.monotonic())
        stop.set()

    if spec.engine == "fake" and spec.fake.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, request_stop, "sigterm")
    loop.add_signal_handler(signal.SIGINT, request_stop, "sigterm")

    # stdin: the request pipe, read on the loop; its EOF means the daemon is gone
    _, reader = await loop.connect_read_pipe(
        lambda: PipeReader(lambda: request_stop("stdin eof"), rest),
        open(sys.stdin.fileno(), "rb", buffering=0, closefd=False),
    )

    engine = make_engine(spec)
    engine.report = events.send
    events.send(Loading(progress=0.0))
    t0 = time.perf_counter_ns()
    try:
        await loop.run_in_executor(None, engine.load, lambda p: events.send(Loading(progress=p)))
    except LoadError as e:
        log.error("load failed", reason=e.reason, oom=e.oom)
        events.send(LoadFailed(reason=e.reason, oom=e.oom))
        return 1
    except Exception as e:  # an engine bug must still end the handshake
        log.exception("load failed")
        events.send(LoadFailed(reason=f"{type(e).__name__}: {e}"))
        return 1
    load_ns = time.perf_counter_ns() - t0
    engine.start()
    server = RunnerServer(engine, relay=PipeRelay(events.write))
    reader.start(server.pipe_line)
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    loading = False
    events.send(
        Ready(
            port=port,
            pid=os.getpid(),
            n_ctx=engine.n_ctx,
            n_ctx_per_slot=engine.n_ctx_per_slot,
            parallel=engine.parallel,
            n_ctx_train=engine.n_ctx_train,
            memory=engine.memory,
            load_duration=load_ns,
        )
    )
    log.info(
        "runner ready",
        port=port,
        model=spec.model_path,
        parallel=engine.parallel,
        n_ctx=engine.n_ctx,
    )
    try:
        await stop.wait()
        server.draining = True
        log.info("runner stopping", reason=why[0], inflight=server.inflight)
        if why[0] == "sigterm":
            try:
                await asyncio.wait_for(server.wait_idle(), spec.grace_period)
            except TimeoutError:
                log.warning(
                    "grace period over: cancelling in-flight work", inflight=server.inflight
                )
        engine.cancel_all("runner is shutting down")
        try:
            await asyncio.wait_for(server.wait_idle(), 2.0)
        except TimeoutError:
            pass
    finally:
        await runner.cleanup()
        # the daemon SIGKILLs grace_period + 1 s after its SIGTERM: the prompt caches are saved
        # until shortly before that (with the daemon gone, as long as SAVE_WITHOUT_DAEMON)
        stop_t0 = stopped_at[0] if stopped_at else time.monotonic()
        budget = (
            spec.grace_period + 1 - STOP_SAVE_SLACK
            if why[:1] == ["sigterm"]
            else SAVE_WITHOUT_DAEMON
        )
        await loop.run_in_executor(None, engine.close, stop_t0 + budget)
    return 0


# libgomp's busy-wait before a waiting thread sleeps, in spins (one `pause`, ~30 ns on this
# machine). Its default, 300,000 (~10 ms), is made for cores that are ours alone: on a 2-core
# machine shared with the daemon, clients or other work, a decode thread that waits at one of
# llama.cpp's ~300 barriers per step for a partner that was preempted burns its own time slice
# and the step crawls (4 streams of Gemma 3 270M on 2 threads, load ~7.5 from other processes:
# 3.7 tok/s at the default, 22 at 300-2000 spins, 26 at 0, 13.5 at 6000). 2000 spins (~60 us)
# are meant to cover a partner's normal lateness at a barrier on an idle machine.
GOMP_SPINCOUNT = "2000"


def openmp_wait_policy(env: dict[str, str] | os._Environ) -> None:
    """Set the OpenMP wait of llama.cpp's decode threads unless the user chose one (either
    variable). Must run before llama_cpp is imported: libgomp reads it when it is loaded."""
    if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT


def blas_threads(env: dict[str, str] | os._Environ) -> None:
    """One OpenBLAS thread (numpy's) unless the user set OPENBLAS_NUM_THREADS: the runner does
    no BLAS work (its numpy is element-wise: argmax, sampling; llama.cpp has its own threads),
    but OpenBLAS starts a worker per core when numpy is imported, which busy-waits before it
    sleeps: a spare runner's warm-up took 0.60-0.81 s of CPU with one thread against 0.67-0.89 s
    with two (2 cores, load 4-5, five alternating runs), CPU that a load running meanwhile on
    the same cores misses. Must run before numpy is imported."""
    env.setdefault("OPENBLAS_NUM_THREADS", "1")


# Process names (comm: what ps, top and psutil's name() show): a spare runner while it waits
# for its LaunchSpec, then every runner once it has one
SPARE_NAME = b"corral-spare"
RUNNER_NAME = b"corral-runner"
_COMM = "/proc/self/comm"  # Linux; elsewhere the name stays the interpreter's


def set_process_name(name: bytes) -> None:
    """Name this process (its main thread, and the threads it starts from now on)."""
    try:
        with open(_COMM, "wb") as f:
            f.write(name)
    except OSError:
        pass


def event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The runner's event loop, as the daemon's (``CORRAL_EVENT_LOOP``, inherited;
    :func:`corral.runner.eventloop.loop_factory`; a missing uvloop is the daemon's to warn of). A
    tiny request's runner CPU is largely the loop's wake-ups from the decode thread and its
    transports (fake engine, load 3.3: 208 -> 135 us back to back, 220 -> 173 us with gaps)."""
    return loop_factory(os.environ.get("CORRAL_EVENT_LOOP", "").lower())


def warm_up(engine: str) -> None:
    """What a runner of ``engine`` does before it reads its LaunchSpec, done ahead: the imports
    (aiohttp's server, numpy, llama_cpp) and llama.cpp's backend initialisation."""
    try:
        import corral.runner.server

        if engine == "fake":
            import corral.runner.fake  # noqa: F401
        else:
            from corral.runner.engine import init_backend

            init_backend()
    except Exception:  # the real load will meet it again and say so
        log.exception("spare runner warm-up failed")


def read_line(fd: int) -> tuple[bytes, bytes]:
    """The first line of ``fd`` and what came after it in the same reads (unbuffered: the
    request pipe that follows the LaunchSpec is read on the event loop); b"" at EOF."""
    data = b""
    while b"\n" not in data:
        got = os.read(fd, 65536)
        if not got:
            return data, b""
        data += got
    line, _, rest = data.partition(b"\n")
    return line, rest


def main() -> int:
    openmp_wait_policy(os.environ)
    blas_threads(os.environ)
    args = sys.argv[1:]
    if args == ["--probe"]:
        from corral.runner.devices import probe

        events = take_stdout()  # llama.cpp's own log lines go to stderr, the answer to stdout
        events.send(probe())
        return 0
    events = take_stdout()
    configure_logging()
    spare = args[:1] == ["--spare"]
    if spare:
        set_process_name(SPARE_NAME)
        warm_up(args[1] if len(args) > 1 else "llama")
    factory = event_loop()  # before the spec: a spare imports uvloop while nobody waits
    if spare:
        events.send(Warm())  # the daemon prefers a warm spare and spawns the next one now
    line, rest = read_line(sys.stdin.fileno())
    set_process_name(RUNNER_NAME)
    if not line.strip():
        return 0
    try:
        spec = decode_launch(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        events.send(LoadFailed(reason=f"bad launch spec: {e}"))
        return 2
    configure_logging(spec.verbose)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run(spec, events, rest))


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Hard exit: llama.cpp's threads and the executor's must not keep the process alive.
    os._exit(code)
