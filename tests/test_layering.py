"""The package's layering, checked from the source.

- The engine integrations stand on VUA's public API alone: they import no private module of
  VUA's. ``vua.vllm``, ``vua.sglang`` and ``vua.integrations`` are what a third party writing
  an integration would write; if they need a private module, so would that third party, and
  that need belongs in ``vua.integration`` or ``vua.core``.
- The module listing in docs/architecture.md runs bottom to top: every unit imports only
  units listed above it (a package listed whole, such as ``vllm/``, is one unit; ``_read/``
  lists its modules one by one, in the same order).
- Tests go through the public API or tests/helpers.py, the one place they reach into
  internals (issue 22): a test module imports a private module only where
  ``TEST_PRIVATE_IMPORTS`` says why.
"""

from __future__ import annotations

import ast
import os
import re
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vua")
PUBLIC = {"vua", "vua.core", "vua.errors", "vua.integration", "vua.serdes"}
INTEGRATIONS = ("vllm", "sglang", "integrations")
WHOLE_PACKAGES = ("vllm", "sglang", "integrations")  # listed as one unit each
TESTS = os.path.join(REPO, "tests")
# The private modules a test module may import; every other look inside goes through
# tests/helpers.py. Only the unit test of one private module, and fault injection that
# patches the one function it breaks (the test says which), have a place here.
TEST_PRIVATE_IMPORTS = {
    # the unit test of the word sum (its definition, host and device code)
    "test_wordsum.py": {"vua._wordsum"},
    # the unit test of the tree walk (what each depth of check finds)
    "test_tree.py": {"vua._tree"},
    # the unit test of GDS's alignment arithmetic (aligned_span), beside the read paths' tests
    "test_read_paths.py": {"vua._read._gds"},
    # fault injection: gc and a rebuild in each other's window (evict_group, write_current)
    "test_upkeep_faults.py": {"vua._evict", "vua._rebuild"},
    # fault injection: a quarantine between eviction's rename and removal (remove_moved_aside)
    "test_hostile.py": {"vua._evict"},
}


def is_module(name: str) -> bool:
    """Whether the dotted name ``vua.x.y`` is a module or package of VUA's."""
    path = os.path.join(REPO, *name.split("."))
    return os.path.exists(f"{path}.py") or os.path.exists(os.path.join(path, "__init__.py"))


def vua_imports(path: str, module: str = "") -> set[str]:
    """Every ``vua...`` module a file imports, lazy imports inside functions included.

    ``from vua import x`` counts as ``vua.x`` when x is a module; ``module`` (the file's own
    dotted name) resolves relative imports.
    """
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "vua")
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:  # relative: from the file's package up
                package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
                name = ".".join(package[: len(package) - node.level + 1] + ([name] if name else []))
            if name.split(".")[0] != "vua":
                continue
            # `from vua import _wordsum` names a module (not the package's own code), `from vua
            # import KVDestination` a name of the package's.
            modules = {f"{name}.{a.name}" for a in node.names if is_module(f"{name}.{a.name}")}
            found.update(modules)
            if len(modules) < len(node.names):
                found.add(name)
    return found


def private_imports(path: str) -> set[str]:
    """Every private module of VUA's (a ``_`` name anywhere below ``vua``) that a file imports."""
    return {m for m in vua_imports(path) if any(part.startswith("_") for part in m.split(".")[1:])}


def test_modules() -> list[str]:
    """The file name of every test module (tests/test_*.py)."""
    return sorted(name for name in os.listdir(TESTS) if name.startswith("test_") and name.endswith(".py"))


