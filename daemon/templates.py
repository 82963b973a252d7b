"""Prompt templates: Ollama's Go-template dialect, the GGUF Jinja chat template, and tool-call parsing.

Three renderers, chosen by :func:`for_model` in this order (reference §7.2-7.3):

1. the Modelfile TEMPLATE, a Go ``text/template`` (:class:`GoTemplate`): a small tokenizer, parser and
   evaluator for the subset Ollama's library templates use, with Go's truthiness, ``fmt`` printing and
   ``encoding/json`` output, executed as Ollama's ``template.Execute`` does (modern ``.Messages``
   templates, legacy per-turn ``.System/.Prompt/.Response`` templates, fill-in-the-middle);
2. the GGUF's ``tokenizer.chat_template`` (:class:`JinjaTemplate`, a sandboxed jinja2 environment);
3. ``{{ .Prompt }}``.

Every failure to parse or execute is a :class:`TemplateError` whose text names the template line,
in Go's format (``template: :3: ...``). Rendering is pure and never blocks on I/O.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json as _json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

__all__ = [
    "GoTemplate", "JinjaTemplate", "TemplateError", "ToolCallParser", "for_model", "go_json",
    "go_template", "DEFAULT_TEMPLATE",
]


class TemplateError(Exception):
    """A template that does not parse or does not execute; the text carries the line number."""


# ---------------------------------------------------------------------------------------------
# Values: how request data looks to a Go template
# ---------------------------------------------------------------------------------------------

class GoMap(dict):
    """A Go ``map[string]T`` whose type has ``String() = json.Marshal`` (tool-call arguments, tool
    properties): printing gives JSON; ranging and JSON use sorted keys like every Go map."""


class GoList(list):
    """A Go slice whose type has ``String() = json.Marshal`` (``.Tools``)."""


@dataclass(slots=True)
class GoStruct:
    """A Go struct value. ``fields`` maps Go field names to values in declaration order; ``tags``
    gives each field's JSON name and omitempty flag; ``stringer`` marks types whose ``String()``
    is their JSON (printing then gives JSON instead of fmt's ``{a b}``)."""

    type_name: str
    fields: dict[str, Any]
    tags: dict[str, tuple[str, bool]] = field(default_factory=dict)
    stringer: bool = False


class _Bytes(bytes):
    """``[]byte`` (an image): JSON is base64, printing is ``[1 2 3]``."""


def _struct(type_name: str, spec: Sequence[tuple[str, str, bool]], values: dict[str, Any],
            stringer: bool = False) -> GoStruct:
    return GoStruct(type_name, {go: values.get(go) for go, _, _ in spec},
                    {go: (js, omit) for go, js, omit in spec}, stringer)


_MESSAGE = (("Role", "role", False), ("Content", "content", False), ("Thinking", "thinking", True),
            ("Images", "images", True), ("ToolCalls", "tool_calls", True),
            ("ToolName", "tool_name", True), ("ToolCallID", "tool_call_id", True))
_TOOL_CALL = (("ID", "ID", False), ("Function", "Function", False))
_TOOL_CALL_FUNCTION = (("Index", "Index", False), ("Name", "Name", False),
                       ("Arguments", "Arguments", False))
_TOOL = (("Type", "type", False), ("Items", "items", True), ("Function", "function", False))
_TOOL_FUNCTION = (("Name", "name", False), ("Description", "description", True),
                  ("Parameters", "parameters", False))
_TOOL_PARAMETERS = (("Type", "type", False), ("Defs", "$defs", True), ("Items", "items", True),
                    ("Required", "required", True), ("Properties", "properties", False))
_TOOL_PROPERTY = (("AnyOf", "anyOf", True), ("Type", "type", True), ("Items", "items", True),
                  ("Description", "description", True), ("Enum", "enum", True),
                  ("Properties", "properties", True), ("Required", "required", True))


class _PropertyType(list):
    """``api.PropertyType``: JSON is a string when there is one type; printing likewise."""


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _property(p: Any) -> GoStruct:
    p = p if isinstance(p, dict) else {}
    t = p.get("type")
    types = _PropertyType([t] if isinstance(t, str) else [x for x in (t or []) if isinstance(x, str)])
    props = p.get("properties")
    return _struct("api.ToolProperty", _TOOL_PROPERTY, {
        "AnyOf": [_property(x) for x in p.get("anyOf") or []] or None,
        "Type": types or None,
        "Items": p.get("items"),
        "Description": _str(p.get("description")),
        "Enum": p.get("enum") or None,
        "Properties": GoMap({k: _property(v) for k, v in props.items()})
        if isinstance(props, dict) else None,
        "Required": p.get("required") or None,
    })


def tool_value(tool: dict) -> GoStruct:
    """One request tool (``{"type", "function": {...}}``) as Ollama's template sees it: Go decodes
    into ``api.Tool``, so keys outside its fields are dropped."""
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else {}
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    props = params.get("properties")
    parameters = _struct("api.ToolFunctionParameters", _TOOL_PARAMETERS, {
        "Type": _str(params.get("type")), "Defs": params.get("$defs"), "Items": params.get("items"),
        "Required": params.get("required") or None,
        "Properties": GoMap({k: _property(v) for k, v in props.items()})
        if isinstance(props, dict) else None,
    }, stringer=True)
    function = _struct("api.ToolFunction", _TOOL_FUNCTION, {
        "Name": _str(fn.get("name")), "Description": _str(fn.get("description")),
        "Parameters": parameters}, stringer=True)
    return _struct("api.Tool", _TOOL, {"Type": _str(tool.get("type")), "Items": tool.get("items"),
                                        "Function": function}, stringer=True)


def _tool_call_value(call: dict, index: int) -> GoStruct:
    fn = call.get("function") if isinstance(call.get("function"), dict) else {}
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = _json.loads(args)
        except ValueError:
            args = {}
    fn_index = fn.get("index")
    return _struct("api.ToolCall", _TOOL_CALL, {
        "ID": _str(call.get("id")),
        "Function": _struct("api.ToolCallFunction", _TOOL_CALL_FUNCTION, {
            "Index": fn_index if isinstance(fn_index, int) else index, "Name": _str(fn.get("name")),
            "Arguments": GoMap(args if isinstance(args, dict) else {})}),
    })


def message_value(m: dict) -> GoStruct:
    """One chat message (request JSON) as Ollama's template sees it."""
    calls = m.get("tool_calls") or []
    return _struct("api.Message", _MESSAGE, {
        "Role": _str(m.get("role")), "Content": _str(m.get("content")),
        "Thinking": _str(m.get("thinking")),
        "Images": list(m.get("images") or []) or None,
        "ToolCalls": [_tool_call_value(c, i) for i, c in enumerate(calls) if isinstance(c, dict)]
        or None,
        "ToolName": _str(m.get("tool_name")), "ToolCallID": _str(m.get("tool_call_id")),
    })


# ---------------------------------------------------------------------------------------------
# Go's encoding/json and fmt
# ---------------------------------------------------------------------------------------------

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
                 "\u2029": "\\u2029"}
