"""Modelfile parsing (for ``corral create -f``) and rendering (for /api/show ``modelfile``).

:func:`parse` turns Modelfile text into a :class:`Modelfile` (commands in order);
:meth:`Modelfile.create_request` maps it onto the /api/create body. ``FROM``/``ADAPTER`` values
stay as written: whether they are local files to upload or model names is the CLI's decision
(it sees the client's file system, the daemon does not).

Syntax (Ollama's): ``# comment`` lines; ``INSTRUCTION args`` with case-insensitive instruction;
values are the rest of the line, or ``"…"`` / ``\"\"\"…\"\"\"`` which may span lines; no escapes.
Errors raise :class:`ModelfileError` (a ValueError) naming the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from corral.daemon.errors import InvalidRequest
from corral.daemon.human import go_quote
from corral.daemon.models.store import ModelRecord
from corral.daemon.params import KNOWN_PARAMS, type_param

COMMANDS = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)
DEPRECATED_PARAMS = frozenset(
    {
        "penalize_newline",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mlock",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
    }
)
MESSAGE_ROLES = ("system", "user", "assistant")


class ModelfileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # lower-case instruction; for PARAMETER the parameter name is in `key`
    value: str
    key: str = ""  # PARAMETER name or MESSAGE role
    line: int = 0


@dataclass(slots=True)
class Modelfile:
    commands: list[Command] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def create_request(self) -> dict[str, Any]:
        """The /api/create body (without ``model``): from, adapters, template, system, license,
        messages, parameters. ``from`` holds the FROM value verbatim (a list when there are
        several, as for a model GGUF plus its vision projector); the caller replaces local
        files with ``files`` after uploading them."""
        req: dict[str, Any] = {}
        params: dict[str, Any] = {}
        licenses: list[str] = []
        messages: list[dict[str, str]] = []
        adapters: list[str] = []
        froms: list[str] = []
        for c in self.commands:
            if c.name == "from":
                froms.append(c.value)
                req["from"] = froms[0] if len(froms) == 1 else froms
            elif c.name == "adapter":
                adapters.append(c.value)
            elif c.name in ("template", "system", "renderer", "parser", "requires", "draft"):
                req[c.name] = c.value
            elif c.name == "license":
                licenses.append(c.value)
            elif c.name == "message":
                messages.append({"role": c.key, "content": c.value})
            elif c.name == "parameter":
                value = type_param(c.key, c.value)
                if c.key == "stop":
                    params.setdefault("stop", []).extend(value)
                else:
                    params[c.key] = value
        if adapters:
            req["adapters"] = adapters
        if licenses:
            req["license"] = licenses
        if messages:
            req["messages"] = messages
        if params:
            req["parameters"] = params
        return req


def _read_value(text: str, pos: int, line: int) -> tuple[str, int, int]:
    """Read one value starting at ``pos`` (after the instruction's blank); returns
    (value, new position, new line number)."""
    for quote in ('"""', '"'):
        if text.startswith(quote, pos):
            end = text.find(quote, pos + len(quote))
            if end < 0:
                raise ModelfileError(f"(line {line}): unexpected EOF")
            value = text[pos + len(quote) : end]
            after = end + len(quote)
            nl = text.find("\n", after)
            rest = text[after:] if nl < 0 else text[after:nl]
            if rest.strip():
                raise ModelfileError(f"(line {line}): unexpected text after closing quote")
            return value, (len(text) if nl < 0 else nl + 1), line + value.count("\n")
    nl = text.find("\n", pos)
    end = len(text) if nl < 0 else nl
    return text[pos:end].strip(), (len(text) if nl < 0 else nl + 1), line


def parse(text: str) -> Modelfile:
    """Parse Modelfile text. Raises ModelfileError on unknown instructions, bad parameters or
    message roles, unterminated quotes, and a missing FROM."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    mf = Modelfile()
    pos, line = 0, 1
    while pos < len(text):
        nl = text.find("\n", pos)
        raw = text[pos:] if nl < 0 else text[pos:nl]
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            pos = len(text) if nl < 0 else nl + 1
            line += 1
            continue
        lead = len(raw) - len(raw.lstrip())
        word = stripped.split(None, 1)[0]
        instr = word.lower()
        if instr not in COMMANDS:
            raise ModelfileError(
                f'(line {line}): command must be one of "from", "license", "template", "system", '
                '"adapter", "draft", "renderer", "parser", "parameter", "message", or "requires"'
            )
        start = pos + lead + len(word)
        while start < len(text) and text[start] in " \t":
            start += 1
        key = ""
        if instr in ("parameter", "message"):
            end = start
            while end < len(text) and text[end] not in " \t\n":
                end += 1
            key = text[start:end]
            start = end
            while start < len(text) and text[start] in " \t":
                start += 1
            if not key:
                raise ModelfileError(f"(line {line}): missing {instr} name")
        value, pos, last_line = _read_value(text, start, line)
        if instr == "parameter":
            key = key.lower()
            if key in DEPRECATED_PARAMS:
                mf.warnings.append(f"parameter {key} is deprecated")
                line = last_line + 1
                continue
            if key not in KNOWN_PARAMS:
                raise ModelfileError(f"(line {line}): unknown parameter '{key}'")
            try:
                type_param(key, value)
            except InvalidRequest as e:
                raise ModelfileError(f"(line {line}): {e.message}") from None
        elif instr == "message":
            key = key.lower()
            if key not in MESSAGE_ROLES:
                raise ModelfileError('message role must be one of "system", "user", or "assistant"')
        mf.commands.append(Command(name=instr, value=value, key=key, line=line))
        line = last_line + 1
    if not any(c.name == "from" for c in mf.commands):
        raise ModelfileError("no FROM line")
    return mf


def quote(value: str) -> str:
    """Ollama's quoting: quote only values with a newline or leading/trailing blanks;
    triple quotes when the value also contains a double quote."""
    if "\n" in value or value != value.strip():
        if '"' in value:
            return f'"""{value}"""'
        return f'"{value}"'
    return value


def _format_param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def render(
    record: ModelRecord, *, system: str | None = None, options: dict[str, Any] | None = None
) -> str:
    """The /api/show ``modelfile``: header, FROM <blob path>, ADAPTER, TEMPLATE, SYSTEM,
    PARAMETER lines, LICENSE, MESSAGE. ``system``/``options`` override the stored ones."""
    out = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {record.name}",
        "",
    ]
    if record.model_path is not None:
        out.append(f"FROM {record.model_path}")
    else:
        out.append(f"FROM {record.name}")
    for p in record.projectors:
        out.append(f"FROM {p}")
    for a in record.adapters:
        out.append(f"ADAPTER {a}")
    if record.template is not None:
        out.append(f'TEMPLATE """{record.template}"""')
    sys_text = system if system is not None else record.system
    if sys_text:
        out.append(
            f"SYSTEM {quote(sys_text)}" if '"""' not in sys_text else f'SYSTEM """{sys_text}"""'
        )
    params = dict(record.parameters)
    params.update(options or {})
    for key, value in params.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            out.append(f"PARAMETER {key} {quote(_format_param(v))}")
    for text in record.license:
        out.append(f'LICENSE """{text}"""')
    for m in record.messages:
        out.append(f"MESSAGE {m.get('role', 'user')} {quote(str(m.get('content', '')))}")
    return "\n".join(out) + "\n"


def format_parameters(params: dict[str, Any]) -> str:
    """/api/show ``parameters``: one ``%-30s %#v`` line per value (strings Go-quoted, so a stop
    sequence with a newline stays on its line), lists repeated."""
    lines = []
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            shown = go_quote(v) if isinstance(v, str) else _format_param(v)
            lines.append(f"{key:<30} {shown}")
    return "\n".join(lines)
