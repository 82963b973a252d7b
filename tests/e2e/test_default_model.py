"""What `./dev serve` promises: the daemon imports the embedded Gemma 3 270M as gemma3:270m, loads
it in the background, and chats through the real ollama and openai clients."""

from __future__ import annotations

import ollama
import openai
import pytest

from tests.e2e.conftest import start_daemon, wait_until

pytestmark = [pytest.mark.gemma, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with start_daemon(tmp_path_factory.mktemp("gemma"), CORRAL_DEFAULT_MODEL="gemma3:270m",
                      OLLAMA_NUM_PARALLEL="2") as d:
        yield d


def test_default_model_is_imported_and_preloaded(daemon):
    with ollama.Client(host=daemon.url) as c:
        assert "gemma3:270m" in [m.model for m in c.list().models]
        info = c.show("gemma3:270m")
        assert info.details.family == "gemma3" and "<start_of_turn>" in info.template
        assert wait_until(lambda: [m.model for m in c.ps().models] == ["gemma3:270m"], 120)
        [row] = c.ps().models
        assert row.context_length == 4096 and row.size > 200_000_000


def test_gemma_chat_native_and_openai(daemon):
    with ollama.Client(host=daemon.url) as c:
        r = c.chat(model="gemma3:270m", messages=[{"role": "user", "content": "Say hello."}],
                   options={"num_predict": 24, "temperature": 0})
    assert r.message.content.strip(), r
    assert 0 < r.eval_count <= 24 and r.prompt_eval_count > 5
    # timings are sane: positive, and the parts fit in the total
    assert 0 < r.eval_duration < r.total_duration
    assert 0 < r.prompt_eval_duration < r.total_duration
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="x") as oai:
        text = "".join(ch.choices[0].delta.content or "" for ch in oai.chat.completions.create(
            model="gemma3:270m", max_tokens=16, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Name a colour."}]) if ch.choices)
    assert text.strip()
