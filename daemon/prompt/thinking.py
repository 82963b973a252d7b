"""Thinking: what a request asks for (:class:`Think`) and the split of a model's output into
thinking and content at the template's tags (:class:`ThinkingSplitter`, Ollama 0.33's
``thinking.Parser``). Pure: no I/O; the api layer decides when thinking applies
(``api/chat.resolve_think``) and feeds the runner's text through the splitter.
"""

from __future__ import annotations

from typing import Literal, NamedTuple


class Think(NamedTuple):
    """A request's ``think``, as templates read it: ``enabled`` (``.Think``), ``level``
    (``.ThinkLevel``: "", high, medium, low, max) and ``is_set`` (``.IsThinkSet``: the request
    or the model's default set it)."""

    enabled: bool = False
    level: str = ""
    is_set: bool = False


NO_THINK = Think()

SplitState = Literal["looking", "opened", "thinking", "closed", "done"]


class ThinkingSplitter:
    """Splits model output into thinking and content at the template's thinking tags (Ollama's
    ``thinking.Parser`` states). Streaming-safe: text that may be the start of a tag split
    across chunks is held back until it is decided, and the whitespace after either tag is
    dropped also when it arrives in later chunks.

    States: ``looking`` (output so far is blank or a prefix of the opening tag), ``opened``
    (opening tag seen, only whitespace since), ``thinking``, ``closed`` (closing tag seen, only
    whitespace since), ``done`` (everything from here is content). When the prompt itself ends
    with the opening tag (most thinking templates), :meth:`add` is fed that tag first, so the
    model's output starts in ``opened``."""

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>") -> None:
        self.open, self.close = open_tag, close_tag
        self.state: SplitState = "looking"
        self.buf = ""

    @property
    def thinking_over(self) -> bool:
        return self.state in ("closed", "done")

    def add(self, s: str) -> tuple[str, str]:
        """-> (thinking, content) released by this chunk."""
        self.buf += s
        thinking: list[str] = []
        content: list[str] = []
        while True:
            if self.state == "looking":
                t = self.buf.lstrip()
                if t.startswith(self.open):
                    self.buf = t[len(self.open) :]
                    self.state = "opened"
                    continue
                if self.open.startswith(t):  # blank, or maybe the tag: wait for more
                    break
                content.append(self.buf)
                self.buf, self.state = "", "done"
            elif self.state == "opened":
                t = self.buf.lstrip()
                self.buf = t
                if not t:
                    break
                self.state = "thinking"
                continue
            elif self.state == "thinking":
                i = self.buf.find(self.close)
                if i >= 0:
                    thinking.append(self.buf[:i])
                    rest = self.buf[i + len(self.close) :].lstrip()
                    self.buf = ""
                    self.state = "done" if rest else "closed"
                    content.append(rest)
                    break
                keep = next(
                    (
                        k
                        for k in range(min(len(self.close) - 1, len(self.buf)), 0, -1)
                        if self.buf.endswith(self.close[:k])
                    ),
                    0,
                )
                thinking.append(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
            elif self.state == "closed":
                t, self.buf = self.buf.lstrip(), ""
                if t:
                    content.append(t)
                    self.state = "done"
            else:
                content.append(self.buf)
                self.buf = ""
            break
        return "".join(thinking), "".join(content)

    def flush(self) -> tuple[str, str]:
        """What is held back at the end of the output: a partial closing tag is thinking, a
        partial opening tag is content, whitespace after a tag is dropped."""
        buf, self.buf = self.buf, ""
        if self.state == "thinking":
            return buf, ""
        if self.state == "looking":
            return "", buf
        return "", ""
