"""The ``corral`` command's entry point (the ``corral`` script, ``python -m corral.daemon.cli``).

``corral serve`` (or ``start``, with nothing after it) goes straight to
:func:`corral.daemon.boot.serve`, which spawns the daemon's first spare runner before the
server's imports. Every other verb goes to :mod:`corral.daemon.cli.main`, whose imports for the
client verbs (prompt_toolkit for ``corral run``, ``corral doctor``'s, ~0.3 s) the daemon never
pays.
"""

from __future__ import annotations

import sys

from corral.daemon import boot
from corral.daemon.config import Config

SERVE_VERBS = ("serve", "start")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1 and args[0] in SERVE_VERBS:
        return boot.serve(Config.from_env())
    from corral.daemon.cli.main import main as cli  # see FUNCTION_IMPORTS in test_imports

    return cli(args)
