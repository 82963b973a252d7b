"""Interactive ``corral run`` driven through a pseudo-terminal against a real daemon (FakeEngine
runners), and ``corral pull``'s per-layer progress against a loopback registry.

The pty helper reads the child's output in a thread and ``expect`` waits (condition variable,
safety timeout only) until a text appears after the last match; escape sequences are stripped.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from corral.daemon.cli.main import human_bytes
from tests.daemon.registry_server import RegistryServer, sha256
from tests.e2e.conftest import Daemon, start_daemon
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.timeout(180)
SAFETY = float(os.environ.get("TEST_SAFETY", "30"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


class Pty:
    """A child process on a pseudo-terminal (stdin, stdout and stderr)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        self.slave = slave  # kept to read the terminal mode the child sets
        self.fd = master
        self.raw = b""
        self.pos = 0  # matched up to here (in the cleaned text)
        self.cond = threading.Condition()
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.closed = True
                    self.cond.notify_all()
                    return
                self.raw += data
                self.cond.notify_all()

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def expect(self, needle: str) -> str:
        """Wait until ``needle`` appears after the previous match; return the text before it."""
        with self.cond:
            ok = self.cond.wait_for(lambda: needle in self.text[self.pos :] or self.closed, SAFETY)
            text = self.text
            at = text.find(needle, self.pos)
            assert ok and at >= 0, f"{needle!r} not seen; output:\n{text[-3000:]}"
            before = text[self.pos : at]
            self.pos = at + len(needle)
            return before

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def send_key(self, key: bytes) -> None:
        """A control key, once the line editor has the terminal in raw mode (in cooked mode the
        kernel would take Ctrl+D as end-of-file itself)."""
        deadline = time.monotonic() + SAFETY
        while termios.tcgetattr(self.slave)[3] & termios.ICANON:
            assert time.monotonic() < deadline, "the terminal never left canonical mode"
            time.sleep(0.01)
        os.write(self.fd, key)

    def close(self) -> int:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1
        try:
            rc = self.proc.wait(SAFETY)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(5)
            os.close(self.fd)
        return rc


def post(d: Daemon, path: str, body: dict | bytes) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    with urllib.request.urlopen(
        urllib.request.Request(d.url + path, data=data, method="POST"), timeout=SAFETY
    ) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip().startswith("{") else {}


def get(d: Daemon, path: str) -> dict:
    with urllib.request.urlopen(d.url + path, timeout=SAFETY) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interactive")
    with start_daemon(
        tmp,
        CORRAL_RUNNER_ENGINE="fake",
        CORRAL_LOG_FORMAT="json",
        CORRAL_FAKE_KNOBS='{"tokens_per_second": 1000}',
    ) as d:
        data = write_tiny_llama(tmp / "t.gguf", seed=7).read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        post(d, f"/api/blobs/{digest}", data)
        post(d, "/api/create", {"model": "tiny", "files": {"t.gguf": digest}, "stream": False})
        yield d


def corral_env(d: Daemon, home: Path, term: str) -> dict[str, str]:
    return {
        **os.environ,
        "OLLAMA_HOST": d.url.removeprefix("http://"),
        "HOME": str(home),
        "TERM": term,
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }


def run_pty(d: Daemon, home: Path, *args: str, term: str = "dumb") -> Pty:
    return Pty([sys.executable, "-m", "corral.daemon.cli", "run", *args], corral_env(d, home, term))


@pytest.mark.parametrize("term", ["dumb", "xterm-256color"])
def test_interactive_session_set_parameter_multiline_save(daemon, tmp_path, term):
    saved = f"saved-{term.split('-')[0]}"
    t = run_pty(daemon, tmp_path, "tiny", term=term)
    try:
        t.expect(">>> ")
        t.send("/set parameter num_ctx 1024")
        t.expect("Set parameter 'num_ctx' to '1024'")
        t.expect(">>> ")
        t.send("/set parameter stop end done")
        t.expect("Set parameter 'stop' to 'end, done'")
        t.expect(">>> ")
        t.send('"""line one')
        t.expect("...")  # the continuation prompt
        t.send('line two"""')
        t.expect("line two")
        reply = t.expect(">>> ")  # the streamed reply, then the next prompt
        assert reply.strip()
        # The parameter reached the runner: the model runs with a 1024-token context.
        rows = [m for m in get(daemon, "/api/ps")["models"] if m["name"] == "tiny:latest"]
        assert rows and rows[0]["context_length"] == 1024
        specs = {
            rec["pid"]: rec["spec"]
            for rec in map(
                json.loads, (line for line in list(daemon.log) if '"runner launch spec"' in line)
            )
        }
        assert specs[rows[0]["pid"]]["num_ctx"] == 1024  # what the runner was started with
        t.send("/set system You are terse.")
        t.expect("Set system message.")
        t.expect(">>> ")
        t.send("/show parameters")
        t.expect("User defined parameters:")
        t.expect("num_ctx")
        t.expect("1024")
        t.expect(">>> ")
        t.send(f"/save {saved}")
        t.expect(f"Created new model '{saved}'")
        t.expect(">>> ")
        t.send("/unknown")
        t.expect("Unknown command '/unknown'. Type /? for help")
        t.expect(">>> ")
        t.send("/clear")
        t.expect("Cleared session context")
        t.expect(">>> ")
        t.send("/bye")
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:  # a failed expectation: do not wait for the child
            t.proc.kill()
            t.close()
    show = post(daemon, "/api/show", {"model": saved})
    assert re.search(r"^num_ctx\s+1024$", show["parameters"], re.M), show["parameters"]
    assert show["system"] == "You are terse."
    msgs = show["messages"]
    assert msgs[0] == {"role": "user", "content": "line one\nline two"}
    assert msgs[1]["role"] == "assistant" and msgs[1]["content"].strip()
    # `corral show` lists the parameter too.
    r = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "show", saved],
        env=corral_env(daemon, tmp_path, "dumb"),
        capture_output=True,
        text=True,
        timeout=SAFETY,
    )
    assert r.returncode == 0 and re.search(r"num_ctx\s+1024", r.stdout), r.stdout


