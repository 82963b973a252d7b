"""Small helpers the benchmarks share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil

# the e2e tests' one way to upload a GGUF and create a model from it
from tests.e2e.conftest import create_model as create_model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_runners(pid: int) -> list[psutil.Process]:
    """The runner processes of daemon ``pid`` that serve a model: not its spare runner while
    it waits for a load (``--spare``; a spare that got its LaunchSpec names itself
    corral-runner, runner/__main__.py)."""
    out = []
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return out
    for k in kids:
        try:
            cmd = k.cmdline()
            if "corral.runner" in " ".join(cmd) and (
                "--spare" not in cmd or k.name() == "corral-runner"
            ):
                out.append(k)
        except psutil.Error:
            continue
    return out


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def spawn_daemon(models: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """``corral serve`` on a free port with the store ``models`` and ``env`` set; returns once it
    listens (its log is drained in a thread so it never blocks on a full pipe)."""
    port = free_port()
    full = {
        **os.environ,
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_MODELS": str(models),
        "CORRAL_DEFAULT_MODEL": "",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.daemon.cli", "serve"],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr
    for line in proc.stderr:
        if "Listening" in line:
            break
    else:
        raise SystemExit("daemon did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, f"http://127.0.0.1:{port}"


def load_note() -> str:
    """How loaded the machine is (``uptime``'s load averages and the core count)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} (1 / 5 min) on {os.cpu_count()} cores"
