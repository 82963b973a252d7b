"""The honest surface: options with no effect are named in one warning per request, and
``_debug_render_only`` returns the rendered prompt without running the model."""

from __future__ import annotations

from structlog.testing import capture_logs

from tests.daemon.test_api_infer_support import Env, env  # noqa: F401 - fixture

MSG = [{"role": "user", "content": "Hi"}]


async def test_ignored_options_one_warning(env: Env) -> None:
    with capture_logs() as logs:
        await env.ollama.chat(
            model="chatml",
            messages=MSG,
            options={"mirostat": 2, "tfs_z": 0.9, "temperature": 0.1, "made_up": 1},
        )
        await env.ollama.generate(model="chatml", prompt="x", options={"penalize_newline": True})
        await env.ollama.chat(model="chatml", messages=MSG, options={"temperature": 0.1})
        await env.openai.chat.completions.create(
            model="chatml", messages=MSG, tool_choice="none", logit_bias={"1": 2}
        )
    warnings = [e for e in logs if e["event"] == "api.options_ignored"]
    assert [w["ignored"] for w in warnings] == [
        ["made_up", "mirostat", "tfs_z"],
        ["penalize_newline"],
        ["tool_choice", "logit_bias"],
    ]
    assert all(w["log_level"] == "warning" and w["model"] == "chatml" for w in warnings)


async def test_debug_render_only(env: Env) -> None:
    rendered = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    status, body, _ = await env.post(
        "/api/chat", {"model": "chatml", "messages": MSG, "_debug_render_only": True}
    )
    assert status == 200 and body["_debug_info"] == {
        "rendered_template": rendered,
        "image_count": 0,
    }
    assert body["done"] is False and body["message"] == {"role": "", "content": ""}
    status, body, _ = await env.post(
        "/api/generate", {"model": "chatml", "prompt": "Hi", "_debug_render_only": True}
    )
    assert status == 200 and body["_debug_info"]["rendered_template"] == rendered
    assert body["response"] == "" and body["done"] is False
    status, body, _ = await env.post(
        "/v1/chat/completions", {"model": "chatml", "messages": MSG, "_debug_render_only": True}
    )
    assert status == 200 and body["_debug_info"]["rendered_template"] == rendered
    assert env.runner.requests == [] and env.supervisor.acquired == []  # nothing ran


async def test_jinja_template_gets_the_models_bos_and_eos(env: Env, tmp_path) -> None:
    from tests.daemon.registry_server import make_gguf

    jinja = "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{{ eos_token }}{% endfor %}"
    path = make_gguf(tmp_path / "j.gguf", seed=9, chat_template=jinja)
    layer = await env.store.write_blob_bytes(path.read_bytes())
    await env.store.create("jinja", files={"j.gguf": layer.digest})  # no Go template
    await env.ollama.chat(model="jinja", messages=MSG)
    assert env.runner.requests[-1].prompt == "tok1[Hi]tok2"
