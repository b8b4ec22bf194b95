"""``python -m megaseg.cli ...``: the ``megaseg`` command (scripts and tests run it this way)."""

import sys

from megaseg.cli import main

sys.exit(main())
