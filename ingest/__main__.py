"""``python -m ingest [options]``: the same as ``cityops ingest [options]``."""

import sys

from cityops.cli import main

sys.exit(main(["ingest", *sys.argv[1:]]))
