"""``python -m sedir_utils``: the command line (sedir_utils/run/cli.py)."""

import sys

from sedir_utils.run.cli import main

sys.exit(main())
