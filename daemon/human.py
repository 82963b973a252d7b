"""Ollama's ``format`` package: numbers as people read them (``/api/show`` details, ``corral
show``). A leaf module: the store and the CLI both use it."""

from __future__ import annotations


def human_number(n: int) -> str:
    """Ollama's ``format.HumanNumber``: 8030261248 -> "8.0B", 268098176 -> "268.10M", 137e6 -> "137M"."""
    if n >= 1_000_000_000:
        v = n / 1_000_000_000
        return f"{v:.0f}B" if v == int(v) else f"{v:.1f}B"
    if n >= 1_000_000:
        v = n / 1_000_000
        return f"{v:.0f}M" if v == int(v) else f"{v:.2f}M"
    if n >= 1_000:
        return f"{n / 1_000:.0f}K"
    return str(n)
