"""The daemon's side of vision models: facts and estimate with a projector, the scheduler key,
capabilities, image tags in prompts, Modelfiles with a projector."""

from __future__ import annotations

import os

import pytest

from corral.daemon import gguf_info
from corral.daemon.api.prepare import tag_images
from corral.daemon.model_inputs import facts_from_info, key_paths, model_key, projector_facts
from corral.daemon.models import modelfile
from corral.daemon.prompt import templates
from corral.scheduler import RunnerOptions
from corral.scheduler.estimate import estimate, projector_graph
from tests.fixtures.tiny_vision import IMAGE_SIZE, PATCH, V_EMBD, V_HEAD


def test_estimate_of_the_pair_exceeds_the_text_model_by_the_projector(tiny_gguf, tiny_projector):
    text = facts_from_info(gguf_info.read_info(tiny_gguf), os.path.getsize(tiny_gguf))
    proj = gguf_info.read_info(tiny_projector)
    pair = projector_facts(text, proj)
    opts = RunnerOptions(num_ctx=2048)
    a, b = estimate(text, opts), estimate(pair, opts)
    graph = projector_graph(IMAGE_SIZE, PATCH, V_EMBD, V_HEAD)
    assert proj.tensor_bytes > 70_000 and graph > 0
    assert b.cpu_bytes - a.cpu_bytes == proj.tensor_bytes + graph
    assert b.full_gpu_bytes - a.full_gpu_bytes == proj.tensor_bytes + graph
    assert pair.has_vision and not text.has_vision


class _Rec:
    def __init__(self, path: str, projectors: list[str]) -> None:
        self.model_path, self.projectors, self.name = path, projectors, "m"


def test_model_key_tells_the_pair_from_the_text_model():
    plain, pair = (
        model_key(_Rec("/b/sha256-a", [])),
        model_key(_Rec("/b/sha256-a", ["/b/sha256-p"])),
    )
    assert plain != pair
    assert key_paths(plain) == ("/b/sha256-a", None)
    assert key_paths(pair) == ("/b/sha256-a", "/b/sha256-p")


def test_vision_capability_only_with_a_projector(tiny_projector, tiny_gguf):
    info = gguf_info.read_info(tiny_gguf)
    assert "vision" not in templates.capabilities(info)
    assert "vision" in templates.capabilities(info, has_projector=True)
    assert gguf_info.read_info(tiny_projector).is_projector


@pytest.mark.gemma
def test_gemma3_270m_is_not_a_vision_model(gemma_gguf):
    caps = templates.capabilities(gguf_info.read_info(gemma_gguf))
    assert "vision" not in caps and "completion" in caps


def test_image_tags_follow_ollama():
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a [img] b", "images": ["AAAA", "AQID"]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "c", "images": ["BAUG"]},
    ]
    out, images = tag_images(msgs)
    assert [m["content"] for m in out] == ["s", "[img-1]a [img-0] b", "ok", "[img-2]c"]
    assert images == [b"\x00\x00\x00", b"\x01\x02\x03", b"\x04\x05\x06"]
    assert out[0] is msgs[0]


def test_modelfile_with_a_projector_round_trips(tmp_path):
    req = modelfile.parse(
        "FROM ./model.gguf\nFROM ./mmproj.gguf\nPARAMETER num_ctx 4096\n"
    ).create_request()
    assert req["from"] == ["./model.gguf", "./mmproj.gguf"]
    assert modelfile.parse("FROM ./model.gguf\n").create_request()["from"] == "./model.gguf"

    class Rec:
        name, model_path, projectors, adapters = "vis:latest", "/b/sha256-m", ["/b/sha256-p"], []
        template = system = None
        parameters: dict = {}
        license: list = []
        messages: list = []

    text = modelfile.render(Rec())  # type: ignore[arg-type]
    assert "FROM /b/sha256-m\nFROM /b/sha256-p\n" in text


def test_the_projector_blob_is_held_with_the_model():
    from types import SimpleNamespace

    from corral.daemon.supervisor import Supervisor

    calls: list[tuple[str, str]] = []
    store = SimpleNamespace(
        hold=lambda p: calls.append(("hold", str(p))),
        release=lambda p: calls.append(("release", str(p))),
    )
    sup = SimpleNamespace(store=store)
    key = model_key(_Rec("/b/sha256-a", ["/b/sha256-p"]))
    Supervisor._hold(sup, key)  # type: ignore[arg-type]
    Supervisor._release_blobs(sup, key)  # type: ignore[arg-type]
    assert calls == [
        ("hold", "/b/sha256-a"),
        ("hold", "/b/sha256-p"),
        ("release", "/b/sha256-a"),
        ("release", "/b/sha256-p"),
    ]
