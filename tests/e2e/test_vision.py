"""Vision end to end: the tiny model + tiny projector pair through ``corral serve`` with the real
``ollama`` and ``openai`` clients and the ``corral`` command (issue 10's acceptance).

The projector turns every image into IMAGE_TOKENS (16) embeddings, so counts are exact.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

import httpx
import ollama
import openai
import pytest

from corral.daemon import gguf_info
from tests.e2e.conftest import start_daemon
from tests.fixtures.tiny_gguf import write_tiny_llama
from tests.fixtures.tiny_vision import IMAGE_TOKENS, image_bytes, write_tiny_projector

pytestmark = pytest.mark.timeout(240)

PNG = image_bytes("PNG", seed=11)
OPTS = {"temperature": 0, "num_predict": 4}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision-gguf")
    return write_tiny_llama(tmp / "tiny.gguf", seed=3), write_tiny_projector(
        tmp / "mmproj.gguf", seed=3
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, files):
    with start_daemon(tmp_path_factory.mktemp("e2e-vision")) as d:
        model, projector = files
        with ollama.Client(host=d.url) as c:
            m, p = c.create_blob(model), c.create_blob(projector)
            # num_predict: the tiny model never ends on its own (the CLI sends no options)
            assert (
                c.create(
                    model="vis",
                    files={"tiny.gguf": m, "mmproj.gguf": p},
                    parameters={"num_predict": 4},
                ).status
                == "success"
            )
            assert c.create(model="txt", files={"tiny.gguf": m}).status == "success"
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    with ollama.Client(host=daemon.url) as c:
        yield c


def test_show_has_vision_and_projector_info_only_with_a_projector(client, daemon):
    vis, txt = client.show("vis"), client.show("txt")
    assert "vision" in vis.capabilities and "completion" in vis.capabilities
    assert "vision" not in txt.capabilities
    # the ollama client's ShowResponse has no projector_info field: read the JSON
    raw = {
        m: httpx.post(daemon.url + "/api/show", json={"model": m}).json() for m in ("vis", "txt")
    }
    assert raw["vis"]["projector_info"]["clip.projector_type"] == "mlp"
    assert raw["vis"]["projector_info"]["general.architecture"] == "clip"
    assert "projector_info" not in raw["txt"]
    # the projector is a projector layer of the manifest, and the Modelfile names it
    manifest = (daemon.models / "manifests/registry.ollama.ai/library/vis/latest").read_text()
    assert manifest.count("application/vnd.ollama.image.projector") == 1
    assert len(re.findall(r"^FROM ", vis.modelfile, re.M)) == 2


def test_generate_with_an_image_and_the_prompt_cache(client):
    plain = client.generate(model="vis", prompt="what is this", options=OPTS)
    first = client.generate(model="vis", prompt="what is this", images=[PNG], options=OPTS)
    assert first.response and first.eval_count == 4
    # the template puts the image's own user message first: its 16 cells plus the tag-less text
    assert first.prompt_eval_count >= plain.prompt_eval_count + IMAGE_TOKENS - 2
    again = client.generate(model="vis", prompt="what is this", images=[PNG], options=OPTS)
    assert again.prompt_eval_count == first.prompt_eval_count  # the whole prompt, as Ollama
    # image and text came from the slot's cache: all but the last token
    body = {"model": "vis", "prompt": "what is this", "stream": False, "options": OPTS}
    raw = httpx.post(
        client._client.base_url.join("/api/generate"),
        json={**body, "images": [base64.b64encode(PNG).decode()]},
        timeout=120,
    ).json()
    assert raw["prompt_eval_cached_count"] == raw["prompt_eval_count"] - 1
    other = client.generate(
        model="vis", prompt="what is this", images=[image_bytes("JPEG", seed=12)], options=OPTS
    )
    assert other.prompt_eval_count >= IMAGE_TOKENS


def test_chat_images_and_streaming(client):
    messages = [
        {
            "role": "user",
            "content": "compare [img] with this",
            "images": [PNG, image_bytes("WEBP", seed=13)],
        }
    ]
    parts = list(client.chat(model="vis", messages=messages, options=OPTS, stream=True))
    assert parts[-1].done and parts[-1].prompt_eval_count >= 2 * IMAGE_TOKENS
    assert "".join(p.message.content for p in parts)
    again = client.chat(model="vis", messages=messages, options=OPTS)
    assert again.prompt_eval_count == parts[-1].prompt_eval_count  # the whole prompt


def test_corrupt_image_and_text_model_are_400(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(
            model="vis", prompt="x", images=[b"GIF89a not really an image"], options=OPTS
        )
    assert err.value.status_code == 400
    assert (
        err.value.error
        == "Failed to create new sequence: failed to process inputs: image: unknown format"
    )
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="txt", messages=[{"role": "user", "content": "x", "images": [PNG]}])
    assert err.value.status_code == 400
    assert err.value.error == "registry.ollama.ai/library/txt:latest does not support vision"
    # the runner is still fine after a refused image
    assert client.generate(model="vis", prompt="fine", options=OPTS).eval_count == 4


def test_openai_image_url_parts(daemon):
    data = "data:image/png;base64," + base64.b64encode(PNG).decode()
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="corral") as oai:
        msgs = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "describe"},
                    {"type": "image_url", "image_url": {"url": data}},
                ],
            }
        ]
        r = oai.chat.completions.create(model="vis", messages=msgs, max_tokens=4, temperature=0)
        assert r.choices[0].message.content and r.usage.prompt_tokens >= IMAGE_TOKENS
        for url, text in [
            ("https://example.com/cat.png", "image URLs are not currently supported"),
            ("data:image/png;base64,not-base64!", "invalid image input"),
            (
                "data:image/png;base64," + base64.b64encode(b"junk").decode(),
                "image: unknown format",
            ),
        ]:
            with pytest.raises(openai.BadRequestError) as err:
                oai.chat.completions.create(
                    model="vis",
                    max_tokens=2,
                    messages=[
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": url}}],
                        }
                    ],
                )
            assert text in str(err.value)


def test_memory_estimate_counts_the_projector(client, files):
    client.generate(model="txt", prompt="hi", options=OPTS)
    client.generate(model="vis", prompt="hi", options=OPTS)
    # /api/ps shows what the runners measured (llama.cpp's log, in 0.01 MiB steps): the pair
    # holds the projector's weights and its encoder's compute buffer more than the text model
    sizes = {m.model: m.size for m in client.ps().models}
    weights = gguf_info.read_info(files[1]).tensor_bytes
    assert abs(sizes["vis:latest"] - sizes["txt:latest"] - weights) < 0.03 * (1 << 20)
    assert sizes["vis:latest"] - sizes["txt:latest"] > weights - 0.01 * (1 << 20)


def test_cli_run_reads_image_paths(daemon, tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(image_bytes("PNG", seed=14))
    env = {**os.environ, "OLLAMA_HOST": daemon.url.removeprefix("http://")}

    def run(prompt: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral.daemon.cli", "run", "vis", prompt, "--verbose"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    with_image, without = run(f"what is in {img} now"), run("what is in now")
    assert with_image.returncode == 0, with_image.stderr
    assert f"Added image '{img}'" in with_image.stdout + with_image.stderr

    def count(p: subprocess.CompletedProcess) -> int:
        return int(re.search(r"prompt eval count:\s+(\d+)", p.stderr).group(1))

    assert count(with_image) >= IMAGE_TOKENS
    assert count(without) < IMAGE_TOKENS


def test_cli_create_from_a_modelfile_with_the_projector(daemon, client, files, tmp_path):
    mf = tmp_path / "Modelfile"
    mf.write_text(f"FROM {files[0]}\nFROM {files[1]}\nPARAMETER num_predict 2\n")
    env = {**os.environ, "OLLAMA_HOST": daemon.url.removeprefix("http://")}
    done = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "create", "vis2", "-f", str(mf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "vision" in client.show("vis2").capabilities
    assert client.generate(model="vis2", prompt="x", images=[PNG]).prompt_eval_count >= IMAGE_TOKENS


def test_cli_show_has_a_projector_section(daemon):
    env = {**os.environ, "OLLAMA_HOST": daemon.url.removeprefix("http://")}
    out = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "show", "vis"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    section = out.split("  Projector\n")[1].split("\n\n")[0]
    assert section.splitlines() == [
        "    architecture        clip",
        "    parameters          18K",
        "    embedding length    32",
        "    dimensions          64",
    ]
    assert "    vision" in out.split("  Capabilities\n")[1].split("\n\n")[0]


def test_anthropic_image_blocks(daemon):
    import anthropic

    with anthropic.Anthropic(base_url=daemon.url, api_key="unused") as ant:
        fresh = image_bytes("PNG", seed=31)  # not in any slot's cache yet: its 16 cells are counted
        block = {
            "type": "image",
            "source": {
                "type": "base64",
                "media_type": "image/png",
                "data": base64.b64encode(fresh).decode(),
            },
        }
        msg = ant.messages.create(
            model="vis",
            max_tokens=4,
            messages=[{"role": "user", "content": [block, {"type": "text", "text": "what is it"}]}],
        )
        assert msg.content and msg.usage.input_tokens >= IMAGE_TOKENS
        bad = {**block, "source": {**block["source"], "data": base64.b64encode(b"junk").decode()}}
        with pytest.raises(anthropic.BadRequestError) as err:
            ant.messages.create(
                model="vis", max_tokens=2, messages=[{"role": "user", "content": [bad]}]
            )
        assert "image: unknown format" in str(err.value)
        with pytest.raises(anthropic.BadRequestError) as err:
            ant.messages.create(
                model="txt", max_tokens=2, messages=[{"role": "user", "content": [block]}]
            )
        assert "does not support vision" in str(err.value)


def test_debug_render_only_counts_the_images(daemon):
    """``_debug_render_only`` answers how many images the rendered prompt holds (Ollama's
    ``image_count``), for generate and chat, without running the model."""
    b64 = base64.b64encode(PNG).decode()
    gen = httpx.post(
        daemon.url + "/api/generate",
        json={
            "model": "vis",
            "prompt": "what is this",
            "images": [b64],
            "_debug_render_only": True,
        },
        timeout=60,
    ).json()
    assert gen["_debug_info"]["image_count"] == 1
    messages = [
        {"role": "user", "content": "two", "images": [b64, b64]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and one more", "images": [b64]},
    ]
    chat = httpx.post(
        daemon.url + "/api/chat",
        json={"model": "vis", "messages": messages, "_debug_render_only": True},
        timeout=60,
    ).json()
    assert chat["_debug_info"]["image_count"] == 3 and chat["done"] is False
    plain = httpx.post(
        daemon.url + "/api/chat",
        json={"model": "vis", "messages": messages[1:2], "_debug_render_only": True},
        timeout=60,
    ).json()
    assert plain["_debug_info"]["image_count"] == 0
