"""``python -m qua2sedimo …`` (see ``--help``)."""

import sys

from .nodes.cli import main

sys.exit(main())