FAKE_WORDS = re.compile(r"\b(quick|brown|fox|jumps|over|lazy|dog|bird|sings)\b")


def test_interactive_format_load_and_ctrl_d(daemon, tmp_path):
    t = run_pty(daemon, tmp_path, "tiny")
    try:
        t.expect(">>> ")
        t.send("/set format json")
        t.expect("Set format to 'json' mode.")
        t.expect(">>> ")
        t.send("hi")
        reply = t.expect(">>> ")
        assert '{"fake": true}' in reply and not FAKE_WORDS.search(reply)  # JSON mode
        t.send("/set noformat")
        t.expect("Disabled format.")
        t.expect(">>> ")
        t.send("hi")
        assert FAKE_WORDS.search(t.expect(">>> "))
        t.send("/load nosuch")
        t.expect("Loading model 'nosuch'")
        t.expect("error: model 'nosuch:latest' not found")
        t.expect(">>> ")
        t.send("/load tiny")
        t.expect("Loading model 'tiny'")
        t.expect(">>> ")
        t.send("/show system")
        t.expect("No system message was specified for this model.")
        t.expect(">>> ")
        t.send_key(b"\x04")  # Ctrl+D leaves
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:  # a failed expectation: do not wait for the child
            t.proc.kill()
            t.close()


def test_one_shot_prompt(daemon, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "run", "tiny", "hello"],
        env=corral_env(daemon, tmp_path, "dumb"),
        capture_output=True,
        text=True,
        timeout=SAFETY,
    )
    assert r.returncode == 0, r.stderr
    assert FAKE_WORDS.search(r.stdout)


# ---- pull progress -----------------------------------------------------------------------------


async def test_pull_prints_a_bar_per_layer(daemon, tmp_path):
    data = write_tiny_llama(tmp_path / "p.gguf", seed=9).read_bytes()
    params = b'{"temperature":0}'
    async with RegistryServer() as reg:
        manifest = json.loads(
            reg.publish(
                "library/pulled",
                "latest",
                [
                    ("application/vnd.ollama.image.model", data),
                    ("application/vnd.ollama.image.params", params),
                ],
            )
        )
        name = f"{reg.host}/library/pulled:latest"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral.daemon.cli",
            "pull",
            name,
            "--insecure",
            env=corral_env(daemon, tmp_path, "dumb"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = err.decode().splitlines()
    assert lines[0] == "pulling manifest" and lines[-1] == "success", lines
    # One finished bar per blob of the manifest (layers and config), with its size.
    sizes = {
        e["digest"].removeprefix("sha256:")[:12]: e["size"]
        for e in [*manifest["layers"], manifest["config"]]
    }
    bars = {}
    for line in lines:
        m = re.fullmatch(r"pulling ([0-9a-f]{12}): 100% ▕(█+)▏ (.+)", line)
        if m:
            bars[m.group(1)] = m.group(3)
    assert bars == {d: human_bytes(n) for d, n in sizes.items()}, lines
    assert sizes[sha256(data).removeprefix("sha256:")[:12]] == len(data)
    assert "verifying sha256 digest" in lines and "writing manifest" in lines


async def test_pull_on_a_terminal_redraws_bars(daemon, tmp_path):
    data = write_tiny_llama(tmp_path / "q.gguf", seed=11).read_bytes()
    async with RegistryServer() as reg:
        manifest = json.loads(
            reg.publish("library/onterm", "latest", [("application/vnd.ollama.image.model", data)])
        )
        t = Pty(
            [
                sys.executable,
                "-m",
                "corral.daemon.cli",
                "pull",
                f"{reg.host}/library/onterm:latest",
                "--insecure",
            ],
            corral_env(daemon, tmp_path, "xterm-256color"),
        )
        rc = await asyncio.to_thread(t.close)
    assert rc == 0, t.text
    for e in [*manifest["layers"], manifest["config"]]:
        short = e["digest"].removeprefix("sha256:")[:12]
        assert re.search(
            rf"pulling {short}: 100% ▕█+▏ {re.escape(human_bytes(e['size']))}", t.text
        ), t.text
    assert "success" in t.text
