"""Prompt rendering: Ollama's use of a Modelfile TEMPLATE, the GGUF Jinja chat template, and
what a template says about its model.

Three renderers, chosen by :func:`for_model` in this order (reference §7.2-7.3):

1. the Modelfile TEMPLATE (:class:`GoTemplate`), a Go ``text/template`` run by ``gotemplate``
   as Ollama's ``template.Execute`` does (modern ``.Messages`` templates, legacy per-turn
   ``.System/.Prompt/.Response`` templates, fill-in-the-middle), request data turned into the Go
   values Ollama's ``api`` structs are;
2. the GGUF's ``tokenizer.chat_template`` (:class:`JinjaTemplate`, a sandboxed jinja2 environment);
3. ``{{ .Prompt }}``.

Also what a template tells about its model: tools, insert, the tool-call tag and the thinking tags
(Ollama's ``InferTags``); the capabilities are computed from these in ``gguf_info``. Parsing the
model's output for tool calls is ``toolcalls``. Every failure to parse or execute is a
:class:`TemplateError` whose text names the template line, in Go's format
(``template: :3: ...``). Rendering is pure and never blocks on I/O.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json as _json
import re
from collections.abc import Sequence
from typing import Any

from corral.daemon.gguf_info import GGUFInfo
from corral.daemon.prompt.gotemplate import (
    Action,
    Branch,
    Chain,
    Cmd,
    Exec,
    Field,
    GoList,
    GoMap,
    GoStruct,
    Parser,
    Pipe,
    PropertyType,
    TemplateError,
    Text,
    identifiers,
    lex,
)

__all__ = [
    "GoTemplate",
    "JinjaTemplate",
    "TemplateError",
    "for_model",
    "go_template",
    "DEFAULT_TEMPLATE",
]


# ---------------------------------------------------------------------------------------------
# Values: request data as Ollama's api structs look to a Go template
# ---------------------------------------------------------------------------------------------


def _struct(
    type_name: str,
    spec: Sequence[tuple[str, str, bool]],
    values: dict[str, Any],
    stringer: bool = False,
) -> GoStruct:
    return GoStruct(
        type_name,
        {go: values.get(go) for go, _, _ in spec},
        {go: (js, omit) for go, js, omit in spec},
        stringer,
    )


_MESSAGE = (
    ("Role", "role", False),
    ("Content", "content", False),
    ("Thinking", "thinking", True),
    ("Images", "images", True),
    ("ToolCalls", "tool_calls", True),
    ("ToolName", "tool_name", True),
    ("ToolCallID", "tool_call_id", True),
)


_TOOL_CALL = (("ID", "ID", False), ("Function", "Function", False))


_TOOL_CALL_FUNCTION = (
    ("Index", "Index", False),
    ("Name", "Name", False),
    ("Arguments", "Arguments", False),
)


_TOOL = (("Type", "type", False), ("Items", "items", True), ("Function", "function", False))


_TOOL_FUNCTION = (
    ("Name", "name", False),
    ("Description", "description", True),
    ("Parameters", "parameters", False),
)


_TOOL_PARAMETERS = (
    ("Type", "type", False),
    ("Defs", "$defs", True),
    ("Items", "items", True),
    ("Required", "required", True),
    ("Properties", "properties", False),
)


_TOOL_PROPERTY = (
    ("AnyOf", "anyOf", True),
    ("Type", "type", True),
    ("Items", "items", True),
    ("Description", "description", True),
    ("Enum", "enum", True),
    ("Properties", "properties", True),
    ("Required", "required", True),
)


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _obj(v: Any) -> dict[str, Any]:
    """A JSON object as it is, anything else as an empty one (Go decodes it into a struct)."""
    return v if isinstance(v, dict) else {}


def _property(p: Any) -> GoStruct:
    p = p if isinstance(p, dict) else {}
    t = p.get("type")
    types = PropertyType(
        [t] if isinstance(t, str) else [x for x in (t or []) if isinstance(x, str)]
    )
    props = p.get("properties")
    return _struct(
        "api.ToolProperty",
        _TOOL_PROPERTY,
        {
            "AnyOf": [_property(x) for x in p.get("anyOf") or []] or None,
            "Type": types or None,
            "Items": p.get("items"),
            "Description": _str(p.get("description")),
            "Enum": p.get("enum") or None,
            "Properties": GoMap({k: _property(v) for k, v in props.items()})
            if isinstance(props, dict)
            else None,
            "Required": p.get("required") or None,
        },
    )


def tool_value(tool: dict) -> GoStruct:
    """One request tool (``{"type", "function": {...}}``) as Ollama's template sees it: Go decodes
    into ``api.Tool``, so keys outside its fields are dropped."""
    fn = _obj(tool.get("function"))
    params = _obj(fn.get("parameters"))
    props = params.get("properties")
    parameters = _struct(
        "api.ToolFunctionParameters",
        _TOOL_PARAMETERS,
        {
            "Type": _str(params.get("type")),
            "Defs": params.get("$defs"),
            "Items": params.get("items"),
            "Required": params.get("required") or None,
            "Properties": GoMap({k: _property(v) for k, v in props.items()})
            if isinstance(props, dict)
            else None,
        },
        stringer=True,
    )
    function = _struct(
        "api.ToolFunction",
        _TOOL_FUNCTION,
        {
            "Name": _str(fn.get("name")),
            "Description": _str(fn.get("description")),
            "Parameters": parameters,
        },
        stringer=True,
    )
    return _struct(
        "api.Tool",
        _TOOL,
        {"Type": _str(tool.get("type")), "Items": tool.get("items"), "Function": function},
        stringer=True,
    )


def _tool_call_value(call: dict, index: int) -> GoStruct:
    fn = _obj(call.get("function"))
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = _json.loads(args)
        except ValueError:
            args = {}
    fn_index = fn.get("index")
    return _struct(
        "api.ToolCall",
        _TOOL_CALL,
        {
            "ID": _str(call.get("id")),
            "Function": _struct(
                "api.ToolCallFunction",
                _TOOL_CALL_FUNCTION,
                {
                    "Index": fn_index if isinstance(fn_index, int) else index,
                    "Name": _str(fn.get("name")),
                    "Arguments": GoMap(args if isinstance(args, dict) else {}),
                },
            ),
        },
    )


def message_value(m: dict) -> GoStruct:
    """One chat message (request JSON) as Ollama's template sees it."""
    calls = m.get("tool_calls") or []
    return _struct(
        "api.Message",
        _MESSAGE,
        {
            "Role": _str(m.get("role")),
            "Content": _str(m.get("content")),
            "Thinking": _str(m.get("thinking")),
            "Images": list(m.get("images") or []) or None,
            "ToolCalls": [
                _tool_call_value(c, i) for i, c in enumerate(calls) if isinstance(c, dict)
            ]
            or None,
            "ToolName": _str(m.get("tool_name")),
            "ToolCallID": _str(m.get("tool_call_id")),
        },
    )


