"""The engine integrations stand on VUA's public API alone: they import no private module of VUA's.

``vua.vllm`` and ``vua.integrations`` are what a third party writing an integration (an
SGLang backend, another engine) would write; if they need a private module, so would that
third party, and that need belongs in ``vua.integration`` or ``vua.core``.
"""

from __future__ import annotations

import ast
import os
import unittest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vua")
PUBLIC = {"vua", "vua.core", "vua.errors", "vua.integration", "vua.serdes"}
INTEGRATIONS = ("vllm", "integrations")


def vua_imports(path: str) -> set[str]:
    """Every ``vua...`` module a file imports (``from vua import x`` counts as ``vua.x`` when x is a module)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "vua")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vua":
            found.add(node.module)
            if node.module == "vua":
                # `from vua import _wordsum` names a module; `from vua import KVDestination` does not.
                found.update(
                    f"vua.{a.name}" for a in node.names if os.path.exists(os.path.join(PACKAGE, f"{a.name}.py"))
                )
    return found


class IntegrationImportsTest(unittest.TestCase):
    def test_integrations_import_only_public_modules(self):
        offending = {}
        for package in INTEGRATIONS:
            for name in sorted(os.listdir(os.path.join(PACKAGE, package))):
                if not name.endswith(".py"):
                    continue
                own = f"vua.{package}"
                private = {
                    m
                    for m in vua_imports(os.path.join(PACKAGE, package, name))
                    if m not in PUBLIC and not m.startswith(own)
                }
                if private:
                    offending[f"vua/{package}/{name}"] = sorted(private)
        self.assertEqual(offending, {})

    def test_the_check_sees_a_private_import(self):
        # The check itself: a module that imports a private one is caught, in both spellings.
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write("from vua import _wordsum, KVDestination\nimport vua._mac\nfrom vua.core import VUA\n")
        self.addCleanup(os.unlink, f.name)
        self.assertEqual(vua_imports(f.name) - PUBLIC, {"vua._wordsum", "vua._mac"})


if __name__ == "__main__":
    unittest.main()