def package_modules() -> dict[str, str]:
    """Dotted name -> path of every module in the package."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                dotted = os.path.relpath(os.path.join(folder, name), REPO)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = os.path.join(folder, name)
    return modules


def unit_of(module: str) -> str:
    """The unit the architecture listing names for a module: ``vua._read._cpu`` -> ``_read/_cpu.py``."""
    parts = module.split(".")[1:]
    if parts and parts[0] in WHOLE_PACKAGES:
        return f"{parts[0]}/"
    if os.path.isdir(os.path.join(PACKAGE, *parts)):
        parts.append("__init__")
    return "/".join(parts) + ".py"


def listed_units() -> list[str]:
    """The units of docs/architecture.md's module listing, in its order (first line: bottom)."""
    with open(os.path.join(REPO, "docs", "architecture.md")) as f:
        listing = f.read().split("```text\n", 1)[1].split("```", 1)[0]
    units, package = [], ""
    for line in listing.splitlines()[1:]:
        indent = len(line) - len(line.lstrip())
        if indent == 2:  # a unit of vua/ (or a package whose modules follow, one level in)
            package = line.split()[0] if line.split()[0].endswith("/") else ""
        folder = os.path.join(PACKAGE, package) if indent == 4 else PACKAGE
        # A line names its unit first, and may name a second ("_evict.py ...; _verify.py: ...").
        for name in re.findall(r"(?<![\w./])(?:[\w/]+\.py|\w+/)", line):
            path = os.path.join(folder, name)
            if indent in (2, 4) and os.path.exists(path):
                unit = os.path.relpath(path, PACKAGE) + ("/" if name.endswith("/") else "")
                if unit not in units:
                    units.append(unit)
    return units


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

    def test_every_unit_imports_only_units_listed_above_it(self):
        units = listed_units()
        modules = package_modules()
        self.assertEqual(sorted({unit_of(m) for m in modules} - set(units)), [], "modules the listing leaves out")
        place = {unit: i for i, unit in enumerate(units)}
        upward = []
        for module, path in sorted(modules.items()):
            unit = unit_of(module)
            for imported in vua_imports(path, module):
                if imported == "vua" or imported not in modules:
                    continue  # the package's lazy names; a name imported from a module
                if place[unit_of(imported)] > place[unit]:
                    upward.append(f"{unit} imports {unit_of(imported)}")
        self.assertEqual(upward, [], "units that import a unit listed below them in docs/architecture.md")

    def test_the_check_sees_a_private_import(self):
        # The check itself: a module that imports a private one is caught, in both spellings.
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write("from vua import _wordsum, KVDestination\nimport vua._mac\nfrom vua.core import VUA\n")
        self.addCleanup(os.unlink, f.name)
        self.assertEqual(vua_imports(f.name) - PUBLIC, {"vua._wordsum", "vua._mac"})


class TestImportsTest(unittest.TestCase):
    """Tests use the public API or tests/helpers.py; TEST_PRIVATE_IMPORTS lists the exceptions."""

    def test_tests_import_only_the_private_modules_listed(self):
        offending = {}
        for name in test_modules():
            extra = private_imports(os.path.join(TESTS, name)) - TEST_PRIVATE_IMPORTS.get(name, set())
            if extra:
                offending[name] = sorted(extra)
        self.assertEqual(offending, {}, "go through tests/helpers.py, or say in TEST_PRIVATE_IMPORTS why not")

    def test_every_listed_import_is_still_made(self):
        # A stale entry would let a later test import the module unremarked.
        stale = {}
        for name, modules in TEST_PRIVATE_IMPORTS.items():
            path = os.path.join(TESTS, name)
            unused = modules - (private_imports(path) if os.path.exists(path) else set())
            if unused:
                stale[name] = sorted(unused)
        self.assertEqual(stale, {})

    def test_the_check_sees_every_spelling_of_a_private_import(self):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(
                "from vua import _layout, KVDestination\n"
                "import vua._mac\n"
                "from vua._keys import group_keys\n"
                "from vua._read import _gds\n"
                "from vua.core import VUA\n"
                "from vua.integration import word_sums\n"
                "def later():\n"
                "    from vua.vllm import _paged\n"
            )
        self.addCleanup(os.unlink, f.name)
        self.assertEqual(
            private_imports(f.name), {"vua._layout", "vua._mac", "vua._keys", "vua._read._gds", "vua.vllm._paged"}
        )


if __name__ == "__main__":
    unittest.main()
