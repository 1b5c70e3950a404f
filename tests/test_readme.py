"""The README's five-minute tour and the examples, run as written on a fresh working directory.

The tour block is taken from README.md itself and run by bash in an empty directory holding only
the project's `.venv` and `examples/` (as a clone after `make` would), so a command that changes in
the README is tested as it now reads. Nothing it prints may be a traceback or a warning the
user cannot act on.
"""

import os
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOISE = re.compile(r"Traceback|Warning|WARNING|Token authentication", re.MULTILINE)


def tour_script() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def test_the_tour_is_found():
    script = tour_script()
    assert script.startswith("source .venv/bin/activate") and "endor convert" in script and "endor serve" in script


@pytest.mark.slow
def test_readme_tour_runs_as_written(tmp_path):
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        pytest.skip("the tour needs the project's .venv (make setup)")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", tour_script()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200, env=dict(os.environ))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert not NOISE.search(output), NOISE.search(output).group(0) + " in:\n" + output[-5000:]
    assert "ratio 0.56" in done.stdout  # inspect: the layers move 0.56 of their dense bytes
    assert "model: smollm2-w50" in done.stdout  # the OpenAI client reached the server
    table = pq.read_table(tmp_path / "out" / "completions")  # the folder of parts
    assert table.num_rows == 4 and all(table.column("text").to_pylist())


@pytest.mark.slow
def test_examples_run_as_documented(smollm2_store, tmp_path):
    python = ROOT / ".venv" / "bin" / "python"
    if not python.is_file():
        pytest.skip("the examples need the project's .venv (make setup)")
    done = subprocess.run([python, ROOT / "examples" / "generate.py", smollm2_store, "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Q: What is the capital of France?" in done.stdout, done.stderr[-3000:]
    env = {**os.environ, "WORK": str(tmp_path / "work")}
    done = subprocess.run(["bash", ROOT / "examples" / "batch_job.sh", smollm2_store], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "france: The capital of France is" in done.stdout
