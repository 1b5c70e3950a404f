"""The batch job checks every row before anything is written (one line naming file, line or row, and
id), refuses a folder mixing formats, takes a single JSON lines file's line numbers as ids, and
leaves no process behind when its driver is killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from endor_ray.jobs.generate import main

ROOT = Path(__file__).resolve().parents[1]
LONG_PROMPT = " ".join(["word"] * 300)  # > the tiny stores' 128-token context


def _run_refused(store: str, source: Path, out: Path, capsys, *words: str) -> str:
    """main() exits 1 with one error line holding `words`, and writes nothing."""
    assert main(["--store", store, "--input", str(source), "--output", str(out), "--max-new-tokens", "4"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("endor-job: error: ")]
    assert len(errors) == 1, err[-3000:]
    assert all(word in errors[0] for word in words), errors[0]
    assert "Traceback" not in err
    assert not out.exists()  # no _job.json, no part
    return errors[0]


ROWS = {  # name -> (lines as bytes, words the error names)
    "a null prompt": ([b'{"id": "a", "prompt": "x"}', b'{"id": "b", "prompt": null}'], ["line 2", "'b'", "null"]),
    "a number as prompt": ([b'{"id": "a", "prompt": "x"}', b'{"id": "b", "prompt": 5}'], ["line 2", "'b'", "int"]),
    "a list as prompt": ([b'{"id": "a", "prompt": ["x"]}'], ["line 1", "'a'", "list"]),
    "non-UTF-8 text": ([b'{"id": "a", "prompt": "x"}', b'{"id": "b", "prompt": "caf\xe9"}'], ["line 2", "UTF-8"]),
    "a lone surrogate": ([b'{"id": "a", "prompt": "x"}', b'{"id": "b", "prompt": "\\ud800"}'],
                         ["line 2", "'b'", "surrogate"]),
    "a 50 MB line": ([b'{"id": "a", "prompt": "x"}', b'{"id": "b", "prompt": "' + b"x" * (50 << 20) + b'"}'],
                     ["line 2", "more than"]),
    "a prompt longer than the context": ([b'{"id": "a", "prompt": "x"}', json.dumps({"id": "b", "prompt": LONG_PROMPT})
                                          .encode()], ["line 2", "'b'", "exceeds the model's context of 128"]),
    "a bool id": ([b'{"id": true, "prompt": "x"}'], ["line 1", "True", "strings or integers"]),
    "a 5000-digit id": ([b'{"id": ' + b"9" * 5000 + b', "prompt": "x"}'], ["line 1", "cannot read"]),
    "an array line": ([b'["x"]'], ["line 1", "JSON object"]),
}


@pytest.mark.parametrize("case", list(ROWS))
def test_a_bad_row_is_refused_before_anything_is_written(tiny_stores, tmp_path, capsys, case):
    lines, words = ROWS[case]
    source = tmp_path / "prompts.jsonl"
    source.write_bytes(b"".join(line + b"\n" for line in lines))
    _run_refused(str(tiny_stores["opt"]), source, tmp_path / "out", capsys, "prompts.jsonl", *words)


def test_bad_parquet_rows_name_file_row_and_id(tiny_stores, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x", "y"]}), folder / "1.parquet")
    pq.write_table(pa.table({"id": ["c", "d"], "prompt": ["z", None]}), folder / "2.parquet")
    _run_refused(str(tiny_stores["opt"]), folder, tmp_path / "out", capsys, "2.parquet row 2", "'d'", "null")
    pq.write_table(pa.table({"id": ["c", "d"], "prompt": ["z", LONG_PROMPT]}), folder / "2.parquet")
    _run_refused(str(tiny_stores["opt"]), folder, tmp_path / "out", capsys, "2.parquet row 2", "'d'", "context")
    pq.write_table(pa.table({"id": ["c", "a"], "prompt": ["z", "w"]}), folder / "2.parquet")
    _run_refused(str(tiny_stores["opt"]), folder, tmp_path / "out", capsys, "2.parquet row 2", "'a' appears twice",
                 "1.parquet row 1")


def test_a_folder_mixing_formats_is_refused_naming_the_files(tiny_stores, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    (folder / "c.jsonl").write_text('{"id": "c", "prompt": "z"}\n')
    pq.write_table(pa.table({"id": ["d"], "prompt": ["w"]}), folder / "d.parquet")
    _run_refused(str(tiny_stores["opt"]), folder, tmp_path / "out", capsys, "mixes", "a.jsonl, c.jsonl", "d.parquet")
    (folder / "d.parquet").unlink()
    (folder / "notes.txt").write_text("hello")
    _run_refused(str(tiny_stores["opt"]), folder, tmp_path / "out", capsys, "neither", "notes.txt")


def test_only_a_single_jsonl_file_may_go_without_ids(tiny_stores, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "x"}\n')
    _run_refused(str(tiny_stores["opt"]), folder, tmp_path / "out", capsys, "no 'id' column", "line numbers")
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "p.parquet")
    _run_refused(str(tiny_stores["opt"]), tmp_path / "p.parquet", tmp_path / "out", capsys, "no 'id' column")
    (tmp_path / "half.jsonl").write_text('{"prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    _run_refused(str(tiny_stores["opt"]), tmp_path / "half.jsonl", tmp_path / "out", capsys, "line 1",
                 "row without an id")


def test_checking_2000_rows_up_front_is_cheap(tiny_stores, tmp_path):
    """Reading, checking and tokenizing 2000 rows: measured (printed), bounded loosely (shared CI)."""
    from endor_ray.jobs.config import JobConfig
    from endor_ray.jobs.generate import check_input

    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{index}", "prompt": f"The number {index} is, they say,"}) + "\n"
                              for index in range(2000)))
    config = JobConfig(store=str(tiny_stores["opt"]), input=str(source), output=str(tmp_path / "out"))
    check_input(config)  # warm-up: the tokenizer's first load
    started = time.perf_counter()
    rows = check_input(config)
    wall = time.perf_counter() - started
    print(f"check_input on 2000 rows: {wall:.3f} s (load {os.getloadavg()[0]:.1f})")
    assert len(rows.ids) == 2000 and wall < 20
    assert not (tmp_path / "out").exists()


def _ray_processes(needle: str) -> list[str]:
    """Processes whose environment or command line names `needle` (this test's RAY_TMPDIR)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                env, cmd = (entry / "environ").read_bytes(), (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle.encode() in env or needle.encode() in cmd:
                command = cmd.replace(b"\0", b" ").decode(errors="replace")[:120]
                found.append(f"{entry.name} {command}")
    return found


@pytest.mark.slow
def test_line_number_ids_and_nothing_left_after_kill_9(tiny_stores, tmp_path):
    """One file without ids: killed with -9 (the driver alone) mid-run, no Ray process outlives it;
    the rerun completes with the line numbers as ids, each exactly once, and says so."""
    import tempfile

    from endor_ray.jobs.parts import PartFolder

    source = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": f"The number {index} is"}) for index in range(120)]
    lines[5] = ""  # a blank line: skipped, and it keeps its number
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="ejc-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    command = [sys.executable, "-m", "endor_ray.jobs.generate", "--store", str(tiny_stores["opt"]), "--input",
               str(source), "--output", str(out), "--max-new-tokens", "4", "--batch-size", "4", "--gpu-memory", "0"]
    try:
        job = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not list(out.glob("part-*.parquet")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.poll() is None, job.stderr.read().decode()[-3000:]
        assert _ray_processes(ray_tmp), "the job's Ray was not found: the check below would prove nothing"
        os.kill(job.pid, signal.SIGKILL)  # the driver only: its local Ray must go with it
        killed = time.monotonic()
        job.wait(timeout=30)
        left = _ray_processes(ray_tmp)
        while left and time.monotonic() < killed + 30:
            time.sleep(0.1)
            left = _ray_processes(ray_tmp)
        gone_s = time.monotonic() - killed
        print(f"after kill -9 of the driver, its Ray processes were gone in {gone_s:.1f} s")
        # The watchdog (service/reaper.py) kills them at once (0.2 s measured); Ray's own fate sharing
        # alone took 3.0 s here (workers outlive their raylet until they notice), and left two behind
        # in the report of issue 21.
        assert not left and gone_s < 2.0, (gone_s, left)
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "its line number" in done.stderr
    finally:
        for line in _ray_processes(ray_tmp):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    ids = PartFolder(str(out)).read_all().column("id").to_pylist()
    assert sorted(ids, key=int) == [str(number) for number in range(1, 121) if number != 6]
