"""An interpreter for Go's ``text/template``: the subset Ollama's library templates use.

Lexer, parser and evaluator with Go's semantics where a prompt depends on them: truthiness,
``fmt`` printing (``%v`` of maps, slices and structs), ``encoding/json`` output (HTML-safe
escapes, sorted map keys, Go's float format), ``missingkey=zero``, whitespace trimming
(``{{-``/``-}}``), ``range``/``with``/``if``/``else if``, ``break``/``continue``, variables and
the builtins (``and``, ``or``, ``not``, ``eq``..., ``len``, ``index``, ``slice``, ``print*``,
``html``, ``js``, ``json``, and Ollama's ``currentDate``, ``yesterdayDate``,
``toTypeScriptType``). Errors are :class:`TemplateError` with Go's ``template: :LINE: ...``
text.

Why no library: there is no maintained Python implementation of Go's ``text/template``; Jinja2,
Mako or Chevron have other syntax and semantics (truthiness of empty maps, ``range`` over maps in
key order, ``fmt``/JSON printing, whitespace trimming), and the prompt must be byte-for-byte what
Ollama renders (tests/daemon/test_templates_library.py compares library templates with Ollama's
output). Calling Go (a cgo helper) would add a toolchain to the install.

Length: over 900 lines because the language is (lexer, parser, evaluator, Go's fmt and JSON);
Ollama-specific use of it (request data as Go values, Ollama's Execute, tag inference) lives in
``templates.py``.
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


class PropertyType(list):
    """``api.PropertyType``: JSON is a string when there is one type; printing likewise."""


# ---------------------------------------------------------------------------------------------
# Go's encoding/json and fmt
# ---------------------------------------------------------------------------------------------

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


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
    if isinstance(v, GoStruct):
        parts = []
        for go, value in v.fields.items():
            name, omit = v.tags.get(go, (go, False))
            if omit and not _truth(value):
                continue
            parts.append(_json_str(name) + ":" + go_json(value))
        return "{" + ",".join(parts) + "}"
    if isinstance(v, PropertyType):
        return go_json(v[0]) if len(v) == 1 else "[" + ",".join(go_json(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{"
            + ",".join(_json_str(str(k)) + ":" + go_json(v[k]) for k in sorted(v, key=str))
            + "}"
        )
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
    if isinstance(v, GoStruct):
        if v.stringer:
            return go_json(v)
        return "{" + " ".join(_fmt(x) for x in v.fields.values()) + "}"
    if isinstance(v, PropertyType):
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


_ACTION_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<rawstr>`[^`]*`)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<char>'(?:[^'\\\n]|\\.)+')
  | (?P<num>[+-]?(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+
                 |(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?))
  | (?P<field>\.[A-Za-z_][A-Za-z0-9_]*)
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<dot>\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<declare>:=)
  | (?P<punct>[()|=,])
""",
    re.VERBOSE,
)


_GO_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
}


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
            out.append(chr(int(body[i + 2 : i + 2 + n], 16)))
            i += 2 + n
        elif e in "01234567":
            out.append(chr(int(body[i + 1 : i + 4], 8)))
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


def lex(src: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos, line, n = 0, 1, len(src)
    trim_next = False
    while pos < n:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        trim_left = (
            start >= 0
            and src[start + 2 : start + 3] == "-"
            and src[start + 3 : start + 4] in _SPACE
        )
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
            after = src[end + 2 :]
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
                    f"template: :{line}: unexpected {src[pos]!r} in command".replace("'", '"', 2)
                )
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
                tok = _Tok(
                    {"(": _LPAREN, ")": _RPAREN, "|": _PIPE, "=": _ASSIGN, ",": _COMMA}[val],
                    val,
                    line,
                    space,
                )
            toks.append(tok)
            space = False
            pos = m.end()
    toks.append(_Tok(_EOF, None, line))
    return toks


# ---------------------------------------------------------------------------------------------
# Parse tree
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Field:
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
class Chain:
    node: Any  # a Pipe (parenthesised)
    idents: tuple[str, ...]


@dataclass(slots=True)
class Cmd:
    args: list[Any]


@dataclass(slots=True)
class Pipe:
    line: int
    decl: list[str]
    assign: bool
    cmds: list[Cmd]


@dataclass(slots=True)
class Text:
    text: str


