"""End-to-end fixtures: a real ``corral serve`` process on a free port with a temporary store.

The daemon is started as a subprocess and is ready when it logs its ``Listening`` line (a
handshake, not a sleep). Each test module that needs different ``OLLAMA_*`` settings starts its
own daemon with :func:`start_daemon`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.tiny_gguf import write_tiny_llama


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    proc: subprocess.Popen
    url: str
    models: Path
    log: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        return "\n".join(self.log)

    def runner_pids(self, spares: bool = False) -> set[int]:
        """Pids of this daemon's runner children (``python -m corral.runner``); the spare
        runner waiting for a load (``--spare``, not yet named ``corral-runner`` by a LaunchSpec)
        only with ``spares``."""
        import psutil

        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return set()
        pids = set()
        for k in kids:
            with contextlib.suppress(psutil.Error):
                cmd = k.cmdline()
                if "corral.runner" in " ".join(cmd) and (
                    spares or "--spare" not in cmd or k.name() == "corral-runner"
                ):
                    pids.add(k.pid)
        return pids

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def start_daemon(
    tmp_path: Path, scheme: str = "http", exit_code: int = 0, **env_overrides: str | None
) -> Iterator[Daemon]:
    """A daemon on a free port with an empty store; ``env_overrides`` set variables (None
    unsets one, e.g. ``CORRAL_DEFAULT_MODEL=None`` for what a fresh install does); ``scheme``
    ``https`` with ``CORRAL_TLS_CERT``/``CORRAL_TLS_KEY`` among them serves HTTPS.
    ``exit_code``: how the test leaves the daemon (a test that kills it: ``-9``)."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    env.update(
        {
            "OLLAMA_HOST": f"{scheme}://127.0.0.1:{port}",
            "OLLAMA_MODELS": str(models),
            "CORRAL_DEFAULT_MODEL": "",  # no Gemma import unless a test asks for it
            "OLLAMA_DEBUG": "1",
        }
    )
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    for k in [k for k, v in env_overrides.items() if v is None]:
        env.pop(k, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.daemon.cli", "serve"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    d = Daemon(proc=proc, url=f"{scheme}://127.0.0.1:{port}", models=models)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            d.log.append(line.rstrip("\n"))
            if "Listening" in line:
                ready.set()
        ready.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    ready.wait(60)
    if proc.poll() is not None or not any("Listening" in line for line in d.log):
        d.stop()
        pytest.fail("daemon did not start:\n" + d.log_text())
    try:
        yield d
    finally:
        pids = d.runner_pids(spares=True)
        rc = d.stop()
        t.join(5)
        if proc.stderr is not None:
            proc.stderr.close()
        assert rc == exit_code, f"daemon exited {rc}:\n{d.log_text()[-4000:]}"
        # No runner process may outlive the daemon.
        assert not [p for p in pids if pid_alive(p)]


def pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(pred, timeout: float = 20.0, interval: float = 0.02) -> bool:
    """Poll a condition owned by another process (safety-net timeout only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


async def create_model(s: aiohttp.ClientSession, url: str, gguf: Path, name: str) -> str:
    """Upload ``gguf`` and create model ``name`` from it; returns ``name:latest`` (the benchmarks
    use it too: ``bench/common``)."""
    data = gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with s.post(f"{url}/api/blobs/{digest}", data=data) as r:
        assert r.status in (200, 201), await r.text()
    async with s.post(
        f"{url}/api/create", json={"model": name, "files": {gguf.name: digest}, "stream": False}
    ) as r:
        assert r.status == 200, await r.text()
    return f"{name}:latest"


async def create_tiny(
    s: aiohttp.ClientSession, url: str, tmp_path: Path, name: str, seed: int
) -> str:
    """The tiny model written with ``seed`` (another seed, another blob) as model ``name``."""
    return await create_model(s, url, write_tiny_llama(tmp_path / f"{name}.gguf", seed=seed), name)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """One client session per test, closed after it."""
    async with aiohttp.ClientSession() as s:
        yield s
