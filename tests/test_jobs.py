"""The batch job (endor_ray.jobs.generate): input validation and atomic writes in-process, without
Ray; then the real thing: `ray job submit` to a `ray start --head` cluster of its own (own ports,
stopped at the end, nothing left behind), run twice to check that a second run only adds new ids.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from endor_ray.jobs.generate import OUTPUT_SCHEMA, main, read_prompts, write_atomically

RAY = Path(sys.executable).with_name("ray")
PROMPTS = ["The capital of France is", "Once upon a time there was a", "Hi", "Hello, my name is", "1, 2, 3,"]
IDS = ["a", "1", "c", "3", "e"]  # "1" and "3" are row numbers: those lines carry no id


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def prompt_lines(count: int) -> list[str]:
    return [json.dumps({"prompt": prompt} if prompt_id.isdigit() else {"id": prompt_id, "prompt": prompt})
            for prompt_id, prompt in zip(IDS[:count], PROMPTS[:count])]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a"}', '{"prompt": '], "line 2: not valid JSON"),
    (['{"prompt": "a"}', "", '[1, 2]'], "line 3: expected a JSON object"),
    (['{"id": "x"}'], "line 1: no 'prompt' field"),
    (['{"prompt": 3}'], "line 1: 'prompt' must be a non-empty string"),
    (['{"prompt": "ok"}', '{"prompt": ""}'], "line 2: 'prompt' must be a non-empty string"),
    (['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], "line 2: duplicate id 'x' (first at line 1)"),
    (['{"prompt": "a"}', '{"prompt": "b", "id": 0}'], "duplicate id '0'"),  # a given id meets a row number
    (['{"prompt": "a", "id": [1]}'], "'id' must be a string or an integer"),
    ([], "holds no prompts"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, lines, message):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", lines)
    argv = ["--store", "/nowhere", "--input", str(prompts), "--output", str(tmp_path / "out.parquet")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("endor-job: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out.parquet").exists()


def test_missing_input_and_foreign_output(tmp_path, capsys):
    assert main(["--store", "/nowhere", "--input", str(tmp_path / "none.jsonl"), "--output", "o.parquet"]) == 1
    assert "input file" in capsys.readouterr().err
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_lines(1))
    (tmp_path / "out.parquet").write_text("not parquet")
    assert main(["--store", "/nowhere", "--input", str(prompts), "--output", str(tmp_path / "out.parquet")]) == 1
    assert "exists but is not this job's output" in capsys.readouterr().err


def test_parquet_input_with_chosen_columns(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "key": [None, "k"]}), path)
    assert read_prompts(path, prompt_column="text", id_column="key") == [("0", "x"), ("k", "y")]
    pq.write_table(pa.table({"text": ["x", None]}), path)
    with pytest.raises(Exception, match="row 1: 'text' must be a non-empty string"):
        read_prompts(path, prompt_column="text")


def test_nothing_to_do_needs_no_cluster(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_lines(2))
    rows = [{"id": prompt_id, "prompt": prompt, "text": "t", "token_ids": [1], "finish_reason": "length",
             "num_tokens": 1} for prompt_id, prompt in zip(IDS[:2], PROMPTS[:2])]
    write_atomically(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), tmp_path / "out.parquet")
    # the store does not exist: the job must see that every id is done before it touches it
    assert main(["--store", "/nowhere", "--input", str(prompts), "--output", str(tmp_path / "out.parquet")]) == 0
    assert "2 already in" in capsys.readouterr().err


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "out.parquet"
    first = pa.Table.from_pylist([{"id": "a", "prompt": "p", "text": "t", "token_ids": [1, 2],
                                   "finish_reason": "length", "num_tokens": 2}], schema=OUTPUT_SCHEMA)
    write_atomically(first, out)

    def interrupted(table, where):
        Path(where).write_bytes(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(pa.concat_tables([first, first]), out)
    monkeypatch.undo()
    assert pq.read_table(out).equals(first)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.parquet"]


# --- end to end: ray start --head, ray job submit -------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def processes_mentioning(needle: str) -> list[int]:
    """Pids whose command line contains `needle` (to find what this test's cluster left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A single-node Ray of this module's own (own ports, so other clusters on the machine are left
    alone), with the job API on 127.0.0.1. Yields (dashboard URL, environment for Ray commands)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",  # loopback only; real clusters keep token auth on
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keeps the head on 127.0.0.1
    gcs_port, dashboard_port, agent_port, client_port = free_ports(4)
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    # Its own temp dir: a job's driver joins the cluster named in TEMP_DIR/ray_current_cluster, which
    # in the shared /tmp/ray is whichever Ray started last on this machine. (Short: socket paths
    # inside it are limited to 107 bytes.)
    temp_dir = tempfile.mkdtemp(prefix="endor-ray-", dir="/tmp")
    with open(log, "w") as log_file:
        # --block: this process owns the node; SIGTERM to it stops exactly this cluster (`ray stop`
        # would stop every Ray on the machine).
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent_port}",
             f"--ray-client-server-port={client_port}", "--disable-usage-stats"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=5).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        # The node's processes name its temp dir (workers do not, but they end with their raylet).
        deadline = time.monotonic() + 20
        while processes_mentioning(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = processes_mentioning(temp_dir)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"processes of the test's Ray cluster outlived it: {leftovers}"


def submit(url: str, env: dict, workdir: Path, *job_args: str, succeed: bool = True) -> str:
    """Run the job through `ray job submit` (it waits for the end); its output (the job's log)."""
    command = [RAY, "job", "submit", "--address", url, "--working-dir", str(workdir), "--",
               sys.executable, "-m", "endor_ray.jobs.generate", *job_args]  # the venv's python: see below
    for _ in range(10):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        if "No available agent" not in done.stderr:  # the head's job agent registers a few s late
            break
        time.sleep(2)
    assert (done.returncode == 0) == succeed, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_job_submit_generates_then_resumes(ray_head, tiny_stores, tmp_path):
    """Greedy completions equal the in-process engine's; a second run adds only the new ids."""
    from endor_ray.engine import Engine, EngineConfig
    from endor_ray.engine.sampling import SamplingParams

    url, env = ray_head
    store = str(tiny_stores["llama-gqa"])
    with Engine(store, EngineConfig(gpu_memory=0), progress=False) as engine:
        # the same batches as the job's (--batch-size 2): [a, 1], [c], then the second run's [3, e]
        completions = [completion for batch in (PROMPTS[:2], PROMPTS[2:3], PROMPTS[3:5])
                       for completion in engine.generate(batch, SamplingParams(max_new_tokens=4)).completions]
    expected = [completion.token_ids for completion in completions]
    expected_text = [completion.text for completion in completions]

    workdir = tmp_path / "job"  # uploaded as the job's working directory: --input is relative to it
    workdir.mkdir()
    out = tmp_path / "results" / "out.parquet"
    # A job's entrypoint runs with the PATH of whoever started the head, so a bare `python` may not be
    # the venv's: submit() names sys.executable.
    job_args = ["--store", store, "--input", "prompts.jsonl", "--output", str(out),
                "--max-new-tokens", "4", "--gpu-memory", "0", "--batch-size", "2"]

    write_jsonl(workdir / "prompts.jsonl", prompt_lines(3))
    log = submit(url, env, workdir, *job_args)
    assert "generated 3 new rows" in log and "3/3 rows done" in log
    first = pq.read_table(out)
    assert first.schema.equals(OUTPUT_SCHEMA)
    assert first.column("id").to_pylist() == IDS[:3]
    assert first.column("prompt").to_pylist() == PROMPTS[:3]
    assert first.column("token_ids").to_pylist() == expected[:3]
    assert first.column("text").to_pylist() == expected_text[:3]
    assert all(1 <= count for count in first.column("num_tokens").to_pylist())

    write_jsonl(workdir / "prompts.jsonl", prompt_lines(5))
    log = submit(url, env, workdir, *job_args)
    assert "3 already in" in log and "generated 2 new rows" in log
    second = pq.read_table(out)
    assert second.slice(0, 3).equals(first)  # the finished rows are untouched
    assert second.column("id").to_pylist() == IDS
    assert second.column("token_ids").to_pylist() == expected
    assert second.column("num_tokens").to_pylist() == [len(ids) for ids in expected]
    assert sorted(path.name for path in out.parent.iterdir()) == ["out.parquet"]  # no temporary files left

    # A relative output would land in Ray's temporary copy of the working directory: refused at once
    relative = [*job_args[:4], "--output", "out.parquet", *job_args[6:]]
    log = submit(url, env, workdir, *relative, succeed=False)
    assert "--output out.parquet is relative" in log and "which Ray deletes" in log
    # so is a store the job's node cannot read, with the reason it may be missing
    log = submit(url, env, workdir, "--store", "stores/nope", *relative[2:4], "--output", str(tmp_path / "x.parquet"),
                 succeed=False)
    assert "not an endor store" in log and ".gitignore" in log
