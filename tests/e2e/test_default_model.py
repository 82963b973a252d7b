"""What `./dev serve` promises on a fresh install: the daemon imports the embedded Gemma 3 270M
(a base model) as gemma3:270m into an empty store, loads it, says so in one last start-up line,
and the README's quick-start examples, run as written, end by themselves or at the default cap.

Assertions count tokens, never time (a shared machine may be slow)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import ollama
import openai
import pytest

from corral.daemon.models.default_model import DEFAULT_PARAMETERS
from tests.e2e.conftest import start_daemon, wait_until

pytestmark = [pytest.mark.gemma, pytest.mark.slow, pytest.mark.timeout(300)]

README = (Path(__file__).parents[2] / "README.md").read_text()
CAP = DEFAULT_PARAMETERS["num_predict"]


def readme_command(pattern: str) -> str:
    """The one README line that matches ``pattern`` (so the test runs what the README says)."""
    [line] = [ln for ln in README.splitlines() if re.search(pattern, ln)]
    return line.split("  #")[0].strip()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # a fresh install: CORRAL_DEFAULT_MODEL unset, empty store
    with start_daemon(
        tmp_path_factory.mktemp("gemma"), CORRAL_DEFAULT_MODEL=None, OLLAMA_NUM_PARALLEL="2"
    ) as d:
        assert wait_until(lambda: "corral is ready" in d.log_text(), 240), d.log_text()[-3000:]
        yield d


def cli(daemon, *args: str) -> str:
    env = {**os.environ, "OLLAMA_HOST": daemon.url}
    r = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_default_model_is_imported_and_preloaded(daemon):
    with ollama.Client(host=daemon.url) as c:
        assert [m.model for m in c.list().models] == ["gemma3:270m"]
        info = c.show("gemma3:270m")
        assert info.details.family == "gemma3" and "Assistant:" in info.template
        assert [m.model for m in c.ps().models] == ["gemma3:270m"]  # loaded before "ready"
        [row] = c.ps().models
        assert row.context_length == 4096 and row.size > 200_000_000
    [ready] = [ln for ln in daemon.log if "corral is ready" in ln]
    assert f"url={daemon.url}" in ready and "model=gemma3:270m" in ready
    assert "run gemma3:270m 'The capital of France is'" in ready


def test_show_parameters_lists_the_defaults(daemon):
    lines = cli(daemon, "show", "gemma3:270m", "--parameters").splitlines()
    assert any(re.fullmatch(rf"\s*num_predict\s+{CAP}", ln) for ln in lines), lines
    assert any(re.fullmatch(r'\s*stop\s+"\\n\\n"', ln) for ln in lines), lines


def test_readme_chat_example_ends_within_the_cap(daemon):
    """The README's curl, same URL path and body, streamed as curl receives it."""
    cmd = shlex.split(readme_command(r"^curl .*/api/chat"))
    url, body = cmd[1], cmd[cmd.index("-d") + 1]
    assert url == "http://127.0.0.1:11434/api/chat"
    req = urllib.request.Request(daemon.url + "/api/chat", data=body.encode())
    with urllib.request.urlopen(req, timeout=240) as r:
        lines = [json.loads(ln) for ln in r.read().splitlines()]
    final = lines[-1]
    assert final["done"] and not any(ln["done"] for ln in lines[:-1])
    assert final["done_reason"] in ("stop", "length")
    assert 0 < final["eval_count"] <= CAP
    text = "".join(ln["message"]["content"] for ln in lines)
    assert text.strip() and "User:" not in text  # an answer, not the next question


def test_readme_completion_example(daemon):
    """`corral run gemma3:270m "The capital of France is"`, as the README writes it."""
    args = shlex.split(readme_command(r"^\.venv/bin/corral run gemma3:270m"))
    assert args[0].endswith("corral")
    out = cli(daemon, *args[1:])
    assert out.strip() and "User:" not in out
    # greedy, the same prompt through the API: the base model knows this one
    with ollama.Client(host=daemon.url) as c:
        r = c.generate(model="gemma3:270m", prompt=args[-1], options={"temperature": 0})
    assert "Paris" in r.response and r.done_reason in ("stop", "length") and r.eval_count <= CAP


