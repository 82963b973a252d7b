"""Tool calls in model output (Ollama's ``tools.Parser``): streamed text in, content and calls
out, keyed by the tool-call tag the model's template writes (``templates``)."""

from __future__ import annotations

import json as _json
from collections.abc import Iterator, Sequence

# ---------------------------------------------------------------------------------------------
# Tool calls in model output
# ---------------------------------------------------------------------------------------------


class ToolCallParser:
    """Incremental tool-call extraction from streamed output (Ollama's ``tools.Parser``).

    Text before the tool-call tag is content. After the tag, each JSON object that names one of
    the request's tools becomes a call ``{"function": {"index", "name", "arguments"}}``. With the
    tag ``{`` (no tag in the template) only output that *starts* with JSON is considered; any
    other text switches parsing off. :meth:`add` returns ``(calls, content)`` for a chunk.

    Inside a call the buffer only grows until a call is taken off its front, so every scan of it
    (the tools' names, the arguments' braces, the closing bracket that ends the calls) resumes
    where the previous chunk left it: a chunk costs its own length, not the buffer's, and a call
    of n characters streamed token by token costs O(n), not O(n²). The results are those of
    scanning the whole buffer again for every chunk (``tests/daemon/test_templates.py`` runs
    both). ``scanned`` counts the characters the scans looked at.
    """

    _resume = True  # False: every chunk scans the buffer from its start (the tests' reference)

    def __init__(self, tag: str, tools: Sequence[dict]) -> None:
        self.tag = tag
        self.names = [
            n
            for n in ((t.get("function") or {}).get("name") for t in tools if isinstance(t, dict))
            if isinstance(n, str) and n
        ]
        self._longest = max(map(len, self.names), default=0)
        self.state = "looking"
        self.buf = ""
        self.n = 0
        self.scanned = 0
        self._reset_scans()

    def _reset_scans(self) -> None:
        """The buffer was replaced (not appended to): every scan starts again at its front."""
        # the tools' names: each one's first position in buf[: _named] (absent: not there)
        self._first: dict[str, int] = {}
        self._named = 0
        # the arguments' object: the walk, the open object's start and its depth
        self._args_walk = _JsonWalk()
        self._args_object = (-1, 0)
        # the bracket the tag opened: the walk, its depth, whether it closed
        self._close_walk = _JsonWalk()
        self._close_depth = 0
        self._closed = False

    def add(self, s: str) -> tuple[list[dict], str]:
        if self.state == "done":
            return [], s
        self.buf += s
        if not self._resume:
            self._reset_scans()
        content = ""
        if self.state == "looking":
            i, found = self._find_tag()
            if i < 0:
                content, self.buf = self.buf, ""
            else:
                content, self.buf = self.buf[:i], self.buf[i:]
            if self.tag in ("{", "[") and content.strip():
                self.state = "done"
                out, self.buf = content + self.buf, ""
                return [], out
            if not found:
                return [], content
            self.state = "calling"
            self._reset_scans()
        calls = []
        while (call := self._parse_call()) is not None:
            calls.append(call)
        if self._done():
            self.state = "done"
            content, self.buf = self.buf, ""
        return calls, content

    def flush(self) -> str:
        """Content left at the end of the output: the buffer when nothing was parsed and the
        tag is ``{``/``[`` (plain JSON output that named no tool)."""
        if self.n > 0 or self.tag not in ("{", "["):
            left = ""
        else:
            left = self.buf
        self.buf = ""
        return left

    def _find_tag(self) -> tuple[int, bool]:
        i = self.buf.find(self.tag)
        if i >= 0:
            return i, True
        for k in range(min(len(self.buf), len(self.tag)), 0, -1):
            if self.buf.endswith(self.tag[:k]):
                return len(self.buf) - k, False
        return -1, False

    def _find_tool(self) -> tuple[str | None, int]:
        """The tool named first in the buffer (the longest at the same place) and the end of its
        name; (None, 0) while the buffer ends with what may become a longer name."""
        buf = self.buf
        if not buf or not self.names:
            return None, 0
        for i in range(1, min(len(buf), self._longest) + 1):
            tail = buf[-i:]
            if any(len(tail) < len(n) and n.startswith(tail) for n in self.names):
                return None, 0
        first = self._first
        if self._named < len(buf):  # a name's first place never moves as the buffer grows
            for n in self.names:
                if n not in first:
                    pos = buf.find(n, max(0, self._named - len(n) + 1))
                    if pos >= 0:
                        first[n] = pos
            self.scanned += len(buf) - self._named
            self._named = len(buf)
        found, start, end = None, -1, -1
        for n in self.names:
            pos = first.get(n, -1)
            if pos < 0:
                continue
            if start != -1 and (pos > start or (pos == start and len(n) <= len(found or ""))):
                continue
            found, start, end = n, pos, pos + len(n)
        return found, end

    def _parse_call(self) -> dict | None:
        name, end = self._find_tool()
        if name is None:
            return None
        args, i = self._find_arguments(name)
        if args is None:
            return None
        end = max(end, i)
        call = {"function": {"index": self.n, "name": name, "arguments": args}}
        self.n += 1
        self.buf = self.buf[end:]
        self._reset_scans()
        return call

    def _find_arguments(self, name: str) -> tuple[dict | None, int]:
        """The first balanced JSON object in the buffer holding the arguments for tool
        ``name``: ``{"name", "arguments"|"parameters"}``, ``{name: {...}}``, nested, or the
        object itself. Returns (arguments, index of its closing brace) or (None, 0). Objects
        that are not JSON or not a JSON object are passed over once."""
        buf, walk = self.buf, self._args_walk
        start, braces = self._args_object
        self.scanned += len(buf) - walk.pos
        for i, c in walk.outside_strings(buf):
            if c == "{":
                if braces == 0:
                    start = i
                braces += 1
            elif c == "}":
                braces -= 1
                if braces == 0 and start != -1:
                    try:
                        data = _json.loads(buf[start : i + 1])
                    except ValueError:
                        start = -1
                        continue
                    if not isinstance(data, dict):
                        start = -1
                        continue
                    found, args = _find_object(name, data)
                    return (args if found else data), i
                braces = max(braces, 0)
        self._args_object = (start, braces)
        return None, 0

    def _done(self) -> bool:
        """Whether the bracket the tag opened (``{``/``[``) is closed: the calls are over."""
        if self.tag not in _CLOSERS:
            return False
        if self._closed:
            return True
        op, cl = self.tag, _CLOSERS[self.tag]
        buf, walk, depth = self.buf, self._close_walk, self._close_depth
        self.scanned += len(buf) - walk.pos
        for _, c in walk.outside_strings(buf):
            if c == op:
                depth += 1
            elif c == cl:
                depth -= 1
                if depth == 0:
                    self._closed = True
                    return True
        self._close_depth = depth
        return False


