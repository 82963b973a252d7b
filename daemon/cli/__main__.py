"""``python -m corral.daemon.cli``: the ``corral`` command."""

import sys

from corral.daemon.cli.main import main

sys.exit(main())