@dataclass(slots=True)
class Action:
    pipe: Pipe


@dataclass(slots=True)
class Branch:
    kind: str  # "if" | "with" | "range"
    pipe: Pipe
    body: list[Any]
    orelse: list[Any] | None


@dataclass(slots=True)
class _Control:
    kind: str  # "break" | "continue"
    line: int


class Parser:
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
        return self.list_until(top=True)[0]

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
                nodes.append(Text(t.val))
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
            nodes.append(Action(pipe))

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

    def branch(self, kind: str, kw: _Tok) -> Branch:
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
        return Branch(kind, pipe, body, orelse)

    def pipeline(self, context: str, end: int) -> Pipe:
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
        cmds: list[Cmd] = []
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
        return Pipe(line, decl, assign, cmds)

    def command(self, end: int) -> Cmd:
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
        return Cmd(args)

    def check_var(self, name: str, tok: _Tok) -> None:
        if name not in self.vars[-1]:
            raise self.error(tok, f'undefined variable "{name}"')

    def operand(self) -> Any:
        t = self.next()
        if t.kind == _FIELD:
            idents = [t.val]
            while self.peek().kind == _FIELD and not self.peek().space:
                idents.append(self.next().val)
            return Field(tuple(idents))
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
            return Chain(pipe, tuple(idents))
        raise self.error(t, f"unexpected {self.describe(t)} in operand")


def identifiers(nodes: Iterable[Any]) -> set[str]:
    """Field and variable identifiers (lower-cased) as Ollama's ``Template.Vars`` collects them."""
    out: set[str] = set()

    def pipe(p: Pipe) -> None:
        for c in p.cmds:
            for a in c.args:
                if isinstance(a, Field):
                    out.update(x.lower() for x in a.idents)
                elif isinstance(a, _Var):
                    out.update(x.lower() for x in (a.name, *a.idents))
                elif isinstance(a, Chain):
                    pipe(a.node)

    def walk(ns: Iterable[Any]) -> None:
        for n in ns:
            if isinstance(n, Action):
                pipe(n.pipe)
            elif isinstance(n, Branch):
                pipe(n.pipe)
                walk(n.body)
                walk(n.orelse or [])

    walk(nodes)
    return out


