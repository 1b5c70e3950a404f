"""The batch job on Ray Data against the job it replaced, and with one or two GPU workers.

Same input (N prompts of 2-24 words, fixed seed), same store, greedy, the same --max-new-tokens
(completions end earlier at EOS). Arms, run in turn, each starting its own local Ray:

  old      the job before the Ray Data rewrite (git 3df18ae): one Parquet file rewritten whole
           after every --batch-size finished rows (O(rows^2) bytes written), one GPU worker (it
           already used the engine's continuous batching)
  new-1    the Ray Data job, one GPU worker
  new-2    the Ray Data job, two GPU workers sharing one set of shard servers

Reported per arm: rows/s and tokens/s of the whole run (start-up included, as a user sees it),
the job's own summary, and the machine's load. On the 2-core development machine two CPU
workers compete for the same cores, so new-2 shows the overhead of a second worker more than a
speed-up; on GPUs each worker has its own device.

    python benchmarks/job_bench.py [--store STORE] [--prompts 2000]  ->  benchmarks/results/job_bench-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OLD_JOB_COMMIT = "3df18ae"
ROOT = Path(__file__).resolve().parent.parent


def write_prompts(path: Path, count: int) -> None:
    import random

    rng = random.Random(0)
    words = "the sea sky tree stone river bird cloud fire morning night city road song".split()
    with open(path, "w") as f:
        for index in range(count):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 24)))
            f.write(json.dumps({"id": f"p{index}", "prompt": text.capitalize()}) + "\n")


def run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", default=None, help="default: the embedded SmolLM2, magnitude 50%, bf16")
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "endor-job-bench")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "job_bench-cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_bench import machine_info

    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.store
    if store is None:
        store = str(args.workdir / "smollm2-mag50")
        if not Path(store, "manifest.json").is_file():
            from endor_ray.compress.convert import ConvertConfig, convert

            convert("smollm2-135m", store, ConvertConfig(method="magnitude", dtype="bfloat16", force=True))
    prompts = args.workdir / "prompts.jsonl"
    write_prompts(prompts, args.prompts)
    old_job = args.workdir / "old_job.py"
    old_job.write_text(subprocess.run(["git", "show", f"{OLD_JOB_COMMIT}:endor_ray/jobs/generate.py"], cwd=ROOT,
                                      capture_output=True, text=True, check=True).stdout)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    common = ["--store", store, "--input", str(prompts), "--max-new-tokens", str(args.max_new_tokens),
              "--batch-size", str(args.batch_size), "--gpu-memory", "0"]
    arms = {
        "old": [sys.executable, str(old_job), *common, "--output", str(args.workdir / "old.parquet")],
        "new-1": [sys.executable, "-m", "endor_ray.jobs.generate", *common, "--output", str(args.workdir / "new1")],
        "new-2": [sys.executable, "-m", "endor_ray.jobs.generate", *common, "--output", str(args.workdir / "new2"),
                  "--workers", "2"],
    }
    import shutil

    import pyarrow.parquet as pq

    results = {}
    for name, command in arms.items():
        for leftover in (args.workdir / "old.parquet", args.workdir / "new1", args.workdir / "new2"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        load = os.getloadavg()[0]
        wall = run(command, env)
        output = command[command.index("--output") + 1]
        table = pq.read_table(output)
        tokens = sum(table.column("num_tokens").to_pylist())
        summary = json.loads(Path(output, "_summary.json").read_text()) if Path(output).is_dir() else None
        results[name] = {"wall_s": wall, "rows": table.num_rows, "tokens": tokens, "rows_per_s": table.num_rows / wall,
                         "tokens_per_s": tokens / wall, "load_average_before": load, "job_summary": summary}
        print(f"{name:>6}: {table.num_rows} rows, {tokens} tokens in {wall:.1f} s: {tokens / wall:.1f} tokens/s "
              f"(load {load:.2f})", flush=True)
    result = {"benchmark": "job_bench", "machine": machine_info(), "store": store, "prompts": args.prompts,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "old_job": OLD_JOB_COMMIT,
              "arms": results,
              "new_vs_old_tokens_per_s": results["new-1"]["tokens_per_s"] / results["old"]["tokens_per_s"],
              "two_vs_one_worker_tokens_per_s": results["new-2"]["tokens_per_s"] / results["new-1"]["tokens_per_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
