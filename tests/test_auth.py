"""Authenticated fragments (VUAConfig.auth_key): a writer without the key cannot make a reader accept its KV."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile

import torch

from tests.helpers import (
    StoreTestCase,
    chain_start,
    forge_group,
    fragment_metadata,
    fragment_path,
    fragment_reads,
    keyed_blake3_mac,
    overwrite,
    random_kv,
    rewrite_header,
    run_cli,
    verify_fragment_checksums,
)
from vua.core import VUAConfig
from vua.errors import InvalidInputError
from vua.integration import read_secret_file

KEY = secrets.token_bytes(32)


class AuthTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.vua = self.store(VUAConfig(split_factor=16, namespace="auth", auth_key=KEY))
        self.tokens = torch.arange(900, 948)  # three groups
        self.kv = random_kv(1, 48)
        self.vua.put(self.tokens, self.kv)
        self.keys = self.vua.config.tokens_to_paths(self.tokens)

    def forge_group(self, group: int, *, key: bytes | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Replaces a group by one holding other K/V with valid xxh3 sums, sealed with ``key`` (None: unsealed)."""
        forged = [(k + 1, v - 1) for k, v in self.kv]
        parent = self.keys[group - 1] if group else chain_start("auth")
        forge_group(
            self.root,
            forged,
            self.tokens,
            group,
            key_hex=self.keys[group],
            parent_hex=parent,
            namespace="auth",
            auth_key=key,
        )
        verify_fragment_checksums(fragment_path(self.root, self.keys[group]))  # the forgery passes every checksum
        return forged

    def assertPrefix(self, groups: int, vua=None) -> None:
        self.assertHit((vua or self.vua).get_closest(self.tokens, device="cpu"), groups, self.kv)

    def assertRefused(self, groups: int, reason: str, vua=None) -> None:
        """A get returns ``groups`` groups, the next one refused with a warning naming ``reason``."""
        with self.assertLogs("vua", level="WARNING") as logs:
            self.assertPrefix(groups, vua)
        self.assertTrue(any(reason in line for line in logs.output), logs.output)

    def test_round_trip_with_the_key(self):
        self.assertPrefix(3)
        salts = set()
        for key_hex in self.keys:
            metadata = fragment_metadata(fragment_path(self.root, key_hex))
            self.assertEqual(metadata["mac_alg"], "aes256-gmac")
            self.assertEqual(len(metadata["mac"]), 64)  # salt, then tag
            salts.add(metadata["mac"][:32])
        self.assertEqual(len(salts), 3)  # a key of its own per fragment

    def test_the_config_docstring_names_the_mac_puts_write(self):
        self.assertEqual(fragment_metadata(fragment_path(self.root, self.keys[0]))["mac_alg"], "aes256-gmac")
        doc = " ".join((VUAConfig.__doc__ or "").split())
        self.assertIn("AES-256-GMAC", doc)
        self.assertNotIn("keyed BLAKE3", doc)  # the first stores' algorithm, verified but never written

    def reseal_with_keyed_blake3(self, group: int) -> None:
        """Seals a group as the first authenticated stores were: keyed BLAKE3, no ``mac_alg``."""
        path = fragment_path(self.root, self.keys[group])

        def legacy(body: dict) -> None:
            del body["__metadata__"]["mac_alg"]
            body["__metadata__"]["mac"] = "0" * 64

        rewrite_header(path, legacy)
        with open(path, "rb") as f:
            raw = f.read()
        overwrite(path, raw.index(b'"mac":"') + 7, keyed_blake3_mac(KEY, raw).encode())

    def test_fragments_sealed_with_keyed_blake3_still_verify(self):
        self.reseal_with_keyed_blake3(1)
        self.assertPrefix(3)
        # Naming the current algorithm on a legacy MAC (or dropping it from a current one)
        # makes the MAC fail: the algorithm is part of what is authenticated.
        path = fragment_path(self.root, self.keys[1])
        rewrite_header(path, lambda body: body["__metadata__"].update(mac_alg="aes256-gmac"))
        self.assertRefused(1, "MAC does not verify")

    def test_an_unknown_mac_algorithm_is_refused(self):
        path = fragment_path(self.root, self.keys[2])
        rewrite_header(path, lambda body: body["__metadata__"].update(mac_alg="rot13"))
        self.assertRefused(2, "unknown MAC algorithm 'rot13'")

    def test_forgery_without_a_mac_is_refused(self):
        self.forge_group(1, key=None)
        self.assertRefused(1, "no MAC")

    def test_forgery_sealed_with_another_key_is_refused(self):
        self.forge_group(2, key=secrets.token_bytes(32))
        self.assertRefused(2, "MAC does not verify")
        # Refused groups are moved aside: a key holder's next put writes the real KV again.
        self.assertEqual(self.vua.put(self.tokens, self.kv), 1)
        self.assertPrefix(3)

    def secret_file(self, secret: bytes) -> str:
        """A file outside the store holding exactly ``secret``."""
        folder = tempfile.mkdtemp(prefix="vua-secret-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        path = os.path.join(folder, "secret")
        with open(path, "wb") as f:
            f.write(secret)
        return path

    def test_a_put_with_a_new_key_seals_groups_written_before_it(self):
        tokens = torch.arange(5000, 5048)
        self.store(VUAConfig(split_factor=16, namespace="auth")).put(tokens, self.kv)  # no auth_key yet
        with self.assertLogs("vua", level="WARNING"):
            self.assertEqual(self.vua.put(tokens, self.kv), 3)  # it trusted the index and wrote 0, before
        self.assertHit(self.vua.get_closest(tokens, device="cpu"), 3, self.kv)  # and this get refused them

    def test_a_secret_file_is_read_byte_for_byte(self):
        # A random secret may begin or end with a whitespace byte (about 1 in 22 do): the
        # file must give the very key VUAConfig(auth_key=...) was given, or every fragment
        # fails its MAC under vua verify and the vLLM connector.
        edgy = b"\n " + KEY[:28] + b"\t\r"
        self.assertEqual(read_secret_file(self.secret_file(edgy), "auth_key_file"), edgy)
        store = self.store(VUAConfig(split_factor=16, namespace="edgy", auth_key=edgy))
        store.put(self.tokens, self.kv)
        status, out, _ = run_cli("verify", self.root, "--auth-key-file", self.secret_file(edgy), "--json")
        report = json.loads(out)
        self.assertEqual((status, report["clean"], report["fragments"]), (1, False, 3))
        # Only the first store's three fragments (sealed with KEY) fail under this key.
        self.assertEqual(
            sorted(p["key"] for p in report["problems"] if p["kind"] == "unauthenticated-fragment"), sorted(self.keys)
        )
        with self.assertRaisesRegex(InvalidInputError, "more than 64 bytes; .* read exactly"):
            read_secret_file(self.secret_file(KEY * 3), "auth_key_file")

    def test_vua_verify_with_the_key_finds_and_removes_forgeries(self):
        self.forge_group(1, key=secrets.token_bytes(32))
        status, _, _ = run_cli("verify", self.root)
        self.assertEqual(status, 0)  # without the key the forgery is a well-formed fragment

        def verify(secret: bytes, *flags: str) -> tuple[int, dict]:
            status, out, _ = run_cli("verify", self.root, "--auth-key-file", self.secret_file(secret), "--json", *flags)
            return status, json.loads(out)

        status, report = verify(KEY)
        self.assertEqual(status, 1)
        self.assertEqual(report["fragments"], 2)
        self.assertEqual(
            [(p["kind"], p["key"]) for p in report["problems"]], [("unauthenticated-fragment", self.keys[1])]
        )
        self.assertIn("MAC does not verify", report["problems"][0]["detail"])

        # Under a wrong key nothing verifies: more likely the key than three forgeries, so
        # --fix leaves the fragments where they are.
        status, report = verify(secrets.token_bytes(32), "--fix")
        self.assertEqual(status, 1)
        self.assertEqual(len(report["problems"]), 3)
        self.assertFalse(any(p["fixed"] for p in report["problems"]))
        self.assertIn("left alone", report["problems"][0]["detail"])
        self.assertTrue(all(os.path.exists(fragment_path(self.root, k)) for k in self.keys))

        status, report = verify(KEY, "--fix")
        self.assertEqual((status, report["clean"]), (0, True))
        self.assertFalse(os.path.exists(fragment_path(self.root, self.keys[1])))
        self.assertEqual(self.vua.put(self.tokens, self.kv), 1)  # a key holder writes the real group again
        self.assertPrefix(3)
        self.assertEqual(verify(KEY)[0], 0)

    def test_vua_verify_refuses_a_secret_file_it_cannot_use(self):
        status, _, err = run_cli("verify", self.root, "--auth-key-file", os.path.join(self.root, "missing"))
        self.assertEqual(status, 2)
        self.assertIn("cannot read --auth-key-file", err)
        status, _, err = run_cli("verify", self.root, "--auth-key-file", self.secret_file(b"short"))
        self.assertEqual(status, 2)
        self.assertIn("holds 5 bytes; the store's secret is 16 to 64 bytes", err)

    def test_layerwise_loads_check_macs_before_handing_out_layers(self):
        # Layer-wise loads hand layer 0 out before the last layer is read, so the MAC must be
        # checked before the copy starts (it is, for every load, when the group is opened).
        self.forge_group(1, key=secrets.token_bytes(32))
        with self.assertLogs("vua", level="WARNING") as logs:
            load = self.vua.load(self.tokens, "cpu", layerwise=True)
            k, v = load.wait_layer(0)
            self.assertEqual(load.wait(), 1)
        self.assertTrue(any("MAC does not verify" in line for line in logs.output))
        self.assertEqual(k.shape[2], 16)
        self.assertTrue(torch.equal(k, self.kv[0][0][:, :, :16]))

    def test_network_reads_check_the_mac_over_the_bytes_they_return(self):
        # On a network root a whole-group read checks each MAC over the bytes where the
        # preadv put them, so every file is read once (not once more for the MAC on opening).
        remote = self.store(VUAConfig(split_factor=16, namespace="auth", auth_key=KEY, network_fs=True))
        with fragment_reads() as read:
            self.assertPrefix(3, remote)
        kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)
        self.assertEqual(sum(read), kv_bytes)

        self.forge_group(1, key=secrets.token_bytes(32))
        self.assertRefused(1, "MAC does not verify", remote)
        # Group 1 was moved aside (on a network root once a second full read, MAC included, showed
        # the same): a key holder's put writes it again.
        self.assertEqual(self.vua.put(self.tokens, self.kv), 1)
        # A layer-wise load on that root checks MACs on opening, before layer 0 is handed out.
        self.forge_group(2, key=secrets.token_bytes(32))
        with self.assertLogs("vua", level="WARNING") as logs:
            load = remote.load(self.tokens, "cpu", layerwise=True)
            k, _ = load.wait_layer(0)
            self.assertEqual((k.shape[2], load.wait()), (32, 2))
        self.assertTrue(any("MAC does not verify" in line for line in logs.output))

    def test_a_stolen_mac_does_not_carry_over(self):
        stolen = fragment_metadata(fragment_path(self.root, self.keys[0]))["mac"]
        self.forge_group(0, key=b"attacker-key-of-sixteen+")
        path = fragment_path(self.root, self.keys[0])
        with open(path, "rb") as f:
            start = f.read(4096).index(b'"mac":"') + 7
        overwrite(path, start, stolen.encode())  # the real group's MAC on forged data
        with self.assertLogs("vua", level="WARNING"):
            self.assertPrefix(0)

    def test_another_key_sees_nothing(self):
        other = self.store(VUAConfig(split_factor=16, namespace="auth", auth_key=secrets.token_bytes(32)))
        with self.assertLogs("vua", level="WARNING"):
            self.assertPrefix(0, other)

    def test_unsealed_store_is_not_trusted_by_a_sealed_reader(self):
        plain = self.store(VUAConfig(split_factor=16, namespace="plain"))
        plain.put(self.tokens, self.kv)
        sealed = self.store(VUAConfig(split_factor=16, namespace="plain", auth_key=KEY))
        with self.assertLogs("vua", level="WARNING"):
            self.assertIsNone(sealed.get_closest(self.tokens, device="cpu"))

    def test_key_is_validated_and_never_shown(self):
        for bad in ("a string key of some length", b"short", b"x" * 65, 12345):
            with self.subTest(bad=bad):
                with self.assertRaises(InvalidInputError) as caught:
                    self.store(VUAConfig(split_factor=16, auth_key=bad))
                self.assertIn("secrets.token_bytes(32)", str(caught.exception))
                self.assertNotIn(str(bad), str(caught.exception))
        self.assertNotIn(repr(KEY), repr(self.vua.config))
