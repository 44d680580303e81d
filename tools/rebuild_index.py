"""Rebuild a VUA store's index from its fragment tree: ``vua rebuild-index`` as a script.

uv run tools/rebuild_index.py ROOT [--index-path DIR] [--workers N] [--json]
"""

import sys

from vua.cli import main

if __name__ == "__main__":
    sys.exit(main(["rebuild-index", *sys.argv[1:]]))