def _cut_after_response(nodes: list[Any]) -> list[Any]:
    """Ollama's legacy last turn: keep everything up to and including the first ``.Response``
    field and drop the rest, so generation continues right after it (``deleteNode``)."""
    cut = False

    def pipe(p: Pipe) -> Pipe | None:
        nonlocal cut
        cmds = []
        for c in p.cmds:
            args = []
            for a in c.args:
                if cut:
                    continue
                if isinstance(a, Field) and "Response" in a.idents:
                    cut = True
                elif isinstance(a, Chain):
                    inner = pipe(a.node)
                    if inner is None:
                        continue
                    a = Chain(inner, a.idents)
                args.append(a)
            if not args:
                return None
            cmds.append(Cmd(args))
        return Pipe(p.line, p.decl, p.assign, cmds) if cmds else None

    def walk(ns: list[Any]) -> list[Any]:
        out: list[Any] = []
        for n in ns:
            if cut:
                break
            if isinstance(n, Action):
                p = pipe(n.pipe)
                if p is not None:
                    out.append(Action(p))
            elif isinstance(n, Branch):
                body = walk(n.body)
                orelse = (
                    walk(n.orelse)
                    if n.orelse is not None and not cut
                    else ([] if n.orelse is not None else None)
                )
                out.append(Branch(n.kind, n.pipe, body, orelse))
            else:
                out.append(n)
        return out

    return walk(nodes)


