"""``python -m corral.daemon.cli``: the ``corral`` command."""

import sys

from corral.daemon.cli.entry import main

sys.exit(main())
