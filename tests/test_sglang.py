"""SGLang with VUA as its HiCache storage tier, through SGLang's own code: host pools, backend factory, controller.

Each case runs tests/sglang/run_backend.py in the SGLang environment (tests/sglang/env.py
builds it on first use, a few minutes) as SGLang would run the backend: real MHA and MLA
host pools on the CPU in each layout, VUAStorage created by the ``dynamic`` factory. Pages
go from one process to another (and between layouts of one byte order), damage shortens the run of
pages and raises nothing, SGLang's fault injector never makes a wrong page count as
loaded, the controller's backup and prefetch threads move pages through VUA, two nodes
share pages on GlusterFS, and the ``vua`` command sees SGLang's pages like any others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import unittest

from tests.glusterfs import GlusterVolume
from tests.helpers import flip_byte, fragment_path, run_cli
from tests.sglang import env

LAYOUTS = ("layer_first", "page_first", "page_first_direct")


class SGLangBackendTest(unittest.TestCase):
    python: str

    @classmethod
    def setUpClass(cls) -> None:
        reason = env.unsupported_reason()
        if reason:
            raise unittest.SkipTest(reason)
        started = time.monotonic()
        try:
            cls.python = env.python()
        except RuntimeError as exc:
            raise unittest.SkipTest(f"the SGLang environment could not be built: {exc}") from None
        print(f"sglang tests: environment ready in {time.monotonic() - started:.0f} s", flush=True)

    def setUp(self) -> None:
        self.work = tempfile.mkdtemp(prefix="vua-sglang-")
        self.addCleanup(shutil.rmtree, self.work, ignore_errors=True)
        self.root = os.path.join(self.work, "root")

    def run_backend(self, environment: dict | None = None, **args):
        args.setdefault("root", self.root)
        args.setdefault("index", os.path.join(self.work, f"index-{time.monotonic_ns()}"))
        done = subprocess.run(
            [self.python, "-m", "tests.sglang.run_backend", json.dumps(args)],
            cwd=env.REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **(environment or {})},
        )
        self.assertEqual(done.returncode, 0, done.stdout[-2000:] + done.stderr[-3000:])
        return json.loads(done.stdout.splitlines()[-1])

    def test_pages_go_from_one_process_to_another_exactly_and_between_layouts_of_one_byte_order(self):
        # MHA pages are stored in the pool's own byte order: layer_first and page_first_direct
        # share one (each layer's K and V token-major), page_first has its own (the whole
        # page token-major), so a page_first pool finds none of the others' pages and the
        # others none of its. MLA pages load into every layout.
        cases = (
            ("mha", "layer_first", "tp0of1/mha-layer", {"layer_first", "page_first_direct"}),
            ("mha", "page_first", "tp0of1/mha-page", {"page_first"}),
            ("mla", "layer_first", "mla/mla", set(LAYOUTS)),
        )
        for seed, (kind, written_in, namespace, shared_with) in enumerate(cases, start=1):
            put = self.run_backend(op="put", kind=kind, layout=written_in, pages=5, seed=seed)
            self.assertEqual(put["wrapped"], "VUAStorage")
            self.assertEqual(put["stored"], [True] * 5)
            self.assertEqual(put["metrics"]["backup_pgs"], 5)
            self.assertEqual(put["namespace"], f"sglang/test/model/{namespace}")
            runs = [{"layout": layout, "index": os.path.join(self.work, f"{seed}-{layout}")} for layout in LAYOUTS]
            if kind == "mha":  # another rank's pages are another namespace: rank 1 finds none of rank 0's
                runs.append({"layout": written_in, "tp_rank": 1, "tp_size": 2})
            gets = self.run_backend(op="get", kind=kind, keys=put["keys"], seed=10 + seed, runs=runs)
            for layout, got in zip(LAYOUTS, gets):
                with self.subTest(kind=kind, written_in=written_in, read_in=layout):
                    if layout in shared_with:
                        self.assertEqual((got["exists"], got["got"]), (5, [True] * 5))
                        self.assertEqual(got["pages"], put["pages"])  # bit for bit
                        self.assertEqual(got["metrics"]["vua"]["groups_loaded"], 5)
                    else:
                        self.assertEqual((got["exists"], got["got"]), (0, [False] * 5))
            if kind == "mha":
                self.assertEqual((gets[-1]["exists"], gets[-1]["got"]), (0, [False] * 5))

    def test_damaged_truncated_and_missing_pages_end_the_run_without_an_error(self):
        put = self.run_backend(op="put", kind="mha", layout="page_first", pages=6, seed=3)
        paths = [fragment_path(self.root, p) for p in put["paths"]]
        flip_byte(paths[4], -5)  # data damage: its checksum fails on reading
        index = os.path.join(self.work, "reader")
        got = self.run_backend(op="get", kind="mha", layout="page_first", keys=put["keys"], index=index)
        self.assertEqual(got["got"], [True] * 4 + [False] * 2)
        self.assertEqual(got["pages"][:4], put["pages"][:4])
        with open(paths[2], "r+b") as f:
            f.truncate(os.path.getsize(paths[2]) - 100)
        os.unlink(paths[1])
        got = self.run_backend(op="get", kind="mha", layout="page_first", keys=put["keys"], index=index)
        # The index still lists pages 1 to 3 (it is a cache: only reading finds a file gone or cut).
        self.assertEqual((got["exists"], got["got"]), (4, [True] + [False] * 5))
        self.assertEqual(got["pages"][0], put["pages"][0])
        got = self.run_backend(op="get", kind="mha", layout="page_first", keys=put["keys"], index=index)
        self.assertEqual((got["exists"], got["got"]), (1, [True] + [False] * 5))  # the missing page is forgotten

    def test_a_hung_store_answers_misses_at_the_deadline_and_never_touches_the_pool_afterwards(self):
        # bounded_io: what shared roots get by default (this root is local). SGLang frees a
        # call's pages as soon as it returns, so nothing may write them (a late load) or read
        # them (a late save) after that.
        bounded = {"bounded_io": True, "load_timeout": 0.3, "load_timeout_per_gib": 0, "unhealthy_seconds": 0}
        put = self.run_backend(op="put", kind="mha", layout="page_first", pages=4, seed=12, extra=bounded)
        self.assertEqual(put["stored"], [True] * 4)
        got = self.run_backend(op="get", kind="mha", layout="page_first", keys=put["keys"], extra=bounded, freeze=True)
        self.assertEqual(got["exists"], 4)  # the index answers
        self.assertEqual(got["got"], [False] * 4)  # the load passed its deadline
        self.assertTrue(got["late_read_done"])
        self.assertTrue(got["pages_untouched"])  # the late read landed in staging alone
        self.assertEqual(got["metrics"]["vua"]["groups_loaded"], 4)
        # A save past its deadline stores the pages as they were at the call, from its own copy.
        late = self.run_backend(op="put", kind="mha", layout="page_first", pages=3, seed=13, extra=bounded, freeze=True)
        self.assertEqual(late["stored"], [False] * 3)
        self.assertTrue(late["late_write_done"])
        back = self.run_backend(op="get", kind="mha", layout="page_first", keys=late["keys"], extra=bounded)
        self.assertEqual(back["got"], [True] * 3)
        self.assertEqual(back["pages"], late["pages"])

    def test_flat_pages_without_interface_v1(self):
        put = self.run_backend(op="put", kind="mha", layout="layer_first", pages=3, seed=4, flat=True)
        self.assertEqual(put["stored"], [True] * 3)
        self.assertTrue(put["namespace"].endswith("/flat"))
        got = self.run_backend(op="get", kind="mha", layout="layer_first", keys=put["keys"], flat=True)
        self.assertEqual((got["exists"], got["got"], got["pages"]), (3, [True] * 3, put["pages"]))

    def test_sglangs_fault_injector_never_makes_a_wrong_page_count(self):
        put = self.run_backend(op="put", kind="mha", layout="page_first", pages=8, seed=5)
        faults = {
            "SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE": "0.3",
            "SGLANG_TEST_HICACHE_BACKEND_RANDOM_DELAY": "0.01",
        }
        runs = [{"index": os.path.join(self.work, f"faults-{i}")} for i in range(4)]
        for got in self.run_backend(faults, op="get", kind="mha", layout="page_first", keys=put["keys"], runs=runs):
            self.assertEqual(got["wrapped"], "HiCacheStorageFailureInjector")
            loaded = sum(got["got"])
            self.assertEqual(got["got"], [True] * loaded + [False] * (8 - loaded))
            self.assertEqual(got["pages"][:loaded], put["pages"][:loaded])

    def test_hicache_controller_backs_up_and_prefetches_through_vua(self):
        out = self.run_backend(op="controller", kind="mha", layout="page_first")
        self.assertEqual(out["backend"], "VUAStorage")
        self.assertEqual((out["vua"]["groups_saved"], out["vua"]["groups_loaded"]), (3, 3))

    def test_the_extra_configs_in_the_docs_start_the_backend(self):
        found = 0
        for page in ("README.md", os.path.join("docs", "sglang.md")):
            with open(os.path.join(env.REPO, page), encoding="utf-8") as f:
                text = f.read()
            for config in re.findall(r"--hicache-storage-backend-extra-config '(\{.*?\})'", text, re.DOTALL):
                with self.subTest(page):
                    root = os.path.join(self.work, f"docs-{found}")
                    text = config.replace("/mnt/kv", root).replace("/var/lib/vua-index", root + "-index")
                    extra = json.loads(text)
                    put = self.run_backend(op="put", kind="mha", layout="page_first", pages=2, extra_config=extra)
                    got = self.run_backend(
                        op="get", kind="mha", layout="page_first", keys=put["keys"], extra_config=extra
                    )
                    self.assertEqual((put["stored"], got["got"], got["pages"]), ([True] * 2, [True] * 2, put["pages"]))
                    found += 1
        self.assertEqual(found, 2)

    def test_with_auth_key_file_pages_sealed_with_another_key_are_not_loaded(self):
        secrets_dir = os.path.join(self.work, "secrets")
        os.mkdir(secrets_dir)
        keys = {}
        for name, secret in (("ours", b"k" * 32), ("theirs", b"t" * 32)):
            keys[name] = os.path.join(secrets_dir, name)
            with open(keys[name], "wb") as f:
                f.write(secret)

        def extra(name: str) -> dict:
            return {
                "backend_name": "vua",
                "module_path": "vua.sglang",
                "class_name": "VUAStorage",
                "interface_v1": 1,
                "root": self.root,
                "index_path": os.path.join(self.work, f"index-{name}"),
                "auth_key_file": keys[name],
            }

        put = self.run_backend(op="put", kind="mha", layout="page_first", pages=3, seed=8, extra_config=extra("ours"))
        runs = [{"extra_config": extra("ours")}, {"extra_config": extra("theirs")}]
        ours, theirs = self.run_backend(op="get", kind="mha", layout="page_first", keys=put["keys"], runs=runs)
        self.assertEqual((ours["got"], ours["pages"]), ([True] * 3, put["pages"]))
        self.assertEqual(theirs["got"], [False] * 3)  # the MAC does not verify under another secret

    def test_the_vua_command_sees_sglang_pages(self):
        self.run_backend(op="put", kind="mha", layout="page_first", pages=4, seed=6)
        self.run_backend(op="put", kind="mla", layout="page_first", pages=3, seed=6)
        index = os.path.join(self.work, "cli-index")
        status, out, err = run_cli("verify", self.root, "--index-path", index, "--json")
        self.assertEqual((status, json.loads(out)["fragments"]), (0, 7), out + err)
        status, out, err = run_cli("gc", self.root, "--index-path", index, "--max-bytes", "0", "--json")
        self.assertEqual((status, json.loads(out)["groups_evicted"]), (0, 7), err)


class SGLangTwoNodesTest(unittest.TestCase):
    """Two processes on two GlusterFS mounts of one volume, each with its own index, share pages."""

    def test_a_page_stored_on_one_node_loads_on_the_other(self):
        if env.unsupported_reason():
            raise unittest.SkipTest(env.unsupported_reason())
        try:
            python = env.python()
        except RuntimeError as exc:
            raise unittest.SkipTest(f"the SGLang environment could not be built: {exc}") from None
        volume = GlusterVolume.create()  # or SkipTest saying why not
        self.addCleanup(volume.destroy)
        local = tempfile.mkdtemp(prefix="vua-sglang-nodes-")
        self.addCleanup(shutil.rmtree, local, ignore_errors=True)

        def node(mount: str, name: str, **args) -> dict:
            args.update(root=os.path.join(mount, "sglang-store"), index=os.path.join(local, name), kind="mha")
            done = subprocess.run(
                [python, "-m", "tests.sglang.run_backend", json.dumps(args)],
                cwd=env.REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.assertEqual(done.returncode, 0, done.stderr[-3000:])
            return json.loads(done.stdout.splitlines()[-1])

        put = node(volume.node_a, "a", op="put", layout="layer_first", pages=4, seed=7)
        got = node(volume.node_b, "b", op="get", layout="page_first_direct", keys=put["keys"])
        self.assertEqual((got["exists"], got["got"], got["pages"]), (4, [True] * 4, put["pages"]))


if __name__ == "__main__":
    unittest.main()
