"""structlog set-up for the daemon: ``key=value`` lines by default, JSON lines with a switch.

Call :func:`configure` once at start (the CLI does). Modules get loggers with
``structlog.get_logger(__name__)`` and never call ``print``.
"""

from __future__ import annotations

import logging
import sys

import structlog

# Ollama's OLLAMA_DEBUG levels mapped to stdlib levels (TRACE has no stdlib twin: DEBUG - 5).
TRACE = 5


def configure(level: int = logging.INFO, json: bool = False, stream=None) -> None:
    """Route structlog (and stdlib logging, e.g. aiohttp's) to ``stream`` (stderr by default)."""
    stream = stream if stream is not None else sys.stderr
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else Logfmt(key_order=["timestamp", "level", "event"])
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # one write (and flush) per line; print() writes the line and its newline separately
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log is replaced by our one-line-per-request log.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Logfmt(structlog.processors.LogfmtRenderer):
    """structlog's ``LogfmtRenderer`` (its output to the byte), for less per line: every request
    writes one (issue 18), and the stock renderer checks each key character by character every
    time. A key is checked once here (keys come from the code: a bounded set), and a value
    is quoted and escaped by the same rules."""

    def __init__(self, key_order: list[str]) -> None:
        super().__init__(key_order=key_order)
        self._keys_ok: set[str] = set()

    def __call__(self, _: object, __: str, event_dict: structlog.typing.EventDict) -> str:
        keys_ok = self._keys_ok
        elements: list[str] = []
        for key, value in self._ordered_items(event_dict):
            if key not in keys_ok:
                if any(c <= " " for c in key):
                    raise ValueError(f'Invalid key: "{key}"')
                if len(keys_ok) < 4096:
                    keys_ok.add(key)
            if value is None:
                elements.append(key + "=")
                continue
            if value is True and self.bool_as_flag:
                elements.append(key)
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            value = str(value)
            quote = " " in value or "=" in value or '"' in value
            if quote and "\\" in value:
                value = value.replace("\\", "\\\\")
            if '"' in value:
                value = value.replace('"', '\\"')
            if "\n" in value:
                value = value.replace("\n", "\\n")
            elements.append(f'{key}="{value}"' if quote else key + "=" + value)
        return " ".join(elements)
