"""The runner process with Gemma 3 270M (from the registry package; nothing downloads)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from corral.runner.protocol import LaunchSpec, Ready, decode_event, encode

pytestmark = [pytest.mark.gemma, pytest.mark.slow]


def chat(text: str) -> str:
    return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def runner(gemma_gguf, tmp_path_factory):
    err = tmp_path_factory.mktemp("gemma") / "stderr.log"
    spec = LaunchSpec(model_path=str(gemma_gguf), num_ctx=1024, parallel=2, num_thread=2)
    with err.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.runner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=f,
        )
    proc.stdin.write(encode(spec) + b"\n")
    proc.stdin.flush()
    while True:
        line = proc.stdout.readline()
        assert line, err.read_text()[-3000:]
        ev = decode_event(line)
        if not hasattr(ev, "progress"):
            break
    assert isinstance(ev, Ready), ev
    yield ev, f"http://127.0.0.1:{ev.port}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc.stdin.close()
    proc.stdout.close()


def post(url: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return [json.loads(x) for x in resp]


def test_gemma_generates_with_sane_timings(runner):
    ready, url = runner
    assert ready.n_ctx_train >= 32768 and ready.memory["CPU"].weights > 100 * 2**20
    lines = post(
        url + "/completion",
        {"prompt": chat("Name three colours."), "options": {"temperature": 0, "num_predict": 48}},
    )
    done = lines[-1]
    text = "".join(x["content"] for x in lines[:-1])
    assert done["type"] == "done" and text.strip()
    assert 0 < done["eval_count"] <= 48 and done["prompt_eval_count"] > 5
    # sane timings (no speed threshold: speed is the benchmark's job, this machine is shared)
    assert 0 < done["eval_duration"] and 0 < done["prompt_eval_duration"]
    assert done["eval_duration"] / done["eval_count"] < 60e9  # not nanoseconds mistaken for ms
    assert "<end_of_turn>" not in text


def test_gemma_json_schema_output_parses(runner):
    _, url = runner
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    lines = post(
        url + "/completion",
        {
            "prompt": chat("Describe a cat as JSON with its name and age."),
            "format": schema,
            "options": {"temperature": 0, "num_predict": 100},
        },
    )
    assert lines[-1]["done_reason"] == "stop"
    value = json.loads("".join(x["content"] for x in lines[:-1]))
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
