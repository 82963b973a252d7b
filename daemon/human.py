"""Ollama's ``format`` package: numbers as people read them (``/api/show`` details, ``corral
show``), and Go's string quoting for the texts Ollama prints quoted. A leaf module: the store,
the CLI, the Modelfile and the config all use it."""

from __future__ import annotations


def human_number(n: int) -> str:
    """Ollama's ``format.HumanNumber``: 8030261248 -> "8.0B", 268098176 -> "268.10M",
    137e6 -> "137M"."""
    if n >= 1_000_000_000:
        v = n / 1_000_000_000
        return f"{v:.0f}B" if v == int(v) else f"{v:.1f}B"
    if n >= 1_000_000:
        v = n / 1_000_000
        return f"{v:.0f}M" if v == int(v) else f"{v:.2f}M"
    if n >= 1_000:
        return f"{n / 1_000:.0f}K"
    return str(n)


_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def go_quote(text: str) -> str:
    """Go's ``%#v`` of a string (``strconv.Quote``): one line, ``\\n``/``\\"``/``\\\\`` escaped,
    other control characters as ``\\xNN``; printable Unicode as is."""
    out = []
    for ch in text:
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
