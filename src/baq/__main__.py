"""``python -m baq ...``: the command line of the ``baq`` script, for environments where the
script is not on PATH (or to pick the interpreter explicitly)."""

import sys

from baq.cli import main

sys.exit(main())
