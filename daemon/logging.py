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
        else structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"])
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