# ---------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class Exec:
    def __init__(self, root: Any) -> None:
        self.out: list[str] = []
        self.scopes: list[dict[str, Any]] = [{"$": root}]

    def run(self, nodes: list[Any], dot: Any) -> None:
        for n in nodes:
            if isinstance(n, Text):
                self.out.append(n.text)
            elif isinstance(n, Action):
                v = self.pipe(n.pipe, dot)
                if not n.pipe.decl:
                    self.out.append(go_print(v))
            elif isinstance(n, Branch):
                self.branch(n, dot)
            elif isinstance(n, _Control):
                raise _Break() if n.kind == "break" else _Continue()

    def branch(self, n: Branch, dot: Any) -> None:
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

    def range(self, n: Branch, dot: Any) -> None:
        p = n.pipe
        v = self.value(p, dot)  # its variables are set per element below
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

    def pipe(self, p: Pipe, dot: Any) -> Any:
        value = self.value(p, dot)
        if p.decl:
            self.set_var(p.decl[0], value, p.assign, self.scopes[-1])
        return value

    def value(self, p: Pipe, dot: Any) -> Any:
        """The pipeline's value, without setting its declared variables."""
        value: Any = _NO_ARG
        for c in p.cmds:
            value = self.command(c, dot, value, p.line)
        return value

    def command(self, c: Cmd, dot: Any, final: Any, line: int) -> Any:
        first = c.args[0]
        if isinstance(first, _Func):
            return self.call(first.name, c.args[1:], dot, final, line)
        if len(c.args) > 1 or final is not _NO_ARG:
            what = ".".join(getattr(first, "idents", ()) or ())
            raise TemplateError(
                f"template: :{line}: can't give argument to non-function {what or _fmt(first)}"
            )
        return self.arg(first, dot, line)

    def arg(self, a: Any, dot: Any, line: int) -> Any:
        if isinstance(a, _Lit):
            return a.value
        if isinstance(a, _Dot):
            return dot
        if isinstance(a, Field):
            return self.fields(dot, a.idents, line)
        if isinstance(a, _Var):
            return self.fields(self.lookup(a.name, line), a.idents, line)
        if isinstance(a, Chain):
            return self.fields(self.pipe(a.node, dot), a.idents, line)
        if isinstance(a, _Func):
            return self.call(a.name, [], dot, _NO_ARG, line)
        raise TemplateError(f"template: :{line}: can't evaluate {a!r}")

    def fields(self, v: Any, idents: Sequence[str], line: int) -> Any:
        for name in idents:
            if isinstance(v, GoStruct):
                if name not in v.fields:
                    raise TemplateError(
                        f'template: :{line}: executing "" at <.{name}>: '
                        f"can't evaluate field {name} in type {v.type_name}"
                    )
                v = v.fields[name]
            elif isinstance(v, dict):
                v = v.get(name)
            elif v is None:
                raise TemplateError(
                    f'template: :{line}: executing "" at <.{name}>: '
                    f"nil pointer evaluating interface {{}}.{name}"
                )
            else:
                raise TemplateError(
                    f'template: :{line}: executing "" at <.{name}>: '
                    f"can't evaluate field {name} in type {type(v).__name__}"
                )
        return v

    def call(self, name: str, args: list[Any], dot: Any, final: Any, line: int) -> Any:
        def values() -> list[Any]:
            vs = [self.arg(a, dot, line) for a in args]
            if final is not _NO_ARG:
                vs.append(final)
            return vs

        if name in ("and", "or"):
            lazy: list[Callable[[], Any]] = [
                functools.partial(self.arg, a, dot, line) for a in args
            ]
            if final is not _NO_ARG:
                lazy.append(lambda: final)
            if not lazy:
                raise TemplateError(
                    f"template: :{line}: wrong number of args for {name}: want at least 1 got 0"
                )
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
                f"template: :{line}: wrong number of args for {name}: got {len(vs)}"
            ) from None


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
                s = s[: int(prec)]
        elif verb == "q":
            s = _json.dumps(_fmt(v), ensure_ascii=False) if not isinstance(v, int) else repr(chr(v))
        elif verb == "d" and isinstance(v, int):
            s = str(v)
        elif verb in "feg" and isinstance(v, (int, float)):
            s = (
                format(float(v), f".{prec if prec is not None else 6}{verb}")
                if verb != "g"
                else _fmt_float(float(v))
            )
        elif verb == "t" and isinstance(v, bool):
            s = "true" if v else "false"
        elif verb in "xX" and isinstance(v, (int, str)):
            s = format(v, verb) if isinstance(v, int) else v.encode().hex()
            s = s.upper() if verb == "X" else s
        else:
            s = f"%!{verb}({type(v).__name__}={_fmt(v)})"
        if width and width != "*":
            s = (
                s.ljust(int(width))
                if "-" in flags
                else s.rjust(int(width), "0" if "0" in flags else " ")
            )
        return s

    out = _PRINTF_VERB.sub(sub, fmt)
    if args:
        out += "%!(EXTRA " + ", ".join(f"{type(a).__name__}={_fmt(a)}" for a in args) + ")"
    return out


def _html(*vs: Any) -> str:
    s = _sprint(*vs)
    return (
        s.replace("&", "&amp;")
        .replace("'", "&#39;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
        .replace("\x00", "\ufffd")
    )


def _ts_type(v: Any) -> str:
    if not isinstance(v, GoStruct) or v.type_name != "api.ToolProperty":
        return "any"
    f = v.fields
    if f.get("AnyOf"):
        return " | ".join(_ts_type(x) for x in f["AnyOf"])
    types = f.get("Type") or []
    mapping = {
        "string": "string",
        "number": "number",
        "integer": "number",
        "boolean": "boolean",
        "array": "any[]",
        "object": "Record<string, any>",
        "null": "null",
    }
    return " | ".join(mapping.get(t, "any") for t in types) if types else "any"


def _call(fn: Any, *args: Any) -> Any:
    """``call``: no value a request gives a template is a function, so every call fails."""
    if fn is None:
        raise TemplateError("call of nil")
    raise TemplateError(f"non-function of type {type(fn).__name__}")


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
    "call": _call,
}


# the names a template may call: and/or are evaluated lazily by Exec.call, the rest are _FUNCS
_BUILTINS = frozenset({"and", "or", *_FUNCS})
