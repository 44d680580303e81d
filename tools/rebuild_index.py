"""Rebuild a VUA store's index from its fragment tree: ``vua rebuild-index`` as a script.

uv run tools/rebuild_index.py ROOT [--index-path DIR] [--workers N] [--json]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vua.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["rebuild-index", *sys.argv[1:]]))
