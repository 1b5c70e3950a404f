"""Start-up of `endor generate --in-process` on the embedded model (issue 24: target under 3 s).

Start-up here is the time from spawning the command to its first byte on stdout: the CLI echoes the
prompt when the first token event arrives, i.e. after the first pass over the weights has computed the
first token's logits and it was sampled. Each run is a fresh process (imports from .pyc files, the
store's files in the page cache after the first run: "cold-ish"); the median of --runs is reported with
the child's CPU time (user + sys, what load from other processes does not inflate much) and the load
average around each run. One more run, in-process with timestamps (`--phases`), gives the breakdown:
imports (torch; the engine's modules; transformers' config and model modules), store open, tokenizer,
dense weights, skeleton, resident layers, the first forward pass, and which heavy packages
(ray, triton, pyarrow, fastapi, llguidance...) ended up imported.

    python benchmarks/startup.py [--store STORE] [--runs 5]  ->  benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENDOR = ROOT / ".venv" / "bin" / "endor"
PYTHON = ROOT / ".venv" / "bin" / "python"
PROMPT = "The capital of France is"
HEAVY = ("ray", "triton", "pyarrow", "fastapi", "uvicorn", "starlette", "llguidance", "scipy", "accelerate",
         "pandas", "boto3", "pydantic", "tokenizers", "transformers", "torch")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ensure_store(store: Path) -> None:
    """The demo store (`make demo`'s), converted from the embedded model if missing."""
    if not (store / "manifest.json").exists():
        subprocess.run([str(ENDOR), "convert", "smollm2-135m", str(store)], check=True)


def generate_command(store: Path) -> list[str]:
    return [str(ENDOR), "generate", str(store), "--in-process", "--max-new-tokens", "1", "--prompt", PROMPT]


def timed_run(store: Path) -> dict:
    """One fresh `endor generate --in-process`: seconds to its first stdout byte, to its exit, CPU seconds."""
    load_before = os.getloadavg()[0]
    begin = time.perf_counter()
    child = subprocess.Popen(generate_command(store), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    child.stdout.read(1)  # blocks until the first token's event has been printed
    first_token_s = time.perf_counter() - begin
    child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"endor generate failed (wait status {status}); run it by hand: {generate_command(store)}")
    return {"first_token_s": round(first_token_s, 3), "exit_s": round(time.perf_counter() - begin, 3),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def process_age_s() -> float:
    """Seconds since this process was created (its start time in /proc/self/stat, in clock ticks)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


def phases(store: str) -> None:
    """(child) The CLI's in-process generate with timestamps since process start; prints JSON on stderr."""
    origin = time.perf_counter() - process_age_s()
    marks: list[dict] = []

    def mark(name: str) -> None:
        marks.append({"phase": name, "wall_s": round(time.perf_counter() - origin, 3),
                      "cpu_s": round(time.process_time(), 3)})

    mark("python started")
    import torch  # noqa: F401

    mark("import torch")
    import endor_ray.cli as cli
    from endor_ray.engine import engine, model_runner
    from endor_ray.engine import layer_source
    from endor_ray.models import skeleton

    mark("import endor_ray (cli, engine)")
    from transformers.models.llama import configuration_llama  # noqa: F401

    mark("import transformers' Llama config")
    from transformers.models.llama import modeling_llama  # noqa: F401

    mark("import transformers' Llama model")

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            mark(f"{label} start")
            result = original(*args, **kwargs)
            mark(f"{label} end")
            return result

        setattr(owner, name, wrapper)

    timed(cli, "_open_store", "store open")
    timed(engine, "load_tokenizer", "tokenizer")  # the CLI's prompt check loads it through engine
    timed(model_runner, "load_tokenizer", "tokenizer (engine)")
    timed(skeleton, "build_skeleton", "skeleton (dense weights decoded before)")
    timed(layer_source.LayerSource, "__init__", "resident layers (LayerSource)")
    timed(model_runner.ModelRunner, "forward", "first forward pass")
    sys.stdout = open(os.devnull, "w")
    cli.main(generate_command(Path(store))[1:])
    mark("generate returned")
    imported = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
    print(json.dumps({"marks": marks, "imported": imported, "modules": len(sys.modules)}), file=sys.stderr)


def breakdown(marks: list[dict]) -> list[dict]:
    """Each phase's wall and CPU seconds since the previous mark (gaps named by what ran between)."""
    rows, previous = [], {"wall_s": 0.0, "cpu_s": 0.0}
    for entry in marks:
        rows.append({"until": entry["phase"], "wall_s": round(entry["wall_s"] - previous["wall_s"], 3),
                     "cpu_s": round(entry["cpu_s"] - previous["cpu_s"], 3), "at_s": entry["wall_s"]})
        previous = entry
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "stores" / "smollm2-135m-q4_1")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.json")
    parser.add_argument("--phases", metavar="STORE", help=argparse.SUPPRESS)  # the breakdown's child
    args = parser.parse_args()
    if args.phases:
        phases(args.phases)
        return
    ensure_store(args.store)
    timed_run(args.store)  # warm-up: .pyc files and the store's pages, as any second command finds them
    runs = []
    for run_idx in range(args.runs):
        runs.append(timed_run(args.store))
        print(f"run {run_idx}: first token {runs[-1]['first_token_s']:.2f} s (cpu {runs[-1]['cpu_s']:.2f} s, "
              f"load {runs[-1]['load_before']:.1f})")
    child = subprocess.run([str(PYTHON), __file__, "--phases", str(args.store)], capture_output=True, text=True,
                           check=True)
    detail = json.loads(child.stderr.strip().splitlines()[-1])
    rows = breakdown(detail["marks"])
    for row in rows:
        print(f"{row['wall_s']:7.3f} s wall {row['cpu_s']:7.3f} s cpu  -> {row['until']}")
    result = {
        "benchmark": "startup", "what": "spawn of `endor generate --in-process --max-new-tokens 1` to its first "
        "stdout byte (printed once the first token is computed)", "command": generate_command(args.store),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "runs": runs, "median_first_token_s": statistics.median(run["first_token_s"] for run in runs),
        "median_cpu_s": statistics.median(run["cpu_s"] for run in runs),
        "median_load": statistics.median(run["load_before"] for run in runs),
        "target_s": 3.0, "breakdown": rows, "imported": detail["imported"], "modules": detail["modules"],
    }
    print(f"median first token {result['median_first_token_s']:.2f} s (cpu {result['median_cpu_s']:.2f} s) "
          f"at load {result['median_load']:.1f}; imported: {', '.join(detail['imported'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
