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

from endor_ray.errors import ConfigError
from endor_ray.jobs.generate import main
from endor_ray.jobs.parts import OUTPUT_SCHEMA, PartFolder

RAY = Path(sys.executable).with_name("ray")
PROMPTS = ["The capital of France is", "Once upon a time there was a", "Hi", "Hello, my name is", "1, 2, 3,"]
IDS = ["a", "1", "c", "3", "e"]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def prompt_lines(count: int) -> list[str]:
    return [json.dumps({"id": prompt_id, "prompt": prompt}) for prompt_id, prompt in zip(IDS[:count], PROMPTS[:count])]


# --- the output folder's protocol, without Ray ------------------------------------------------------

JOB = {"store": "s", "sampling": {"max_new_tokens": 4}, "schema": 1}


def rows(*ids: str) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "prompt": "p", "text": "t", "token_ids": [1], "finish_reason": "length",
                                  "num_tokens": 1} for i in ids], schema=OUTPUT_SCHEMA)


def test_parts_are_committed_whole_and_a_folder_belongs_to_one_job(tmp_path):
    folder = PartFolder(str(tmp_path / "out"))
    folder.claim(JOB)
    folder.commit(rows("a", "b"))
    (tmp_path / "out" / "_tmp").mkdir(exist_ok=True)
    (tmp_path / "out" / "_tmp" / "part-dead.parquet").write_bytes(b"PAR1 half a part")  # a killed run's
    again = PartFolder(str(tmp_path / "out"))
    again.claim(JOB)  # the same job: fine, and the half part is gone
    assert not list((tmp_path / "out" / "_tmp").iterdir())
    again.commit(rows("c"))
    assert again.done_ids() == {"a", "b", "c"} and again.read_all().num_rows == 3
    with pytest.raises(ConfigError, match="different job.*sampling"):
        PartFolder(str(tmp_path / "out")).claim({**JOB, "sampling": {"max_new_tokens": 5}})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(rows("x"), foreign / "part-1.parquet")
    with pytest.raises(ConfigError, match="not this job's output"):
        PartFolder(str(foreign)).claim(JOB)


# --- the job in-process, on a local Ray of its own ---------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "id 'a' appears twice"),
    (['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": ""}'], "prompt of id 'b' is empty"),
    (['{"id": "a", "text": "x"}'], "no 'prompt' column"),
    # (a single file without ids now takes its line numbers: tests/test_jobs_checks.py; a folder is refused there)
    (['{"id": "a", "prompt": "x"}', '{"prompt": "y"}'], "row without an id"),
    (['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": '], "cannot read the input"),
    (['{"id": "a", "prompt": "x"}', '{"id": 2, "prompt": "y"}'], "cannot read the input"),  # mixed id types
])
def test_bad_input_is_a_one_line_error_and_nothing_is_written(local_ray, tmp_path, capsys, lines, message):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", lines)
    argv = ["--store", "/nowhere", "--input", str(prompts), "--output", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("endor-job: error: ")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert not (tmp_path / "out").exists()


def test_missing_input_and_a_store_the_job_cannot_read(local_ray, tmp_path, capsys):
    assert main(["--store", "/nowhere", "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_lines(2))
    assert main(["--store", str(tmp_path / "nope"), "--input", str(prompts), "--output", str(tmp_path / "o")]) == 1
    assert "not an endor store" in capsys.readouterr().err


def test_integer_ids_become_strings(local_ray, tiny_stores, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"id": 7, "prompt": "Hi"}), json.dumps({"id": 8, "prompt": "Ho"})])
    assert main(["--store", str(tiny_stores["opt"]), "--input", str(prompts), "--output", str(tmp_path / "out"),
                 "--max-new-tokens", "2", "--gpu-memory", "0"]) == 0
    assert sorted(PartFolder(str(tmp_path / "out")).done_ids()) == ["7", "8"]


def test_parquet_folder_input_with_chosen_columns(local_ray, tiny_stores, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"text": PROMPTS[:2], "key": ["k1", "k2"]}), folder / "a.parquet")
    pq.write_table(pa.table({"text": PROMPTS[2:4], "key": ["k3", "k4"]}), folder / "b.parquet")
    argv = ["--store", str(tiny_stores["llama-gqa"]), "--input", str(folder), "--output", str(tmp_path / "out"),
            "--prompt-column", "text", "--id-column", "key", "--max-new-tokens", "3", "--gpu-memory", "0"]
    assert main(argv) == 0
    table = PartFolder(str(tmp_path / "out")).read_all()
    assert sorted(table.column("id").to_pylist()) == ["k1", "k2", "k3", "k4"]
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows_generated"] == 4 and summary["tokens"] == table.column("num_tokens").to_pylist().__len__() * 3


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
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps the head on 127.0.0.1
           # On SIGTERM a node first drains for Serve's sake (up to 30 s, spent whole after the jobs
           # here); this cluster runs no Serve: stop at once (what outlives it is still checked below).
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
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


def by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