_JSON_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")


def _json_str(s: str) -> str:
    out = _json.dumps(s, ensure_ascii=False)
    return _JSON_ESCAPE_RE.sub(lambda m: _JSON_ESCAPES[m.group()], out)


def _json_float(f: float) -> str:
    if f != f or f in (float("inf"), float("-inf")):
        raise TemplateError(f"json: unsupported value: {f}")
    a = abs(f)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        s = repr(f)
        return re.sub(r"e-0(\d)$", r"e-\1", s)
    if f == int(f):
        return str(int(f))
    return format(Decimal(repr(f)), "f")


def go_json(v: Any) -> str:
    """``json.Marshal(v)`` as Go writes it: compact, sorted map keys, HTML-safe escapes."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _json_float(v)
    if isinstance(v, str):
        return _json_str(v)
    if isinstance(v, _Bytes):
        import base64
        return '"' + base64.b64encode(v).decode() + '"'
    if isinstance(v, GoStruct):
        parts = []
        for go, value in v.fields.items():
            name, omit = v.tags.get(go, (go, False))
            if omit and not _truth(value):
                continue
            parts.append(_json_str(name) + ":" + go_json(value))
        return "{" + ",".join(parts) + "}"
    if isinstance(v, _PropertyType):
        return go_json(v[0]) if len(v) == 1 else "[" + ",".join(go_json(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(_json_str(str(k)) + ":" + go_json(v[k])
                              for k in sorted(v, key=str)) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(go_json(x) for x in v) + "]"
    raise TemplateError(f"json: unsupported type: {type(v).__name__}")


def _fmt_float(f: float) -> str:
    """fmt's ``%v`` for float64: strconv 'g', shortest digits, exponent form when the decimal
    exponent is < -4 or >= 6 (``1e+06``)."""
    if f != f:
        return "NaN"
    if f in (float("inf"), float("-inf")):
        return "+Inf" if f > 0 else "-Inf"
    if f == 0:
        return "0"
    d = Decimal(repr(f)).normalize()
    exp = d.adjusted()
    if -4 <= exp < 6:
        return format(d, "f")
    sign, digits, _ = d.as_tuple()
    mant = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    return ("-" if sign else "") + mant + "e" + ("-" if exp < 0 else "+") + f"{abs(exp):02d}"


def go_print(v: Any) -> str:
    """``fmt.Sprint(v)`` for one value, as text/template prints an action's result."""
    if v is None:
        return "<no value>"
    if isinstance(v, str):
        return v
    return _fmt(v)


def _fmt(v: Any) -> str:
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _fmt_float(v)
    if isinstance(v, str):
        return v
    if isinstance(v, _Bytes):
        return "[" + " ".join(str(b) for b in v) + "]"
    if isinstance(v, GoStruct):
        if v.stringer:
            return go_json(v)
        return "{" + " ".join(_fmt(x) for x in v.fields.values()) + "}"
    if isinstance(v, _PropertyType):
        return v[0] if len(v) == 1 else "[" + " ".join(v) + "]"
    if isinstance(v, (GoMap, GoList)):
        return go_json(v)
    if isinstance(v, dict):
        return "map[" + " ".join(f"{_fmt(k)}:{_fmt(v[k])}" for k in sorted(v, key=str)) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _truth(v: Any) -> bool:
    """Go template truthiness: false, 0, nil and empty string/slice/map are false; structs true."""
    if v is None:
        return False
    if isinstance(v, GoStruct):
        return True
    if isinstance(v, (bool, int, float, str, bytes, list, tuple, dict)):
        return bool(v)
    return True


# ---------------------------------------------------------------------------------------------
# Lexer
# ---------------------------------------------------------------------------------------------

# token kinds
_TEXT, _LEFT, _RIGHT, _STRING, _NUMBER, _BOOL, _NIL, _FIELD, _VAR, _DOT, _IDENT = range(11)
_LPAREN, _RPAREN, _PIPE, _DECLARE, _ASSIGN, _COMMA, _CHAR, _EOF = range(11, 19)


@dataclass(slots=True)
class _Tok:
    kind: int
    val: Any
    line: int
    space: bool = False  # whitespace precedes the token inside an action


