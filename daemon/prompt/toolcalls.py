"""Tool calls in model output (Ollama's ``tools.Parser``): streamed text in, content and calls
out, keyed by the tool-call tag the model's template writes (``templates``)."""

from __future__ import annotations

import json as _json
from collections.abc import Sequence

# ---------------------------------------------------------------------------------------------
# Tool calls in model output
# ---------------------------------------------------------------------------------------------


class ToolCallParser:
    """Incremental tool-call extraction from streamed output (Ollama's ``tools.Parser``).

    Text before the tool-call tag is content. After the tag, each JSON object that names one of
    the request's tools becomes a call ``{"function": {"index", "name", "arguments"}}``. With the
    tag ``{`` (no tag in the template) only output that *starts* with JSON is considered; any
    other text switches parsing off. :meth:`add` returns ``(calls, content)`` for a chunk.
    """

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

    def add(self, s: str) -> tuple[list[dict], str]:
        if self.state == "done":
            return [], s
        self.buf += s
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
        buf = self.buf
        if not buf or not self.names:
            return None, 0
        for i in range(1, min(len(buf), self._longest) + 1):
            tail = buf[-i:]
            if any(len(tail) < len(n) and n.startswith(tail) for n in self.names):
                return None, 0
        found, start, end = None, -1, -1
        for n in self.names:
            pos = buf.find(n)
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
        args, i = _find_arguments(name, self.buf)
        if args is None:
            return None
        end = max(end, i)
        call = {"function": {"index": self.n, "name": name, "arguments": args}}
        self.n += 1
        self.buf = self.buf[end:]
        return call

    def _done(self) -> bool:
        if self.tag not in _CLOSERS:
            return False
        op, cl = self.tag, _CLOSERS[self.tag]
        count, in_str, esc = 0, False, False
        for c in self.buf:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = not in_str
            elif in_str:
                continue
            elif c == op:
                count += 1
            elif c == cl:
                count -= 1
                if count == 0:
                    return True
        return False


_CLOSERS = {"{": "}", "[": "]"}


def _find_arguments(name: str, buf: str) -> tuple[dict | None, int]:
    """The first balanced JSON object in ``buf`` holding the arguments for tool ``name``:
    ``{"name", "arguments"|"parameters"}``, ``{name: {...}}``, nested, or the object itself.
    Returns (arguments, index of its closing brace) or (None, 0)."""
    start, braces, in_str, esc = -1, 0, False, False
    for i, c in enumerate(buf):
        if esc:
            esc = False
            continue
        if c == "\\":
            esc = True
            continue
        if c == '"':
            in_str = not in_str
            continue
        if in_str:
            continue
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
    return None, 0


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
