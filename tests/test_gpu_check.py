"""`benchmarks/gpu_check.py`, the one-command check of the GPU path, in its CPU dry run (`--device cpu --tiny`): every
check runs on a tiny model, so the script cannot rot between the rare windows in which a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_the_gpu_checks_dry_run_passes_and_reports_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    for name in ("mismatch/fp32/kv", "mismatch/fp32/hf", "update/gae", "update/grpo", "resume"):
        assert checks[name]["pass"] is True, (name, checks[name])
    assert checks["mismatch/fp32/kv"]["value"] < 1e-3
    for name in ("rollout_tokens_per_s/engine", "rollout_tokens_per_s/hf_generate", "ppo_step/step_s",
                 "ppo_step/update_share_of_peak", "paper_preset_hours"):
        assert checks[f"speed/tiny/{name}"]["value"] > 0, name
    assert "every correctness check passed" in done.stdout


def test_a_gpu_check_without_a_gpu_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
