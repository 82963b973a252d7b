"""The interactive session's requests and what it prints, against a scripted client that answers
as the daemon does for a thinking model (``message.thinking`` pieces, then content)."""

from __future__ import annotations

import argparse
import base64
from typing import Any

import pytest

from corral.daemon.cli import main as cli
from corral.daemon.cli.interactive import Session, read_message, think_value


class Scripted:
    """Records requests; streams the lines a thinking model's /api/chat or /api/generate gives."""

    def __init__(self, capabilities: list[str] | None = None) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.capabilities = capabilities or ["completion"]

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        self.requests.append((path, body))
        return {"capabilities": self.capabilities} if path == "/api/show" else {}

    async def stream(self, path: str, body: Any):
        self.requests.append((path, body))
        pieces = [("Let me", ""), (" think.", ""), ("", "The"), ("", " answer.")]
        for thinking, content in pieces:
            if path == "/api/chat":
                yield {
                    "message": {"role": "assistant", "content": content, "thinking": thinking},
                    "done": False,
                }
            else:
                yield {"response": content, "thinking": thinking, "done": False}
        yield {"done": True, "eval_count": 2, "eval_duration": 1000}


@pytest.mark.parametrize(
    "hide,shown",
    [
        (False, "Thinking...\nLet me think.\n...done thinking.\n\nThe answer.\n\n"),
        (True, "The answer.\n\n"),
    ],
)
async def test_chat_turn_prints_thinking_unless_hidden(capsys, hide, shown):
    c = Scripted()
    s = Session(c, "m", think=True, hide_thinking=hide, keepalive="5m")
    s._set(["parameter", "num_ctx 1024"])
    s._set(["system", "Be brief."])
    capsys.readouterr()
    await s.chat("hi")
    assert capsys.readouterr().out == shown
    path, body = c.requests[-1]
    assert path == "/api/chat" and body["think"] is True and body["keep_alive"] == "5m"
    assert body["options"] == {"num_ctx": 1024}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert s.messages[-1] == {
        "role": "assistant",
        "content": "The answer.",
        "thinking": "Let me think.",
    }


async def test_save_sends_the_session(capsys):
    c = Scripted()
    s = Session(c, "base:latest")
    s._set(["parameter", "stop <end> <eot>"])
    s._set(["parameter", "temperature 0.2"])
    s._set(["parameter", "num_ctx lots"])
    assert "Couldn't set parameter" in capsys.readouterr().out and "num_ctx" not in s.options
    s.messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "thinking": "t"},
    ]
    await s.command("/save mine")
    assert capsys.readouterr().out == "Created new model 'mine'\n"
    assert c.requests[-1] == (
        "/api/create",
        {
            "model": "mine",
            "from": "base:latest",
            "stream": False,
            "parameters": {"stop": ["<end>", "<eot>"], "temperature": 0.2},
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        },
    )


@pytest.mark.parametrize(
    "think,shown",
    [
        ("high", "Thinking...\nLet me think.\n...done thinking.\n\nThe answer.\n"),
        (None, "Thinking...\nLet me think.\n...done thinking.\n\nThe answer.\n"),
    ],
)
async def test_one_shot_think_flag(capsys, think, shown):
    c = Scripted()
    args = cli.build_parser().parse_args(
        ["run", "m", "hello"] + (["--think", think] if think else [])
    )
    await cli.cmd_run(c, args)  # type: ignore[arg-type]
    assert capsys.readouterr().out == shown
    body = c.requests[-1][1]
    assert body.get("think") == (think if think else None)


async def test_one_shot_hidethinking(capsys):
    c = Scripted()
    await cli.cmd_run(
        c,
        cli.build_parser().parse_args(  # type: ignore[arg-type]
            ["run", "m", "hello", "--think", "--hidethinking"]
        ),
    )
    assert capsys.readouterr().out == "The answer.\n"
    assert c.requests[-1][1]["think"] is True


async def test_multiline_input_joins_lines_and_drops_quotes():
    lines = iter(['"""first', "second", 'third"""'])

    async def ask(prompt: str) -> str:
        return next(lines)

    assert await read_message(ask) == "first\nsecond\nthird"
    lines = iter(['/set system """one', 'two"""'])
    assert await read_message(ask) == "/set system one\ntwo"
    lines = iter(['"""single"""'])
    assert await read_message(ask) == "single"


def test_think_values():
    assert [think_value(x) for x in (None, "true", "false", "high", "")] == [
        None,
        True,
        False,
        "high",
        True,
    ]
    assert isinstance(cli.build_parser().parse_args(["run", "m", "--think"]), argparse.Namespace)


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24  # the signature is what is checked


async def test_image_paths_become_images_for_a_vision_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(PNG)
    (tmp_path / "my dir").mkdir()
    (tmp_path / "my dir" / "dog.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 16)
    (tmp_path / "fake.png").write_text("not an image")
    c = Scripted()
    s = Session(c, "llava", vision=True)
    await s.chat("compare ./cat.png with ./my\\ dir/dog.jpg and ./fake.png")
    user = c.requests[-1][1]["messages"][-1]
    assert user["content"] == "compare with and ./fake.png"
    assert user["images"] == [
        base64.b64encode(PNG).decode(),
        base64.b64encode((tmp_path / "my dir" / "dog.jpg").read_bytes()).decode(),
    ]
    out = capsys.readouterr().out
    assert "Added image 'cat.png'" in out and "Added image 'my dir/dog.jpg'" in out

    plain = Session(c, "tiny")  # no vision: the text is sent as typed
    await plain.chat("what is ./cat.png")
    assert c.requests[-1][1]["messages"][-1] == {"role": "user", "content": "what is ./cat.png"}


async def test_one_shot_attaches_images_only_for_vision_models(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(PNG)
    for caps, images in (
        (["completion", "vision"], [base64.b64encode(PNG).decode()]),
        (["completion"], None),
    ):
        c = Scripted(caps)
        await cli.cmd_run(
            c,
            cli.build_parser().parse_args(  # type: ignore[arg-type]
                ["run", "m", "describe ./cat.png"]
            ),
        )
        body = c.requests[-1][1]
        assert body.get("images") == images
        assert body["prompt"] == ("describe" if images else "describe ./cat.png")
