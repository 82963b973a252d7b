"""`python -m corral.runner` as a real child process: handshake, load failures, stdin EOF,
SIGTERM (idle, draining, grace exceeded, ignored), a hard crash, and the tiny model end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import pytest

from corral.runner.protocol import (
    FakeKnobs,
    LaunchSpec,
    LoadFailed,
    Loading,
    Ready,
    decode_event,
    encode,
)


class Child:
    def __init__(
        self, spec: LaunchSpec | bytes | None, stderr_path: Path, args: tuple[str, ...] = ()
    ) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral.runner", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self.events: list[Loading | Ready | LoadFailed] = []
        if spec is not None:
            self.send(spec)

    def send(self, spec: LaunchSpec | bytes) -> None:
        line = spec if isinstance(spec, bytes) else encode(spec)
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def handshake(self) -> Ready | LoadFailed:
        """Read events until Ready or LoadFailed (EOF first is a test failure)."""
        while True:
            raw = self.proc.stdout.readline()
            assert raw, f"runner exited without a final event; stderr:\n{self.stderr()}"
            ev = decode_event(raw)
            self.events.append(ev)
            if isinstance(ev, Ready | LoadFailed):
                return ev

    def stderr(self, tail: int = 3000) -> str:
        return self.stderr_path.read_text(errors="replace")[-tail:]

    def url(self, path: str) -> str:
        ready = self.events[-1]
        assert isinstance(ready, Ready)
        return f"http://127.0.0.1:{ready.port}{path}"

    def post(self, path: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(
            self.url(path),
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        return urllib.request.urlopen(req, timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


@pytest.fixture
def spawn(tmp_path):
    children: list[Child] = []

    def make(spec: LaunchSpec | bytes | None, *args: str) -> Child:
        c = Child(spec, tmp_path / f"stderr-{len(children)}.log", args)
        children.append(c)
        return c

    yield make
    for c in children:
        c.kill()


def fake(**knobs) -> LaunchSpec:
    grace = knobs.pop("grace_period", 5.0)
    return LaunchSpec(
        model_path="/nonexistent/fake.gguf",
        engine="fake",
        parallel=2,
        num_ctx=128,
        grace_period=grace,
        fake=FakeKnobs(**knobs),
    )


def stream_then_sigterm(c: Child, num_predict: int):
    """Start a stream, read its first line, send SIGTERM; return the open response."""
    assert isinstance(c.handshake(), Ready)
    resp = c.post("/completion", {"prompt": "x", "options": {"num_predict": num_predict}})
    assert json.loads(resp.readline())["type"] == "chunk"
    c.proc.send_signal(signal.SIGTERM)
    return resp


def lines(resp) -> list[dict]:
    with resp:
        return [json.loads(x) for x in resp]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_handshake_serves_and_exits_on_stdin_eof(spawn):
    c = spawn(fake(load_time=0.2))
    ready = c.handshake()
    assert isinstance(ready, Ready), ready
    assert isinstance(c.events[0], Loading) and ready.pid == c.proc.pid and ready.n_ctx == 256
    assert ready.memory["CPU"].weights > 0
    health = get_json(c.url("/health"))
    assert health["status"] == "ok" and health["slots_total"] == 2
    out = lines(c.post("/completion", {"prompt": "hi", "options": {"num_predict": 3}}))
    assert out[-1]["type"] == "done" and out[-1]["eval_count"] == 3
    c.proc.stdin.close()
    assert c.proc.wait(10) == 0
    assert c.proc.stdout.read() == b""  # nothing but events on stdout


@pytest.mark.parametrize(
    ("knobs", "oom", "reason"),
    [
        ({"fail_load_oom": True}, True, "out of memory"),
        ({"fail_load": "tensor data is corrupt"}, False, "corrupt"),
    ],
)
def test_load_failure_is_reported(spawn, knobs, oom, reason):
    c = spawn(fake(**knobs))
    ev = c.handshake()
    assert isinstance(ev, LoadFailed) and ev.oom is oom and reason in ev.reason
    assert c.proc.wait(10) == 1


def test_bad_launch_spec_fails(spawn):
    c = spawn(b'{"type":"launch","version":99,"model_path":"x"}')
    ev = c.handshake()
    assert isinstance(ev, LoadFailed) and "version" in ev.reason
    assert c.proc.wait(10) == 2


def test_stdin_eof_during_load_exits(spawn):
    c = spawn(fake(load_time=30))
    assert isinstance(msgspec.json.decode(c.proc.stdout.readline()), dict)  # Loading
    t0 = time.monotonic()
    c.proc.stdin.close()
    assert c.proc.wait(10) == 0 and time.monotonic() - t0 < 5


def test_sigterm_idle_exits_zero(spawn):
    c = spawn(fake())
    assert isinstance(c.handshake(), Ready)
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(10) == 0


def test_sigterm_lets_inflight_finish_and_refuses_new_work(spawn):
    c = spawn(fake(tokens_per_second=50))
    rest = lines(stream_then_sigterm(c, 25))
    assert rest[-1]["type"] == "done" and rest[-1]["eval_count"] == 25
    assert c.proc.wait(10) == 0


def test_sigterm_cancels_work_past_the_grace_period(spawn):
    c = spawn(fake(tokens_per_second=100, grace_period=0.3))
    rest = lines(stream_then_sigterm(c, 100000))
    assert rest[-1] == {"type": "error", "error": "runner is shutting down"}
    assert c.proc.wait(10) == 0


def test_crash_after_tokens_exits_hard(spawn):
    c = spawn(fake(crash_after_tokens=5, tokens_per_second=100))
    assert isinstance(c.handshake(), Ready)
    resp = c.post("/completion", {"prompt": "x", "options": {"num_predict": 50}})
    got: list[dict] = []
    with resp:
        try:
            for raw in resp:
                got.append(json.loads(raw))
        except Exception:  # the connection may break mid-chunk
            pass
    assert all(x["type"] == "chunk" for x in got) and len(got) <= 5
    assert c.proc.wait(10) == 1


def test_ignore_sigterm(spawn):
    c = spawn(fake(ignore_sigterm=True))
    assert isinstance(c.handshake(), Ready)
    c.proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        c.proc.wait(0.5)
    get_json(c.url("/health"))
    c.proc.kill()
    assert c.proc.wait(10) == -signal.SIGKILL


def test_tiny_model_end_to_end(spawn, tiny_gguf):
    c = spawn(LaunchSpec(model_path=str(tiny_gguf), num_ctx=256, parallel=2, num_thread=1))
    ready = c.handshake()
    assert isinstance(ready, Ready), c.stderr()
    assert ready.n_ctx == 512 and ready.n_ctx_per_slot == 256 and ready.n_ctx_train == 4096
    cpu = ready.memory["CPU"]
    assert cpu.weights > 500_000 and cpu.kv > 0 and cpu.compute > 0
    out = lines(
        c.post("/completion", {"prompt": "hello", "options": {"temperature": 0, "num_predict": 8}})
    )
    assert out[-1]["type"] == "done" and out[-1]["eval_count"] == 8
    with c.post("/embed", {"input": ["a", "b"]}) as r:
        emb = json.loads(r.read())
    assert len(emb["embeddings"]) == 2
    assert "model buffer size" in c.stderr(tail=10**7)  # llama.cpp's log goes to stderr
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(20) == 0
    assert c.proc.stdout.read() == b""


def test_a_spare_runner_loads_the_tiny_model_as_a_fresh_one_does(spawn, tiny_gguf):
    """A spare (imports and llama.cpp's backend done before its spec) answers exactly as a
    runner started with its spec, and measures the same memory."""
    spec = LaunchSpec(model_path=str(tiny_gguf), num_ctx=256, parallel=2, num_thread=1)
    body = {"prompt": "hello", "options": {"temperature": 0, "num_predict": 8}}
    fresh, spare = spawn(spec), spawn(None, "--spare", "llama")
    spare.send(spec)  # read once its warm-up is over
    answers, memory = [], []
    for c in (fresh, spare):
        ready = c.handshake()
        assert isinstance(ready, Ready), c.stderr()
        answers.append(lines(c.post("/completion", body))[-1]["tokens"])
        memory.append(ready.memory["CPU"])
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(20) == 0
    assert answers[0] == answers[1] and len(answers[0]) > 8
    assert memory[0] == memory[1] and memory[1].weights > 500_000


def test_missing_model_file_fails(spawn, tmp_path):
    c = spawn(LaunchSpec(model_path=str(tmp_path / "missing.gguf")))
    ev = c.handshake()
    assert isinstance(ev, LoadFailed) and "not found" in ev.reason and not ev.oom
    assert c.proc.wait(10) == 1


def test_corrupt_model_file_fails(spawn, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    c = spawn(LaunchSpec(model_path=str(bad)))
    ev = c.handshake()
    assert isinstance(ev, LoadFailed) and "failed to load model" in ev.reason
    assert c.proc.wait(10) == 1


def test_refused_after_drain_starts(spawn):
    c = spawn(fake(tokens_per_second=50, grace_period=3))
    resp = stream_then_sigterm(c, 40)
    deadline = time.monotonic() + 5
    while True:  # the signal is handled asynchronously: wait until the runner reports draining
        health = get_json(c.url("/health"))
        if health["status"] == "draining" or time.monotonic() > deadline:
            break
    assert health["status"] == "draining"
    with pytest.raises(urllib.error.HTTPError) as err:
        c.post("/completion", {"prompt": "y"})
    assert err.value.code == 503
    err.value.close()
    lines(resp)
    assert c.proc.wait(10) == 0