def test_request_options_override_the_model_parameters(daemon):
    with ollama.Client(host=daemon.url) as c:
        r = c.chat(
            model="gemma3:270m",
            messages=[{"role": "user", "content": "Say hello."}],
            options={"num_predict": 24, "temperature": 0},
        )
    assert r.message.content.strip(), r
    assert 0 < r.eval_count <= 24 and r.prompt_eval_count > 5
    # timings are sane: positive, and the parts fit in the total
    assert 0 < r.eval_duration < r.total_duration
    assert 0 < r.prompt_eval_duration < r.total_duration


def test_gemma_chat_openai(daemon):
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="x") as oai:
        text = "".join(
            ch.choices[0].delta.content or ""
            for ch in oai.chat.completions.create(
                model="gemma3:270m",
                max_tokens=16,
                temperature=0,
                stream=True,
                messages=[{"role": "user", "content": "Name a colour."}],
            )
            if ch.choices
        )
    assert text.strip()


# Open WebUI's title prompt (open_webui/config.py DEFAULT_TITLE_GENERATION_PROMPT_TEMPLATE, the
# history as its misc.py writes it): the base model continues its USER:/ASSISTANT: transcript
OPEN_WEBUI_TITLE = "\n".join(
    [
        "### Task:",
        "Generate a concise title summarizing the chat history.",
        "### Guidelines:",
        "- The title should clearly represent the main theme or subject of the conversation.",
        "- Keep it short: 2-4 words is best.",
        "- Do not use emojis, quotation marks, or special formatting.",
        "- Write the title in the chat's primary language; default to English if multilingual.",
        "- Prioritize accuracy over creativity.",
        "- Your entire response must consist solely of the JSON object, without any "
        "introductory or concluding text.",
        "- The output must be a single, raw JSON object, without any markdown code "
        "fences or other encapsulating text.",
        "- Ensure no conversational text, affirmations, or explanations precede or "
        "follow the raw JSON output, as this will cause direct parsing failure.",
        "### Output:",
        'JSON format: { "title": "your concise title here" }',
        "### Examples:",
        '- { "title": "Stock Trends" },',
        '- { "title": "Chocolate Chip Cookies" },',
        '- { "title": "Music Streaming" },',
        '- { "title": "Remote Work" }',
        "### Chat History:",
        "<chat_history>",
        "USER: Hi! What is the capital of France?",
        "ASSISTANT: The capital of France is Paris.",
        "</chat_history>",
    ]
)


def tool(i: int) -> dict:
    return {
        "type": "function",
        "function": {
            "name": f"builtin_tool_{i}",
            "description": "A front end's built-in tool.",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }


def test_a_front_ends_chat_with_its_tools_is_answered(daemon):
    """Open WebUI sends its 36 built-in tools with every message: the model has the tools
    capability (its template names them) and answers."""
    with ollama.Client(host=daemon.url) as c:
        assert "tools" in c.show("gemma3:270m").capabilities
        r = c.chat(
            model="gemma3:270m",
            messages=[{"role": "user", "content": "Hi! What is the capital of France?"}],
            tools=[tool(i) for i in range(36)],
            options={"temperature": 0},
        )
    assert r.done and (r.message.content.strip() or r.message.tool_calls), r
    assert r.eval_count <= CAP


def test_a_title_request_ends_at_the_next_turn_in_any_case(daemon):
    """Open WebUI's title request (num_predict 1000) ends with the model's turn, not after
    1000 tokens, and the chat has slots beside it (4 for the embedded weights)."""
    with ollama.Client(host=daemon.url) as c:
        r = c.chat(
            model="gemma3:270m",
            messages=[{"role": "user", "content": OPEN_WEBUI_TITLE}],
            options={"num_predict": 1000, "temperature": 0},
        )
        assert r.done_reason == "stop" and r.eval_count < 200, r
        [row] = c.ps().models
    raw = json.loads(urllib.request.urlopen(daemon.url + "/api/ps", timeout=30).read())
    assert raw["models"][0]["num_parallel"] == 4 and row.model == "gemma3:270m"
