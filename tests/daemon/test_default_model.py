"""The embedded model's chat template renders Gemma's turn format (expected texts written by hand
from Gemma's documented format) and the import is idempotent."""

from __future__ import annotations

from corral.daemon.config import Config
from corral.daemon.default_model import GEMMA3_TEMPLATE, GEMMA3_PARAMETERS, ensure_default_model
from corral.daemon.store import Store
from corral.daemon.templates import GoTemplate


def render(messages: list[dict]) -> str:
    return GoTemplate(GEMMA3_TEMPLATE).render(messages)


def test_single_user_turn_opens_a_model_turn():
    assert render([{"role": "user", "content": "Hi"}]) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


def test_system_is_folded_into_the_first_user_turn_only():
    got = render([{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Why?"}])
    assert got == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                   "<start_of_turn>model\nHello!<end_of_turn>\n"
                   "<start_of_turn>user\nWhy?<end_of_turn>\n"
                   "<start_of_turn>model\n")


def test_stop_token_is_the_turn_end():
    assert GEMMA3_PARAMETERS["stop"] == ["<end_of_turn>"]


async def test_disabled_default_model_imports_nothing(tmp_path):
    store = Store(tmp_path)
    config = Config.from_env({"CORRAL_DEFAULT_MODEL": "", "OLLAMA_MODELS": str(tmp_path)})
    assert await ensure_default_model(store, config) is None
    assert not list(tmp_path.rglob("*"))
