"""The package's type hints hold: mypy over ``vua/`` (settings in pyproject.toml) reports nothing.

``vua`` ships ``py.typed``, so users' type checkers read these hints; a wrong one misleads
them. Running the check as a test puts it in CI through the README's test command.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@unittest.skipIf(importlib.util.find_spec("mypy") is None, "mypy is not installed (it is in the test group)")
class TypeCheckTest(unittest.TestCase):
    def test_mypy_is_clean(self):
        checked = subprocess.run(
            [sys.executable, "-m", "mypy", "--no-color-output", "--no-error-summary"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(checked.returncode, 0, f"mypy found problems:\n{checked.stdout}{checked.stderr}")
