"""The GPU check script's CPU dry run: the same steps as on a GPU (kernels bit-exact against the
reference decode, engine tokens against transformers, one Serve request), tiny sizes, through the
same shell entry point a GPU machine runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, timeout=540, cwd=ROOT)
    report = json.loads((tmp_path / "gpu_check-cpu-dry-run.json").read_text())
    steps = report["steps"]
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert report["ok"] and report["dry_run"]
    assert steps["kernels"]["ok"] and steps["kernels"]["bit_identical"] and steps["kernels"]["cases"] >= 30
    assert all(steps["engine"][name]["identical"] for name in ("dense", "int8", "int4-sparse"))
    assert steps["serve"]["ok"] and steps["serve"]["usage"]["completion_tokens"] >= 1
    assert steps["kernel_bench"]["skipped"] and steps["offload_bench"]["skipped"]


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--dry-run" in done.stderr
