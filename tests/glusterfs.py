"""A real GlusterFS volume on this machine for the multi-node tests: two FUSE mounts of one volume.

Two bricks on loopback form one distributed volume (files are spread over both by hash, as
on a real cluster), mounted twice: each mount plays one node, with its own FUSE client and
caches, and each node keeps its own LMDB index on local disk. The gluster CLI refuses
127.0.0.1 for bricks; 127.0.0.2 is loopback too and works. Needs root, /dev/fuse and
Debian's glusterfs-server and glusterfs-client (installed here with apt-get when missing).

    volume = GlusterVolume.create()   # or raises unittest.SkipTest saying why not
    ...volume.node_a, volume.node_b...
    volume.destroy()
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from collections.abc import Iterator

from tests.installs import apt_install

_PACKAGES = ["glusterfs-server", "glusterfs-client"]
_HOST = "127.0.0.2"


def _run(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done


def install() -> str | None:
    """Installs GlusterFS from Debian's packages where missing; returns why it cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "GlusterFS tests need Linux"
    if os.geteuid() != 0:
        return "GlusterFS tests need root (glusterd, FUSE mounts)"
    if not os.path.exists("/dev/fuse"):
        return "GlusterFS tests need /dev/fuse"
    if shutil.which("glusterd") and shutil.which("mount.glusterfs"):
        return None
    if not shutil.which("apt-get"):
        return "GlusterFS is not installed and there is no apt-get to install it (Debian: glusterfs-server glusterfs-client)"
    reason = apt_install(_PACKAGES)
    if reason is not None:
        return reason
    return None if shutil.which("glusterd") else "glusterd missing after installing GlusterFS"


class GlusterVolume:
    """One two-brick GlusterFS volume mounted twice (``node_a``, ``node_b``); :meth:`destroy` removes it all."""

    def __init__(self, base: str, name: str):
        self.base = base
        self.name = name
        self.node_a = os.path.join(base, "node-a")
        self.node_b = os.path.join(base, "node-b")
        self.bricks = [os.path.join(base, f"brick{i}") for i in (1, 2)]  # the servers' own directories
        self._started_glusterd = False
        self._frozen: list[int] = []  # brick servers stopped by freeze()

    @classmethod
    def create(cls) -> GlusterVolume:
        """Starts glusterd if needed, creates and starts the volume, mounts it twice.

        Raises:
            unittest.SkipTest: this machine cannot run GlusterFS (the reason says why).
        """
        reason = install()
        if reason is not None:
            raise unittest.SkipTest(reason)
        # A name of its own per volume: one process may make several (the engine tests and
        # the GlusterFS tests run in one), and a volume a failed teardown left behind must
        # not block the next one.
        volume = cls(tempfile.mkdtemp(prefix="vua-gluster-"), f"vua{os.getpid()}-{secrets.token_hex(3)}")
        try:
            volume._start()
        except BaseException:
            volume.destroy()
            raise
        return volume

    def _start(self) -> None:
        if _run("pgrep", "-x", "glusterd", check=False).returncode != 0:
            _run("glusterd")
            self._started_glusterd = True
        deadline = time.monotonic() + 30
        while _run("gluster", "--mode=script", "volume", "list", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("glusterd did not come up within 30 s")
            time.sleep(0.2)
        for brick in self.bricks:
            os.makedirs(brick)
        _run("gluster", "--mode=script", "volume", "create", self.name, *(f"{_HOST}:{b}" for b in self.bricks), "force")
        # Both bricks share this machine's disk. Below cluster.min-free-disk (10% free by
        # default) DHT places each new file on the emptier brick with a link file on its
        # hashed one, whatever its name: a CI machine whose venvs left under 10% of the disk
        # free failed the test that the fragments stay on their hashed server. A real
        # cluster's bricks are kept under that line (docs/many-nodes.md); these are too.
        _run("gluster", "--mode=script", "volume", "set", self.name, "cluster.min-free-disk", "0")
        _run("gluster", "--mode=script", "volume", "start", self.name)
        for mount in (self.node_a, self.node_b):
            os.makedirs(mount)
            _run("mount", "-t", "glusterfs", f"{_HOST}:/{self.name}", mount)
        with open("/proc/self/mounts") as mounts:
            mounted = mounts.read()
        if self.node_a not in mounted or self.node_b not in mounted:
            raise RuntimeError(f"GlusterFS mounts did not appear: {mounted}")

    def set(self, option: str, value: str) -> None:
        """Sets a volume option (``gluster volume set``)."""
        _run("gluster", "--mode=script", "volume", "set", self.name, option, value)

    def brick_processes(self) -> list[int]:
        """The pids of the volume's brick servers (glusterfsd), which hold the files."""
        done = _run("pgrep", "-f", f"glusterfsd.*--volfile-id {self.name}\\.", check=False)
        return [int(pid) for pid in done.stdout.split()]

    def freeze(self) -> None:
        """Stops every brick server (SIGSTOP), as a frozen or unreachable server: calls on the mounts hang."""
        pids = self.brick_processes()
        if not pids:
            raise RuntimeError(f"no brick process of volume {self.name} found")
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        self._frozen = pids

    def thaw(self) -> None:
        """Lets frozen brick servers run again (SIGCONT)."""
        for pid in self._frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._frozen = []

    @contextlib.contextmanager
    def slowed(self, *, stopped: float = 0.4, running: float = 0.1) -> Iterator[None]:
        """The brick servers answer only ``running`` seconds of every ``stopped + running``
        (SIGSTOP, SIGCONT, in turn), as servers under heavy load or a congested network do:
        every call on the mounts takes up to ``stopped`` seconds more."""
        done = threading.Event()

        def cycle() -> None:
            while not done.is_set():
                self.freeze()
                done.wait(stopped)
                self.thaw()
                done.wait(running)

        thread = threading.Thread(target=cycle, name="gluster-slowed", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.thaw()

    def destroy(self) -> None:
        self.thaw()  # a stopped brick would hold the SIGTERM of "volume stop" pending
        for mount in (self.node_a, self.node_b):
            if os.path.ismount(mount):
                _run("umount", "-l", mount, check=False)
        _run("gluster", "--mode=script", "volume", "stop", self.name, "force", check=False)
        _run("gluster", "--mode=script", "volume", "delete", self.name, check=False)
        if self._started_glusterd:
            _run("pkill", "-x", "glusterd", check=False)
            # Wait for it to be gone: a volume made next would otherwise find the dying daemon
            # running, not start its own, and wait for an answer that never comes.
            deadline = time.monotonic() + 30
            while _run("pgrep", "-x", "glusterd", check=False).returncode == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.base, ignore_errors=True)