def _tool_call_tag(nodes: list[Any]) -> str:
    """The text a model writes before a tool call, taken from the template as Ollama does
    (``tools.parseTag``): the first non-blank text inside the ``if`` that tests ``.ToolCalls``,
    cut before any ``{``; ``"{"`` when there is none (then any leading JSON object is tried)."""

    def is_tool_calls(b: Branch) -> bool:
        return b.kind == "if" and any(
            isinstance(a, Field) and "ToolCalls" in a.idents for c in b.pipe.cmds for a in c.args
        )

    def find_if(ns: list[Any]) -> Branch | None:
        for n in ns:
            if isinstance(n, Branch):
                if is_tool_calls(n):
                    return n
                for sub in (n.body, n.orelse or []):
                    r = find_if(sub)
                    if r is not None:
                        return r
        return None

    def find_text(ns: list[Any]) -> str | None:
        for n in ns:
            if isinstance(n, Text):
                if n.text.strip():
                    return n.text
            elif isinstance(n, Branch):
                for sub in (n.body, n.orelse or []):
                    r = find_text(sub)
                    if r is not None:
                        return r
                return None
        return None

    node = find_if(nodes)
    text = find_text(node.body) if node is not None else None
    if text is None:
        return "{"
    tag = text.replace("\r\n", "\n").split("{", 1)[0].strip()
    return tag or "{"


def _think_tags(nodes: list[Any]) -> tuple[str, str]:
    """The tags a Go template writes around a message's thinking (Ollama's ``InferTags``): for
    each ``.Thinking`` field used inside a ``range`` over ``.Messages``, the list (template body
    or branch body) that most closely holds it gives the opening tag (its first node, if text)
    and the closing tag (its last node, if text), whitespace trimmed; later uses overwrite
    earlier ones. ``("", "")`` when the template never writes a message's thinking."""
    tags = ["", ""]

    def uses(p: Pipe, name: str) -> bool:
        return any(isinstance(a, Field) and a.idents[:1] == (name,) for c in p.cmds for a in c.args)

    def found(ns: list[Any]) -> None:
        if ns and isinstance(ns[0], Text):
            tags[0] = ns[0].text.strip()
        if ns and isinstance(ns[-1], Text):
            tags[1] = ns[-1].text.strip()

    def walk(ns: list[Any], in_messages: bool) -> None:
        for n in ns:
            if isinstance(n, Action):
                if in_messages and uses(n.pipe, "Thinking"):
                    found(ns)
            elif isinstance(n, Branch):
                inner = uses(n.pipe, "Messages") if n.kind == "range" else in_messages
                if in_messages and uses(n.pipe, "Thinking"):
                    found(ns)  # a field in the branch's own pipeline
                walk(n.body, inner)
                if n.orelse is not None:
                    walk(n.orelse, inner)

    walk(nodes, False)
    return tags[0], tags[1]