def test_job_submit_generates_then_resumes(ray_head, tiny_stores, tmp_path):
    """Greedy completions equal the in-process engine's; a second run adds only the new ids."""
    from endor_ray.engine import Engine, EngineConfig
    from endor_ray.engine.sampling import SamplingParams

    url, env = ray_head
    store = str(tiny_stores["llama-gqa"])
    with Engine(store, EngineConfig(gpu_memory=0), progress=False) as engine:
        expected = {prompt_id: engine.generate([prompt], SamplingParams(max_new_tokens=4)).completions[0]
                    for prompt_id, prompt in zip(IDS, PROMPTS)}

    workdir = tmp_path / "job"  # uploaded as the job's working directory: --input is relative to it
    workdir.mkdir()
    out = tmp_path / "results" / "out"
    # A job's entrypoint runs with the PATH of whoever started the head, so a bare `python` may not be
    # the venv's: submit() names sys.executable.
    job_args = ["--store", store, "--input", "prompts.jsonl", "--output", str(out),
                "--max-new-tokens", "4", "--gpu-memory", "0", "--batch-size", "2"]

    write_jsonl(workdir / "prompts.jsonl", prompt_lines(3))
    log = submit(url, env, workdir, *job_args)
    assert "3 new rows" in log
    first = PartFolder(str(out)).read_all()
    assert first.schema.equals(OUTPUT_SCHEMA) and sorted(first.column("id").to_pylist()) == sorted(IDS[:3])
    for prompt_id, row in by_id(first).items():
        assert row["token_ids"] == expected[prompt_id].token_ids and row["text"] == expected[prompt_id].text
    parts_before = sorted(p.name for p in out.glob("part-*.parquet"))

    write_jsonl(workdir / "prompts.jsonl", prompt_lines(5))
    log = submit(url, env, workdir, *job_args)
    assert "3 already in" in log and "2 new rows" in log
    second = PartFolder(str(out)).read_all()
    assert sorted(second.column("id").to_pylist()) == sorted(IDS)  # each id exactly once
    assert set(parts_before) <= {p.name for p in out.glob("part-*.parquet")}  # nothing rewritten
    for prompt_id, row in by_id(second).items():
        assert row["token_ids"] == expected[prompt_id].token_ids
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_generated"] == 2 and summary["rows_skipped"] == 3

    # A relative output would land in Ray's temporary copy of the working directory: refused at once
    relative = [*job_args[:4], "--output", "out", *job_args[6:]]
    log = submit(url, env, workdir, *relative, succeed=False)
    assert "--output out is relative" in log and "which Ray deletes" in log
    # so is a store the job's node cannot read, with the reason it may be missing
    log = submit(url, env, workdir, "--store", "stores/nope", *relative[2:4], "--output", str(tmp_path / "x"),
                 succeed=False)
    assert "not an endor store" in log and ".gitignore" in log


# --- at scale, and killed at random moments -----------------------------------------------------------

def many_prompts(path: Path, count: int) -> Path:
    words = ["sea", "sky", "tree", "stone", "river", "bird", "cloud", "fire"]
    with open(path, "w") as f:
        for index in range(count):
            f.write(json.dumps({"id": f"p{index}", "prompt": f"The {words[index % 8]} number {index} is"}) + "\n")
    return path


@pytest.mark.slow
def test_twenty_thousand_prompts_exactly_once(local_ray, tiny_stores, tmp_path):
    """CI-sized scale test: every id exactly once; a sample's greedy text as `endor generate` gives it."""
    import random

    from endor_ray.engine import Engine, EngineConfig
    from endor_ray.engine.sampling import SamplingParams

    store = str(tiny_stores["opt"])
    prompts = many_prompts(tmp_path / "many.jsonl", 20_000)
    assert main(["--store", store, "--input", str(prompts), "--output", str(tmp_path / "out"), "--max-new-tokens", "2",
                 "--batch-size", "256", "--gpu-memory", "0"]) == 0
    table = PartFolder(str(tmp_path / "out")).read_all()
    ids = table.column("id").to_pylist()
    assert len(ids) == 20_000 and len(set(ids)) == 20_000
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    print(f"20,000 prompts: {summary['rows_per_s']:.0f} rows/s, {summary['tokens_per_s']:.0f} tokens/s, "
          f"{summary['mean_sequences_per_pass']:.0f} sequences per pass")
    rows = by_id(table)
    sample = random.Random(0).sample(sorted(rows), 8)
    with Engine(store, EngineConfig(gpu_memory=0), progress=False) as engine:
        for prompt_id in sample:
            completion = engine.generate([rows[prompt_id]["prompt"]], SamplingParams(max_new_tokens=2)).completions[0]
            assert rows[prompt_id]["text"] == completion.text and rows[prompt_id]["token_ids"] == completion.token_ids


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tiny_stores, tmp_path):
    import random

    total = 2000
    prompts = many_prompts(tmp_path / "p.jsonl", total)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="ek-", dir="/tmp")  # this test's Ray processes all name it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    command = [sys.executable, "-m", "endor_ray.jobs.generate", "--store", str(tiny_stores["opt"]), "--input",
               str(prompts), "--output", str(out), "--max-new-tokens", "4", "--batch-size", "16", "--gpu-memory", "0"]
    rng = random.Random(1)
    partial_kills = 0
    try:
        for attempt in range(3):
            job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
            before = len(list(out.glob("part-*.parquet")))
            deadline = time.monotonic() + 180  # wait until this run commits a part: it is generating
            while len(list(out.glob("part-*.parquet"))) == before and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(rng.uniform(0, 1.5))
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
                job.wait(timeout=30)
                committed_now = len(PartFolder(str(out)).done_ids())
                partial_kills += 0 < committed_now < total
            for pid in processes_mentioning(ray_tmp):  # Ray processes outside the group
                os.kill(pid, signal.SIGKILL)
            committed = PartFolder(str(out)).read_all().column("id").to_pylist() if out.exists() else []
            assert len(committed) == len(set(committed)), f"duplicates after kill {attempt}"
        assert partial_kills, "no kill landed mid-generation: the test proved nothing"
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        for pid in processes_mentioning(ray_tmp):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    ids = PartFolder(str(out)).read_all().column("id").to_pylist()
    assert sorted(ids) == sorted(f"p{index}" for index in range(total))  # every row exactly once
