"""``python -m vua``: the same as the ``vua`` command."""

import sys

from vua.cli import main

sys.exit(main())
