"""What the ``corral`` command prints, shared by ``cli`` and its interactive mode
(``interactive``): the error it exits with, Ollama's CLI formats for sizes, ``show`` and the
``--verbose`` timings. A module of its own so that neither imports the other back.
"""

from __future__ import annotations

import sys
from typing import Any

from corral.daemon.human import human_number


class CliError(Exception):
    """A failure to report as ``Error: …`` with exit status 1."""


def write(text: str) -> None:
    """``text`` on stdout now (flushed: replies stream a piece at a time)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def out(text: str = "", end: str = "\n") -> None:
    write(text + end)


def human_bytes(n: int) -> str:
    """SI units, ``%d`` when >= 10 or integral, else one decimal: ``4.7 GB``, ``274 MB``,
    ``512 B``."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            if unit == "B" or value >= 10 or value == int(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def print_show(info: dict[str, Any]) -> None:
    """The sections of ``show MODEL`` (also ``/show info`` in ``run``)."""
    details, mi = info.get("details", {}), info.get("model_info", {}) or {}
    arch = mi.get("general.architecture", details.get("family", ""))
    rows = [("architecture", arch), ("parameters", details.get("parameter_size", ""))]
    if f"{arch}.context_length" in mi:
        rows.append(("context length", str(mi[f"{arch}.context_length"])))
    if f"{arch}.embedding_length" in mi:
        rows.append(("embedding length", str(mi[f"{arch}.embedding_length"])))
    rows.append(("quantization", details.get("quantization_level", "")))
    out("  Model")
    for k, v in rows:
        out(f"    {k:<20}{v}")
    out()
    if info.get("capabilities"):
        out("  Capabilities")
        for cap in info["capabilities"]:
            out(f"    {cap}")
        out()
    if pi := info.get("projector_info"):
        parch = pi.get("general.architecture", "")
        out("  Projector")
        for k, v in (
            ("architecture", parch),
            ("parameters", human_number(int(pi.get("general.parameter_count", 0)))),
            ("embedding length", pi.get(f"{parch}.vision.embedding_length", "")),
            ("dimensions", pi.get(f"{parch}.vision.projection_dim", "")),
        ):
            out(f"    {k:<20}{v}")
        out()
    if info.get("parameters"):
        out("  Parameters")
        for line in info["parameters"].splitlines():
            k, _, v = line.partition(" ")
            out(f"    {k:<20}{v.strip()}")
        out()
    if info.get("system"):
        out("  System")
        for line in info["system"].splitlines()[:2]:
            out(f"    {line}")
        out()


def print_metrics(final: dict) -> None:
    def secs(key: str) -> float:
        return final.get(key, 0) / 1e9

    def rate(count: int, key: str) -> float:
        return count / secs(key) if secs(key) else 0

    pe, ev = final.get("prompt_eval_count", 0), final.get("eval_count", 0)
    sys.stderr.write(
        f"total duration:       {secs('total_duration'):.6f}s\n"
        f"load duration:        {secs('load_duration'):.6f}s\n"
        f"prompt eval count:    {pe} token(s)\n"
        f"prompt eval duration: {secs('prompt_eval_duration'):.6f}s\n"
        f"prompt eval rate:     {rate(pe, 'prompt_eval_duration'):.2f} tokens/s\n"
        f"eval count:           {ev} token(s)\n"
        f"eval duration:        {secs('eval_duration'):.6f}s\n"
        f"eval rate:            {rate(ev, 'eval_duration'):.2f} tokens/s\n"
    )