class _JsonWalk:
    """A walk over a growing JSON text that resumes where it stopped: which characters are
    outside strings (a backslash escapes the next character, in a string or not)."""

    __slots__ = ("pos", "in_str", "esc")

    def __init__(self) -> None:
        self.pos = 0  # the next character to look at
        self.in_str = False
        self.esc = False

    def outside_strings(self, text: str) -> Iterator[tuple[int, str]]:
        """(index, character) of the characters of ``text`` from :attr:`pos` on that are
        outside strings (quotes and escapes left out); the walk's state follows each one, so
        a caller may stop at any of them and go on later."""
        # the state is stored where a caller may stop (at a yield) and at the end, not per
        # character: a caller stops only at a character it was given
        in_str, esc = self.in_str, self.esc
        for i in range(self.pos, len(text)):
            c = text[i]
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = not in_str
            elif not in_str:
                self.pos, self.in_str, self.esc = i + 1, in_str, esc
                yield i, c
        self.pos, self.in_str, self.esc = len(text), in_str, esc


_CLOSERS = {"{": "}", "[": "]"}


def _find_object(name: str, obj: dict) -> tuple[bool, dict | None]:
    def find_map(key: str) -> dict | None:
        v = obj.get(key)
        if isinstance(v, dict):
            return v
        if isinstance(v, str):
            try:
                parsed = _json.loads(v)
            except ValueError:
                return None
            return parsed if isinstance(parsed, dict) else None
        return None

    if "name" in obj:
        for key in ("arguments", "parameters"):
            m = find_map(key)
            if m is not None:
                return True, m
        return True, None
    m = find_map(name)
    if m is not None:
        return True, m
    for v in obj.values():
        children = (
            [v]
            if isinstance(v, dict)
            else [x for x in v if isinstance(x, dict)]
            if isinstance(v, list)
            else []
        )
        for child in children:
            found, args = _find_object(name, child)
            if found:
                return True, args
    return False, None