# Reasoning tag pairs a GGUF Jinja chat template can write (Ollama's closed table): a pair
# counts only when the template text contains both halves; the first such pair wins.
_JINJA_THINK_TAGS = (
    ("<think>", "</think>"),
    ("<|channel>", "<channel|>"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
    ("<seed:think>", "</seed:think>"),
)


def jinja_think_tags(text: str) -> tuple[str, str]:
    """The thinking tags of a Jinja chat template: a pair from the table whose both halves it
    contains, else a pair whose closing tag it splits assistant content at (Qwen/DeepSeek
    templates strip earlier reasoning with ``content.split('</think>')`` without writing the
    opening tag), else ``("", "")``."""
    for open_tag, close_tag in _JINJA_THINK_TAGS:
        if open_tag in text and close_tag in text:
            return open_tag, close_tag
    for open_tag, close_tag in _JINJA_THINK_TAGS:
        if f"content.split('{close_tag}')" in text or f'content.split("{close_tag}")' in text:
            return open_tag, close_tag
    return "", ""


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------


def collate(messages: Sequence[dict]) -> tuple[str, list[dict]]:
    """Ollama's ``collate``: all system texts joined by a blank line, and consecutive messages of
    the same role (except ``tool``) merged with ``\\n\\n``."""
    system: list[str] = []
    out: list[dict] = []
    for m in messages:
        role = m.get("role") or ""
        content = m.get("content") or ""
        if role == "system":
            system.append(content)
        if out and out[-1].get("role") == role and role != "tool":
            out[-1] = {**out[-1], "content": (out[-1].get("content") or "") + "\n\n" + content}
        else:
            out.append(dict(m))
    return "\n\n".join(system), out


class GoTemplate:
    """A parsed Modelfile TEMPLATE. Parsing raises :class:`TemplateError` (``template: :N:
    ...``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.nodes = Parser(lex(text)).parse()
        self.vars = frozenset(identifiers(self.nodes))
        if "messages" not in self.vars and "response" not in self.vars:
            # Ollama appends {{ .Response }} to templates without one
            self.nodes = [*self.nodes, Action(Pipe(0, [], False, [Cmd([Field(("Response",))])]))]
        self._tag: str | None = None
        self._think: tuple[str, str] | None = None

    @property
    def uses_messages(self) -> bool:
        return "messages" in self.vars

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.vars

    @property
    def supports_insert(self) -> bool:
        return "suffix" in self.vars

    def tool_call_tag(self) -> str:
        if self._tag is None:
            self._tag = _tool_call_tag(self.nodes)
        return self._tag

    def think_tags(self) -> tuple[str, str]:
        """(opening, closing) thinking tags inferred from the template; ("", "") if none."""
        if self._think is None:
            self._think = _think_tags(self.nodes)
        return self._think

    def execute(self, data: dict[str, Any], nodes: list[Any] | None = None) -> str:
        """Execute with ``data`` as dot (``missingkey=zero``: absent keys are nil)."""
        ex = Exec(data)
        try:
            ex.run(self.nodes if nodes is None else nodes, data)
        except RecursionError:
            raise TemplateError('template: : executing "": too deeply nested') from None
        return "".join(ex.out)

    def render(
        self,
        messages: Sequence[dict] = (),
        tools: Sequence[dict] | None = None,
        *,
        prompt: str = "",
        suffix: str = "",
        think: bool = False,
        think_level: str = "",
        is_think_set: bool = False,
    ) -> str:
        """Ollama's ``Template.Execute``: fill-in-the-middle when both ``prompt`` and ``suffix``
        are set; else the ``.Messages`` form when the template uses it; else legacy per-turn."""
        think_vars = {"Think": think, "ThinkLevel": think_level, "IsThinkSet": is_think_set}
        if prompt and suffix:
            return self.execute({"Prompt": prompt, "Suffix": suffix, "Response": "", **think_vars})
        system, msgs = collate(messages)
        if self.uses_messages:
            return self.execute(
                {
                    "System": system,
                    "Messages": [message_value(m) for m in msgs],
                    "Tools": GoList(tool_value(t) for t in tools) if tools else None,
                    "Response": "",
                    **think_vars,
                }
            )
        # legacy: one execution per (system?, user, assistant) group, the last cut after .Response
        out: list[str] = []
        state = {"System": "", "Prompt": "", "Response": ""}

        def flush() -> None:
            out.append(self.execute({**state, **think_vars}))
            state.update(System="", Prompt="", Response="")

        for m in msgs:
            role, content = m.get("role"), m.get("content") or ""
            if role == "system":
                if state["Prompt"] or state["Response"]:
                    flush()
                state["System"] = content
            elif role == "user":
                if state["Response"]:
                    flush()
                state["Prompt"] = content
            elif role == "assistant":
                state["Response"] = content
        out.append(self.execute({**state, **think_vars}, self._last_turn))
        return "".join(out)

    @functools.cached_property
    def _last_turn(self) -> list[Any]:
        """The legacy last turn's nodes (cut after ``.Response``): the tree never changes, so
        the cut is made once per template, not once per request."""
        return _cut_after_response(self.nodes)


DEFAULT_TEMPLATE = "{{ .Prompt }}"


class JinjaTemplate:
    """A GGUF ``tokenizer.chat_template`` rendered as Hugging Face does (sandboxed jinja2,
    ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson`` without HTML escaping)."""

    supports_insert = False
    uses_messages = True

    def __init__(self, text: str, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(f"chat template: {message}")

        def tojson(
            v: Any,
            indent: int | None = None,
            ensure_ascii: bool = False,
            separators: Any = None,
            sort_keys: bool = False,
        ) -> str:
            return _json.dumps(
                v,
                indent=indent,
                ensure_ascii=ensure_ascii,
                separators=separators,
                sort_keys=sort_keys,
            )

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
        self.text = text
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._tmpl = env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template: line {e.lineno}: {e.message}") from None
        self.supports_tools = "tools" in text

    def think_tags(self) -> tuple[str, str]:
        return jinja_think_tags(self.text)

    def tool_call_tag(self) -> str:
        m = re.search(r"<tool_call>|\[TOOL_CALLS\]|<\|python_tag\|>", self.text)
        return m.group() if m else "{"

    def render(
        self,
        messages: Sequence[dict] = (),
        tools: Sequence[dict] | None = None,
        *,
        prompt: str = "",
        suffix: str = "",
        think: bool = False,
        think_level: str = "",
        is_think_set: bool = False,
    ) -> str:
        import jinja2

        msgs = []
        for m in messages:
            m = dict(m)
            calls = m.get("tool_calls")
            if calls:
                m["tool_calls"] = [
                    {
                        **c,
                        "type": "function",
                        "function": {
                            **c.get("function", {}),
                            "arguments": c.get("function", {}).get("arguments") or {},
                        },
                    }
                    for c in calls
                ]
            msgs.append(m)
        kwargs: dict[str, Any] = {
            "messages": msgs,
            "add_generation_prompt": True,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools:
            kwargs["tools"] = list(tools)
        if is_think_set:
            kwargs["enable_thinking"] = think
        try:
            return self._tmpl.render(**kwargs)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            line = getattr(e, "lineno", None)
            where = f"line {line}: " if line else ""
            raise TemplateError(f"chat template: {where}{e}") from None
        except Exception as e:  # a template bug (e.g. indexing an empty list): still a 500 text
            raise TemplateError(f"chat template: {type(e).__name__}: {e}") from None


Renderer = GoTemplate | JinjaTemplate


@functools.lru_cache(maxsize=64)
def go_template(text: str) -> GoTemplate:
    """``GoTemplate(text)``, cached by text: a renderer never changes once built, and a library
    template takes ~0.3 ms to parse (every request needs its model's). Raises TemplateError."""
    return GoTemplate(text)


@functools.lru_cache(maxsize=16)
def _jinja_template(text: str, bos_token: str, eos_token: str) -> JinjaTemplate:
    return JinjaTemplate(text, bos_token, eos_token)  # compiling one takes milliseconds


def for_model(
    template: str | None,
    chat_template: str | None = None,
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> Renderer:
    """The renderer for a model: its Go TEMPLATE, else the GGUF Jinja template, else
    ``{{ .Prompt }}``. Renderers are shared (cached by their text): never modify one."""
    if template:
        return go_template(template)
    if chat_template:
        return _jinja_template(chat_template, bos_token, eos_token)
    return go_template(DEFAULT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# Capabilities: what the templates (and the GGUF) say a model can do
# ---------------------------------------------------------------------------------------------


def capabilities(
    info: GGUFInfo | None,
    *,
    template: str | None = None,
    has_projector: bool = False,
    declared: list[str] | None = None,
) -> list[str]:
    """Ollama's capability list for a model.

    ``template`` is the Go TEMPLATE layer (None when the model has none; then the GGUF's jinja
    chat template is inspected). ``declared`` are capabilities listed in the config blob.
    """
    caps: list[str] = []
    if info is not None and info.is_embedding:
        caps.append("embedding")
    else:
        caps.append("completion")
    if template is not None:
        names = _template_vars(template)
        if "tools" in names:
            caps.append("tools")
        if "suffix" in names:
            caps.append("insert")
        if all(_go_think_tags(template)):
            caps.append("thinking")
    elif info is not None and info.chat_template:
        jt = info.chat_template
        if "tools" in jt or "tool_call" in jt:
            caps.append("tools")
        if all(jinja_think_tags(jt)):
            caps.append("thinking")
    if has_projector:  # images need the projector (llama.cpp's mmproj)
        caps.append("vision")
    for cap in declared or ():
        if cap not in caps:
            caps.append(cap)
    order = ["completion", "tools", "insert", "vision", "embedding", "thinking"]
    return sorted(caps, key=lambda c: order.index(c) if c in order else len(order))


def _go_think_tags(template: str) -> tuple[str, str]:
    """The thinking tags Ollama's ``InferTags`` finds in a Go template ("" when it cannot
    parse): a model thinks when the template writes a message's thinking between two tags."""
    try:
        return go_template(template).think_tags()
    except TemplateError:
        return "", ""


def _template_vars(template: str) -> frozenset[str]:
    """Lower-cased identifiers a Go template uses (Ollama's ``Template.Vars``); a template the
    parser rejects falls back to a plain text scan."""
    try:
        return go_template(template).vars
    except TemplateError:
        return frozenset(m.lower() for m in re.findall(r"\.([A-Za-z_]\w*)", template))