_SPACE = frozenset(" \t\r\n")
_ACTION_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<rawstr>`[^`]*`)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<char>'(?:[^'\\\n]|\\.)+')
  | (?P<num>[+-]?(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?))
  | (?P<field>\.[A-Za-z_][A-Za-z0-9_]*)
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<dot>\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<declare>:=)
  | (?P<punct>[()|=,])
""", re.VERBOSE)

_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
               "\\": "\\", '"': '"', "'": "'"}


def _unquote(s: str, line: int) -> str:
    body = s[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e in _GO_ESCAPES:
            out.append(_GO_ESCAPES[e])
            i += 2
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            out.append(chr(int(body[i + 2:i + 2 + n], 16)))
            i += 2 + n
        elif e in "01234567":
            out.append(chr(int(body[i + 1:i + 4], 8)))
            i += 4
        else:
            raise TemplateError(f"template: :{line}: invalid syntax: {s}")
    return "".join(out)


def _number(s: str, line: int) -> int | float:
    t = s.replace("_", "")
    try:
        if re.fullmatch(r"[+-]?0[xXbBoO].*", t):
            return int(t, 0)
        if re.fullmatch(r"[+-]?\d+", t):
            return int(t, 10)
        return float(t)
    except ValueError:
        raise TemplateError(f"template: :{line}: bad number syntax: {s!r}") from None


def _lex(src: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos, line, n = 0, 1, len(src)
    trim_next = False
    while pos < n:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        trim_left = start >= 0 and src[start + 2:start + 3] == "-" and \
            src[start + 3:start + 4] in _SPACE
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if trim_left:
            text = text.rstrip(" \t\r\n")
        if text:
            toks.append(_Tok(_TEXT, text, line))
        line += src.count("\n", pos, start if start >= 0 else n)
        if start < 0:
            break
        pos = start + (4 if trim_left else 2)
        # comments: {{/* ... */}} with optional trim markers
        rest = src[pos:]
        if rest.startswith("/*"):
            end = src.find("*/", pos)
            if end < 0:
                raise TemplateError(f"template: :{line}: unclosed comment")
            after = src[end + 2:]
            if after[:1] in _SPACE and after[1:4] == "-}}":
                trim_next, close = True, end + 2 + 4
            elif after.startswith("}}"):
                trim_next, close = False, end + 4
            else:
                raise TemplateError(f"template: :{line}: comment ends before closing delimiter")
            line += src.count("\n", pos, close)
            pos = close
            continue
        toks.append(_Tok(_LEFT, None, line))
        trim_next = False
        space = False
        while True:
            if pos >= n:
                raise TemplateError(f"template: :{line}: unclosed action")
            if src.startswith("}}", pos):
                toks.append(_Tok(_RIGHT, None, line))
                pos += 2
                break
            m = _ACTION_TOKEN.match(src, pos)
            if m is None:
                raise TemplateError(
                    f"template: :{line}: unexpected {src[pos]!r} in command".replace("'", '"', 2))
            kind = m.lastgroup
            val = m.group()
            if kind == "ws":
                line += val.count("\n")
                space = True
                pos = m.end()
                if src.startswith("-}}", pos):  # " -}}": close and trim what follows
                    toks.append(_Tok(_RIGHT, None, line))
                    pos += 3
                    trim_next = True
                    break
                continue
            if kind == "rawstr":
                tok = _Tok(_STRING, val[1:-1], line, space)
                line += val.count("\n")
            elif kind == "str":
                tok = _Tok(_STRING, _unquote(val, line), line, space)
            elif kind == "char":
                tok = _Tok(_CHAR, ord(_unquote(val, line)[:1] or "\0"), line, space)
            elif kind == "num":
                # "-" directly before "}}" is a trim marker only after a space; a bare number here
                tok = _Tok(_NUMBER, _number(val, line), line, space)
            elif kind == "field":
                tok = _Tok(_FIELD, val[1:], line, space)
            elif kind == "var":
                tok = _Tok(_VAR, val, line, space)
            elif kind == "dot":
                tok = _Tok(_DOT, None, line, space)
            elif kind == "ident":
                if val in ("true", "false"):
                    tok = _Tok(_BOOL, val == "true", line, space)
                elif val == "nil":
                    tok = _Tok(_NIL, None, line, space)
                else:
                    tok = _Tok(_IDENT, val, line, space)
            elif kind == "declare":
                tok = _Tok(_DECLARE, val, line, space)
            else:
                tok = _Tok({"(": _LPAREN, ")": _RPAREN, "|": _PIPE, "=": _ASSIGN,
                            ",": _COMMA}[val], val, line, space)
            toks.append(tok)
            space = False
            pos = m.end()
    toks.append(_Tok(_EOF, None, line))
    return toks


# ---------------------------------------------------------------------------------------------
# Parse tree
# ---------------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Field:
    idents: tuple[str, ...]


@dataclass(slots=True)
class _Var:
    name: str
    idents: tuple[str, ...] = ()


@dataclass(slots=True)
class _Dot:
    pass


@dataclass(slots=True)
class _Func:
    name: str


@dataclass(slots=True)
class _Lit:
    value: Any


@dataclass(slots=True)
class _Chain:
    node: Any          # a _Pipe (parenthesised)
    idents: tuple[str, ...]


@dataclass(slots=True)
class _Cmd:
    args: list[Any]


@dataclass(slots=True)
class _Pipe:
    line: int
    decl: list[str]
    assign: bool
    cmds: list[_Cmd]


@dataclass(slots=True)
class _Text:
    text: str


@dataclass(slots=True)
class _Action:
    pipe: _Pipe


@dataclass(slots=True)
class _Branch:
    kind: str          # "if" | "with" | "range"
    pipe: _Pipe
    body: list[Any]
    orelse: list[Any] | None


@dataclass(slots=True)
class _Control:
    kind: str          # "break" | "continue"
    line: int


_BUILTINS = frozenset({"and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "len", "index",
                       "slice", "print", "printf", "println", "json", "html", "js", "urlquery",
                       "call", "currentDate", "yesterdayDate", "toTypeScriptType"})


class _Parser:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.i = 0
        self.vars: list[list[str]] = [["$"]]
        self.range_depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def error(self, tok: _Tok, msg: str) -> TemplateError:
        return TemplateError(f"template: :{tok.line}: {msg}")

    def parse(self) -> list[Any]:
        nodes, end = self.list_until(top=True)
        return nodes

    def list_until(self, top: bool = False) -> tuple[list[Any], str]:
        """Parse nodes until ``{{end}}``/``{{else ...}}`` (returned keyword) or EOF at top level."""
        nodes: list[Any] = []
        while True:
            t = self.next()
            if t.kind == _EOF:
                if not top:
                    raise self.error(t, "unexpected EOF")
                return nodes, "eof"
            if t.kind == _TEXT:
                nodes.append(_Text(t.val))
                continue
            # t is _LEFT
            k = self.peek()
            if k.kind == _IDENT and k.val in ("end", "else"):
                if top:
                    raise self.error(k, f"unexpected {{{{{k.val}}}}}")
                self.next()
                return nodes, k.val
            if k.kind == _IDENT and k.val in ("if", "with", "range"):
                self.next()
                nodes.append(self.branch(k.val, k))
                continue
            if k.kind == _IDENT and k.val in ("break", "continue"):
                self.next()
                if self.range_depth == 0:
                    raise self.error(k, f"{{{{{k.val}}}}} outside {{{{range}}}}")
                self.expect(_RIGHT, k.val)
                nodes.append(_Control(k.val, k.line))
                continue
            if k.kind == _IDENT and k.val in ("define", "template", "block"):
                raise self.error(k, f"{{{{{k.val}}}}} is not supported")
            pipe = self.pipeline("command", _RIGHT)
            nodes.append(_Action(pipe))

    def expect(self, kind: int, context: str) -> _Tok:
        t = self.next()
        if t.kind != kind:
            raise self.error(t, f"unexpected {self.describe(t)} in {context}")
        return t

    @staticmethod
    def describe(t: _Tok) -> str:
        if t.kind == _RIGHT:
            return '"}}"'
        if t.kind == _EOF:
            return "EOF"
        if t.kind == _STRING:
            return _json.dumps(t.val)
        if t.kind == _FIELD:
            return f"<.{t.val}>"
        return f"<{t.val}>" if t.val is not None else "token"

    def branch(self, kind: str, kw: _Tok) -> _Branch:
        self.vars.append(list(self.vars[-1]))
        pipe = self.pipeline(kind, _RIGHT)
        if kind == "range":
            self.range_depth += 1
        body, end = self.list_until()
        if kind == "range":
            self.range_depth -= 1
        orelse: list[Any] | None = None
        if end == "else":
            nk = self.peek()
            if nk.kind == _IDENT and nk.val in ("if", "with") and kind in ("if", "with"):
                # {{else if ...}} / {{else with ...}}: a nested branch that consumes our {{end}}
                self.next()
                orelse = [self.branch(nk.val, nk)]
            else:
                self.expect(_RIGHT, "else")
                orelse, end2 = self.list_until()
                if end2 != "end":
                    raise self.error(self.peek(), "expected end; found {{else}}")
                self.expect(_RIGHT, "end")
        else:
            self.expect(_RIGHT, "end")
        self.vars.pop()
        return _Branch(kind, pipe, body, orelse)

    def pipeline(self, context: str, end: int) -> _Pipe:
        line = self.peek().line
        decl: list[str] = []
        assign = False
        # declarations: $x := / $x = / $i, $v :=
        if self.peek().kind == _VAR:
            j = self.i
            names = [self.toks[j].val]
            k = j + 1
            if self.toks[k].kind == _COMMA and self.toks[k + 1].kind == _VAR:
                names.append(self.toks[k + 1].val)
                k += 2
            if self.toks[k].kind in (_DECLARE, _ASSIGN):
                if len(names) == 2 and context != "range":
                    raise self.error(self.toks[k], f"too many declarations in {context}")
                assign = self.toks[k].kind == _ASSIGN
                if assign:
                    for nm in names:
                        self.check_var(nm, self.toks[j])
                decl = names
                self.i = k + 1
                if not assign:
                    self.vars[-1].extend(names)
        cmds: list[_Cmd] = []
        while True:
            t = self.peek()
            if t.kind == end:
                self.next()
                break
            if t.kind in (_EOF, _RIGHT, _RPAREN):
                raise self.error(t, f"unexpected {self.describe(t)} in {context}")
            cmds.append(self.command(end))
            t = self.peek()
            if t.kind == _PIPE:
                self.next()
                if self.peek().kind == end:
                    raise self.error(t, "missing command after |")
        if not cmds:
            raise self.error(self.toks[self.i - 1], f"missing value for {context}")
        return _Pipe(line, decl, assign, cmds)

    def command(self, end: int) -> _Cmd:
        args: list[Any] = []
        while True:
            t = self.peek()
            if t.kind in (_PIPE, end, _RIGHT, _RPAREN, _EOF):
                break
            if args and not t.space:
                raise self.error(t, f"missing space before {self.describe(t)}")
            args.append(self.operand())
        if not args:
            raise self.error(self.peek(), "empty command")
        return _Cmd(args)

    def check_var(self, name: str, tok: _Tok) -> None:
        if name not in self.vars[-1]:
            raise self.error(tok, f'undefined variable "{name}"')

    def operand(self) -> Any:
        t = self.next()
        if t.kind == _FIELD:
            idents = [t.val]
            while self.peek().kind == _FIELD and not self.peek().space:
                idents.append(self.next().val)
            return _Field(tuple(idents))
        if t.kind == _VAR:
            self.check_var(t.val, t)
            idents = []
            while self.peek().kind == _FIELD and not self.peek().space:
                idents.append(self.next().val)
            return _Var(t.val, tuple(idents))
        if t.kind == _DOT:
            return _Dot()
        if t.kind == _IDENT:
            if t.val not in _BUILTINS:
                raise self.error(t, f'function "{t.val}" not defined')
            return _Func(t.val)
        if t.kind in (_STRING, _NUMBER, _BOOL, _CHAR):
            return _Lit(t.val)
        if t.kind == _NIL:
            return _Lit(None)
        if t.kind == _LPAREN:
            pipe = self.pipeline("parenthesized pipeline", _RPAREN)
            idents = []
            while self.peek().kind == _FIELD and not self.peek().space:
                idents.append(self.next().val)
            return _Chain(pipe, tuple(idents))
        raise self.error(t, f"unexpected {self.describe(t)} in operand")


def _identifiers(nodes: Iterable[Any]) -> set[str]:
    """Field and variable identifiers (lower-cased) as Ollama's ``Template.Vars`` collects them."""
    out: set[str] = set()

    def pipe(p: _Pipe) -> None:
        for c in p.cmds:
            for a in c.args:
                if isinstance(a, _Field):
                    out.update(x.lower() for x in a.idents)
                elif isinstance(a, _Var):
                    out.update(x.lower() for x in (a.name, *a.idents))
                elif isinstance(a, _Chain):
                    pipe(a.node)

    def walk(ns: Iterable[Any]) -> None:
        for n in ns:
            if isinstance(n, _Action):
                pipe(n.pipe)
            elif isinstance(n, _Branch):
                pipe(n.pipe)
                walk(n.body)
                walk(n.orelse or [])

    walk(nodes)
    return out


def _cut_after_response(nodes: list[Any]) -> list[Any]:
    """Ollama's legacy last turn: keep everything up to and including the first ``.Response``
    field and drop the rest, so generation continues right after it (``deleteNode``)."""
    cut = False

    def pipe(p: _Pipe) -> _Pipe | None:
        nonlocal cut
        cmds = []
        for c in p.cmds:
            args = []
            for a in c.args:
                if cut:
                    continue
                if isinstance(a, _Field) and "Response" in a.idents:
                    cut = True
                elif isinstance(a, _Chain):
                    inner = pipe(a.node)
                    if inner is None:
                        continue
                    a = _Chain(inner, a.idents)
                args.append(a)
            if not args:
                return None
            cmds.append(_Cmd(args))
        return _Pipe(p.line, p.decl, p.assign, cmds) if cmds else None

    def walk(ns: list[Any]) -> list[Any]:
        out = []
        for n in ns:
            if cut:
                break
            if isinstance(n, _Action):
                p = pipe(n.pipe)
                if p is not None:
                    out.append(_Action(p))
            elif isinstance(n, _Branch):
                body = walk(n.body)
                orelse = walk(n.orelse) if n.orelse is not None and not cut else (
                    [] if n.orelse is not None else None)
                out.append(_Branch(n.kind, n.pipe, body, orelse))
            else:
                out.append(n)
        return out

    return walk(nodes)


def _tool_call_tag(nodes: list[Any]) -> str:
    """The text a model writes before a tool call, taken from the template as Ollama does
    (``tools.parseTag``): the first non-blank text inside the ``if`` that tests ``.ToolCalls``,
    cut before any ``{``; ``"{"`` when there is none (then any leading JSON object is tried)."""

    def is_tool_calls(b: _Branch) -> bool:
        return b.kind == "if" and any(isinstance(a, _Field) and "ToolCalls" in a.idents
                                      for c in b.pipe.cmds for a in c.args)

    def find_if(ns: list[Any]) -> _Branch | None:
        for n in ns:
            if isinstance(n, _Branch):
                if is_tool_calls(n):
                    return n
                for sub in (n.body, n.orelse or []):
                    r = find_if(sub)
                    if r is not None:
                        return r
        return None

    def find_text(ns: list[Any]) -> str | None:
        for n in ns:
            if isinstance(n, _Text):
                if n.text.strip():
                    return n.text
            elif isinstance(n, _Branch):
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

    def uses(p: _Pipe, name: str) -> bool:
        return any(isinstance(a, _Field) and a.idents[:1] == (name,)
                   for c in p.cmds for a in c.args)

    def found(ns: list[Any]) -> None:
        if ns and isinstance(ns[0], _Text):
            tags[0] = ns[0].text.strip()
        if ns and isinstance(ns[-1], _Text):
            tags[1] = ns[-1].text.strip()

    def walk(ns: list[Any], in_messages: bool) -> None:
        for n in ns:
            if isinstance(n, _Action):
                if in_messages and uses(n.pipe, "Thinking"):
                    found(ns)
            elif isinstance(n, _Branch):
                inner = uses(n.pipe, "Messages") if n.kind == "range" else in_messages
                if in_messages and uses(n.pipe, "Thinking"):
                    found(ns)                    # a field in the branch's own pipeline
                walk(n.body, inner)
                if n.orelse is not None:
                    walk(n.orelse, inner)

    walk(nodes, False)
    return tags[0], tags[1]


# Reasoning tag pairs a GGUF Jinja chat template can write (Ollama's closed table): a pair
# counts only when the template text contains both halves; the first such pair wins.
_JINJA_THINK_TAGS = (("<think>", "</think>"), ("<|channel>", "<channel|>"),
                     ("<|START_THINKING|>", "<|END_THINKING|>"),
                     ("<seed:think>", "</seed:think>"))


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
# Evaluator
# ---------------------------------------------------------------------------------------------

class _Break(Exception):
    pass


class _Continue(Exception):
    pass


_MAX_DEPTH = 10000


class _Exec:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.out: list[str] = []
        self.scopes: list[dict[str, Any]] = [{"$": root}]

    def run(self, nodes: list[Any], dot: Any) -> None:
        for n in nodes:
            if isinstance(n, _Text):
                self.out.append(n.text)
            elif isinstance(n, _Action):
                v = self.pipe(n.pipe, dot)
                if not n.pipe.decl:
                    self.out.append(go_print(v))
            elif isinstance(n, _Branch):
                self.branch(n, dot)
            elif isinstance(n, _Control):
                raise _Break() if n.kind == "break" else _Continue()

    def branch(self, n: _Branch, dot: Any) -> None:
        self.scopes.append({})
        try:
            if n.kind == "range":
                self.range(n, dot)
                return
            v = self.pipe(n.pipe, dot)
            if _truth(v):
                self.run(n.body, v if n.kind == "with" else dot)
            elif n.orelse is not None:
                self.run(n.orelse, dot)
        finally:
            self.scopes.pop()

    def range(self, n: _Branch, dot: Any) -> None:
        p = n.pipe
        v = self.pipe(_Pipe(p.line, [], False, p.cmds), dot)
        if v is None:
            items: list[tuple[Any, Any]] = []
        elif isinstance(v, dict):
            items = [(k, v[k]) for k in sorted(v, key=str)]
        elif isinstance(v, (list, tuple)):
            items = list(enumerate(v))
        elif isinstance(v, int) and not isinstance(v, bool):
            items = [(i, i) for i in range(v)]
        else:
            raise TemplateError(f"template: :{p.line}: range can't iterate over {_fmt(v)}")
        if not items:
            if n.orelse is not None:
                self.run(n.orelse, dot)
            return
        for k, elem in items:
            scope = self.scopes[-1]
            if len(p.decl) == 1:
                self.set_var(p.decl[0], elem, p.assign, scope)
            elif len(p.decl) == 2:
                self.set_var(p.decl[0], k, p.assign, scope)
                self.set_var(p.decl[1], elem, p.assign, scope)
            try:
                self.scopes.append({})
                try:
                    self.run(n.body, elem)
                finally:
                    self.scopes.pop()
            except _Break:
                break
            except _Continue:
                continue

    def set_var(self, name: str, value: Any, assign: bool, scope: dict[str, Any]) -> None:
        if assign:
            for s in reversed(self.scopes):
                if name in s:
                    s[name] = value
                    return
        scope[name] = value

    def lookup(self, name: str, line: int) -> Any:
        for s in reversed(self.scopes):
            if name in s:
                return s[name]
        raise TemplateError(f'template: :{line}: undefined variable "{name}"')

    def pipe(self, p: _Pipe, dot: Any) -> Any:
        value: Any = _NO_ARG
        for c in p.cmds:
            value = self.command(c, dot, value, p.line)
        if p.decl:
            self.set_var(p.decl[0], value, p.assign, self.scopes[-1])
        return value

    def command(self, c: _Cmd, dot: Any, final: Any, line: int) -> Any:
        first = c.args[0]
        if isinstance(first, _Func):
            return self.call(first.name, c.args[1:], dot, final, line)
        if len(c.args) > 1 or final is not _NO_ARG:
            what = ".".join(getattr(first, "idents", ()) or ())
            raise TemplateError(
                f"template: :{line}: can't give argument to non-function {what or _fmt(first)}")
        return self.arg(first, dot, line)

    def arg(self, a: Any, dot: Any, line: int) -> Any:
        if isinstance(a, _Lit):
            return a.value
        if isinstance(a, _Dot):
            return dot
        if isinstance(a, _Field):
            return self.fields(dot, a.idents, line)
        if isinstance(a, _Var):
            return self.fields(self.lookup(a.name, line), a.idents, line)
        if isinstance(a, _Chain):
            return self.fields(self.pipe(a.node, dot), a.idents, line)
        if isinstance(a, _Func):
            return self.call(a.name, [], dot, _NO_ARG, line)
        raise TemplateError(f"template: :{line}: can't evaluate {a!r}")

    def fields(self, v: Any, idents: Sequence[str], line: int) -> Any:
        for name in idents:
            if isinstance(v, GoStruct):
                if name not in v.fields:
                    raise TemplateError(f"template: :{line}: executing \"\" at <.{name}>: "
                                        f"can't evaluate field {name} in type {v.type_name}")
                v = v.fields[name]
            elif isinstance(v, dict):
                v = v.get(name)
            elif v is None:
                raise TemplateError(f"template: :{line}: executing \"\" at <.{name}>: "
                                    f"nil pointer evaluating interface {{}}.{name}")
            else:
                raise TemplateError(f"template: :{line}: executing \"\" at <.{name}>: "
                                    f"can't evaluate field {name} in type {type(v).__name__}")
        return v

    def call(self, name: str, args: list[Any], dot: Any, final: Any, line: int) -> Any:
        def values() -> list[Any]:
            vs = [self.arg(a, dot, line) for a in args]
            if final is not _NO_ARG:
                vs.append(final)
            return vs

        if name in ("and", "or"):
            lazy: list[Callable[[], Any]] = [lambda a=a: self.arg(a, dot, line) for a in args]
            if final is not _NO_ARG:
                lazy.append(lambda: final)
            if not lazy:
                raise TemplateError(f"template: :{line}: wrong number of args for {name}: "
                                    "want at least 1 got 0")
            v = None
            for f in lazy:
                v = f()
                if _truth(v) != (name == "and"):
                    return v
            return v
        vs = values()
        try:
            return _FUNCS[name](*vs)
        except TemplateError as e:
            raise TemplateError(f"template: :{line}: error calling {name}: {e}") from None
        except TypeError:
            raise TemplateError(
                f"template: :{line}: wrong number of args for {name}: got {len(vs)}") from None


_NO_ARG = object()


def _basic(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if v is None:
        return "nil"
    return "other"


def _eq(a: Any, *bs: Any) -> bool:
    if not bs:
        raise TemplateError("missing argument for comparison")
    for b in bs:
        ka, kb = _basic(a), _basic(b)
        if ka == "other" or kb == "other":
            if a is None or b is None:
                if a is b:
                    return True
                continue
            raise TemplateError("non-comparable type")
        if ka != kb and not {ka, kb} <= {"int", "float"}:
            if "nil" in (ka, kb):
                continue
            raise TemplateError("incompatible types for comparison")
        if a == b:
            return True
    return False


def _ordered(a: Any, b: Any) -> None:
    ka, kb = _basic(a), _basic(b)
    if ka not in ("int", "float", "string") or kb not in ("int", "float", "string"):
        raise TemplateError("invalid type for comparison")
    if ka != kb and not {ka, kb} <= {"int", "float"}:
        raise TemplateError("incompatible types for comparison")


def _lt(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return a < b


def _le(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return a <= b


def _len(v: Any) -> int:
    if isinstance(v, str):
        return len(v.encode())
    if isinstance(v, (list, tuple, dict, bytes)):
        return len(v)
    raise TemplateError(f"len of type {_basic(v) if v is not None else 'nil'}")


def _int_arg(i: Any) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise TemplateError(f"cannot index slice/array with type {_basic(i)}")
    return i


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(v, dict):
            v = v.get(k)
        elif isinstance(v, (list, tuple, str)):
            i = _int_arg(k)
            seq = v.encode() if isinstance(v, str) else v
            if not 0 <= i < len(seq):
                raise TemplateError(f"index out of range: {i}")
            v = seq[i]
        elif v is None:
            raise TemplateError("index of untyped nil")
        else:
            raise TemplateError(f"can't index item of type {type(v).__name__}")
    return v


def _slice(v: Any, *idx: Any) -> Any:
    if len(idx) > 3:
        raise TemplateError(f"too many slice indexes: {len(idx)}")
    if isinstance(v, str):
        if len(idx) == 3:
            raise TemplateError("cannot 3-index slice a string")
        b = v.encode()
        lo = _int_arg(idx[0]) if idx else 0
        hi = _int_arg(idx[1]) if len(idx) > 1 else len(b)
        if not 0 <= lo <= hi <= len(b):
            raise TemplateError(f"index out of range: {hi if hi > len(b) else lo}")
        return b[lo:hi].decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        lo = _int_arg(idx[0]) if idx else 0
        hi = _int_arg(idx[1]) if len(idx) > 1 else len(v)
        if not 0 <= lo <= hi <= len(v):
            raise TemplateError(f"index out of range: {hi if hi > len(v) else lo}")
        out = v[lo:hi]
        return type(v)(out) if isinstance(v, GoList) else out
    if v is None:
        raise TemplateError("slice of untyped nil")
    raise TemplateError(f"can't slice item of type {type(v).__name__}")


def _sprint(*vs: Any) -> str:
    out = []
    for i, v in enumerate(vs):
        if i > 0 and not isinstance(v, str) and not isinstance(vs[i - 1], str):
            out.append(" ")
        out.append(_fmt(v))
    return "".join(out)


_PRINTF_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d+))?([a-zA-Z%])")


def _sprintf(fmt: str, *vs: Any) -> str:
    args = list(vs)

    def sub(m: re.Match) -> str:
        flags, width, prec, verb = m.groups()
        if verb == "%":
            return "%"
        if not args:
            return f"%!{verb}(MISSING)"
        v = args.pop(0)
        if verb in "vs":
            s = _fmt(v)
            if prec is not None and verb == "s":
                s = s[:int(prec)]
        elif verb == "q":
            s = _json.dumps(_fmt(v), ensure_ascii=False) if not isinstance(v, int) else repr(chr(v))
        elif verb == "d" and isinstance(v, int):
            s = str(v)
        elif verb in "feg" and isinstance(v, (int, float)):
            s = format(float(v), f".{prec if prec is not None else 6}{verb}") if verb != "g" \
                else _fmt_float(float(v))
        elif verb == "t" and isinstance(v, bool):
            s = "true" if v else "false"
        elif verb in "xX" and isinstance(v, (int, str)):
            s = format(v, verb) if isinstance(v, int) else v.encode().hex()
            s = s.upper() if verb == "X" else s
        else:
            s = f"%!{verb}({type(v).__name__}={_fmt(v)})"
        if width and width != "*":
            s = s.ljust(int(width)) if "-" in flags else s.rjust(int(width),
                                                                 "0" if "0" in flags else " ")
        return s

    out = _PRINTF_VERB.sub(sub, fmt)
    if args:
        out += "%!(EXTRA " + ", ".join(f"{type(a).__name__}={_fmt(a)}" for a in args) + ")"
    return out


def _html(*vs: Any) -> str:
    s = _sprint(*vs)
    return (s.replace("&", "&amp;").replace("'", "&#39;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&#34;").replace("\x00", "\uFFFD"))


def _ts_type(v: Any) -> str:
    if not isinstance(v, GoStruct) or v.type_name != "api.ToolProperty":
        return "any"
    f = v.fields
    if f.get("AnyOf"):
        return " | ".join(_ts_type(x) for x in f["AnyOf"])
    types = f.get("Type") or []
    mapping = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
               "array": "any[]", "object": "Record<string, any>", "null": "null"}
    return " | ".join(mapping.get(t, "any") for t in types) if types else "any"


def _today(days: int = 0) -> str:
    return (_dt.date.today() + _dt.timedelta(days=days)).isoformat()


_FUNCS: dict[str, Callable[..., Any]] = {
    "not": lambda v: not _truth(v),
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": _lt,
    "le": _le,
    "gt": lambda a, b: not _le(a, b),
    "ge": lambda a, b: not _lt(a, b),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "print": _sprint,
    "println": lambda *vs: " ".join(_fmt(v) for v in vs) + "\n",
    "printf": _sprintf,
    "json": go_json,
    "html": _html,
    "js": lambda *vs: _json.dumps(_sprint(*vs))[1:-1],
    "urlquery": lambda *vs: __import__("urllib.parse").parse.quote_plus(_sprint(*vs)),
    "currentDate": lambda *a: _today(),
    "yesterdayDate": lambda *a: _today(-1),
    "toTypeScriptType": _ts_type,
}


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
    """A parsed Modelfile TEMPLATE. Parsing raises :class:`TemplateError` (``template: :N: ...``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.nodes = _Parser(_lex(text)).parse()
        self.vars = frozenset(_identifiers(self.nodes))
        if "messages" not in self.vars and "response" not in self.vars:
            # Ollama appends {{ .Response }} to templates without one
            self.nodes = [*self.nodes, _Action(_Pipe(0, [], False, [_Cmd([_Field(("Response",))])]))]
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
        ex = _Exec(data)
        try:
            ex.run(self.nodes if nodes is None else nodes, data)
        except RecursionError:
            raise TemplateError("template: : executing \"\": too deeply nested") from None
        return "".join(ex.out)

    def render(self, messages: Sequence[dict] = (), tools: Sequence[dict] | None = None, *,
               prompt: str = "", suffix: str = "", think: bool = False, think_level: str = "",
               is_think_set: bool = False) -> str:
        """Ollama's ``Template.Execute``: fill-in-the-middle when both ``prompt`` and ``suffix``
        are set; else the ``.Messages`` form when the template uses it; else legacy per-turn."""
        think_vars = {"Think": think, "ThinkLevel": think_level, "IsThinkSet": is_think_set}
        if prompt and suffix:
            return self.execute({"Prompt": prompt, "Suffix": suffix, "Response": "", **think_vars})
        system, msgs = collate(messages)
        if self.uses_messages:
            return self.execute({
                "System": system,
                "Messages": [message_value(m) for m in msgs],
                "Tools": GoList(tool_value(t) for t in tools) if tools else None,
                "Response": "", **think_vars})
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
        out.append(self.execute({**state, **think_vars}, _cut_after_response(self.nodes)))
        return "".join(out)


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

        def tojson(v: Any, indent: int | None = None, ensure_ascii: bool = False,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return _json.dumps(v, indent=indent, ensure_ascii=ensure_ascii,
                               separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
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

    def render(self, messages: Sequence[dict] = (), tools: Sequence[dict] | None = None, *,
               prompt: str = "", suffix: str = "", think: bool = False, think_level: str = "",
               is_think_set: bool = False) -> str:
        import jinja2
        msgs = []
        for m in messages:
            m = dict(m)
            calls = m.get("tool_calls")
            if calls:
                m["tool_calls"] = [
                    {**c, "type": "function",
                     "function": {**c.get("function", {}),
                                  "arguments": c.get("function", {}).get("arguments") or {}}}
                    for c in calls]
            msgs.append(m)
        kwargs: dict[str, Any] = {"messages": msgs, "add_generation_prompt": True,
                                  "bos_token": self.bos_token, "eos_token": self.eos_token}
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
    return JinjaTemplate(text, bos_token, eos_token)      # compiling one takes milliseconds


def for_model(template: str | None, chat_template: str | None = None, *, bos_token: str = "",
              eos_token: str = "") -> Renderer:
    """The renderer for a model: its Go TEMPLATE, else the GGUF Jinja template, else
    ``{{ .Prompt }}``. Renderers are shared (cached by their text): never modify one."""
    if template:
        return go_template(template)
    if chat_template:
        return _jinja_template(chat_template, bos_token, eos_token)
    return go_template(DEFAULT_TEMPLATE)


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
        self.names = [n for n in ((t.get("function") or {}).get("name") for t in tools
                                  if isinstance(t, dict)) if isinstance(n, str) and n]
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
        longest = max(len(n) for n in self.names)
        for i in range(1, min(len(buf), longest) + 1):
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
        pairs = {"{": ("{", "}"), "[": ("[", "]")}
        if self.tag not in pairs:
            return False
        op, cl = pairs[self.tag]
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
                    data = _json.loads(buf[start:i + 1])
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
        children = [v] if isinstance(v, dict) else [x for x in v if isinstance(x, dict)] \
            if isinstance(v, list) else []
        for child in children:
            found, args = _find_object(name, child)
            if found:
                return True, args
    return False, None
