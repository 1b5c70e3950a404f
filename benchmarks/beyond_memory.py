"""A model larger than the memory it may use: endor-ray against llama.cpp on the same weights, in cgroup limits.

The model: a random Llama with 7B-shaped decoder layers (hidden 4096, intermediate 11008, 32 heads,
bf16) and SmolLM2's tokenizer (one llama.cpp's converter knows). llama.cpp's own tools make the
GGUFs (convert_hf_to_gguf.py --outtype q8_0, then llama-quantize Q4_0), and `endor convert` imports
those GGUFs keeping their blocks, so both engines read the same weights at the same bytes
(Q8_0 = INT8 group 32, Q4_0 = INT4 group 32), stored as float32 by default as `endor convert` keeps a
GGUF (`--store-dtype bfloat16` rounds every block weight to bf16, which costs the CPU products a
rounding per weight). llama.cpp is built from the llama-cpp-python sdist's vendored sources (a
benchmark tool only, never a dependency of the project).

Every run is its own process inside fresh cgroup v1 children (memory: the limit, which counts the
page cache, and the peak usage; blkio: the bytes it read from disk), with all files evicted from the
page cache first (posix_fadvise DONTNEED, checked with fincore). Arms are interleaved (round after
round, each limit, each arm), each figure the median over rounds; every round measures the disk's
cold sequential read bandwidth (1 GiB probe, as `offload_cpu.disk_GBps`). Reported per arm and limit:
seconds per token with start-up and prefill excluded (endor: `decode_s_per_pass`; llama-bench: its
token-generation rate), disk bytes read per generated token (blkio over the whole run, divided by the
tokens), GB/s and % of the disk's bandwidth, the cgroup's peak memory, and whether it finished or
was killed for memory. `--warm` measures in RAM as a second run would: nothing evicted, llama-bench's
warm-up token on.

    nice -n 10 .venv/bin/python benchmarks/beyond_memory.py --workdir /work/scratch/bmem/m20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from offload_cpu import cached_bytes, disk_GBps, evict_all  # noqa: E402 - this folder

LLAMACPP = Path.home() / ".cache/endor-ray/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
CGROUP = Path("/sys/fs/cgroup")
GB = 1e9
PROMPT = "The capital of France is"


def prepare(workdir: Path, layers: int, dtype: str) -> dict[str, Path]:
    """The checkpoint, the two GGUFs and the two stores (of `dtype`) under `workdir` (each made once, then reused)."""
    paths = {"hf": workdir / "hf", "q8_0": workdir / "q8_0.gguf", "q4_0": workdir / "q4_0.gguf",
             "store-q8_0": workdir / f"store-q8_0-{dtype}", "store-q4_0": workdir / f"store-q4_0-{dtype}"}
    python = sys.executable
    if not (paths["hf"] / "config.json").is_file():
        import shutil

        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from endor_ray.compress.default_model import default_model_dir

        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                             vocab_size=49152, num_hidden_layers=layers, max_position_embeddings=4096,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(paths["hf"])
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(default_model_dir() / name, paths["hf"])
    steps = [("q8_0", [python, LLAMACPP / "convert_hf_to_gguf.py", paths["hf"], "--outtype", "q8_0", "--outfile",
                       paths["q8_0"]]),
             ("q4_0", [LLAMACPP / "build/bin/llama-quantize", "--allow-requantize", paths["q8_0"], paths["q4_0"],
                       "Q4_0"]),
             ("store-q8_0", [python, "-m", "endor_ray.cli", "convert", paths["q8_0"], paths["store-q8_0"], "--dtype",
                             dtype, "--force", "--quiet"]),
             ("store-q4_0", [python, "-m", "endor_ray.cli", "convert", paths["q4_0"], paths["store-q4_0"], "--dtype",
                             dtype, "--force", "--quiet"])]
    for name, command in steps:
        done = paths[name] / "manifest.json" if name.startswith("store") else paths[name]
        if not done.is_file():
            subprocess.run([str(part) for part in command], check=True)
    return paths


# -- a process in a cgroup ----------------------------------------------------------------------------

def _io_read_bytes(pid: int) -> int | None:
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        return int(fields["read_bytes"])
    except (OSError, KeyError, ValueError):
        return None


def run_limited(command: list[str], limit_bytes: int, name: str, timeout_s: float) -> dict:
    """Run `command` in a fresh memory cgroup with `limit_bytes`: rc, output, peak memory, disk bytes it read
    (/proc/PID/io read_bytes, polled: cgroup v1 blkio counts nothing on this machine's disk)."""
    memory = CGROUP / "memory" / name
    memory.mkdir()
    try:
        (memory / "memory.limit_in_bytes").write_text(str(limit_bytes))
        procs = str(memory / "cgroup.procs")

        def enter() -> None:  # in the child, before exec: everything it allocates counts against the limit
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=enter)
        try:
            stdout, stderr = _communicate_polling(child, timeout_s, lambda: _io_read_bytes(child.pid))
            rc = child.returncode
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
            rc = "timeout"
        read = _last_read.pop(child.pid, 0)
        oom = dict(line.split() for line in (memory / "memory.oom_control").read_text().splitlines())
        return {"rc": rc, "stdout": stdout, "stderr": stderr, "wall_s": time.perf_counter() - started,
                "peak_bytes": int((memory / "memory.max_usage_in_bytes").read_text()),
                "oom_kills": int(oom.get("oom_kill", 0)), "disk_read_bytes": read}
    finally:
        for _ in range(100):
            try:
                memory.rmdir()
                break
            except OSError:
                time.sleep(0.1)


_last_read: dict[int, int] = {}


def _communicate_polling(child: subprocess.Popen, timeout_s: float, sample) -> tuple[str, str]:
    """The child's output, sampling its read bytes every 0.2 s on a side thread until it exits."""
    import threading

    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            value = sample()
            if value is not None:
                _last_read[child.pid] = value
            stop.wait(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        return child.communicate(timeout=timeout_s)
    finally:
        stop.set()
        thread.join()


def endor_arm(store: Path, disk_io: str, depth: int | None, tokens: int) -> tuple[list[str], callable]:
    command = [sys.executable, "-m", "endor_ray.cli", "generate", str(store), "--in-process", "--device", "cpu",
               "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--json", "--disk-io", disk_io]
    if depth is not None:
        command += ["--prefetch-depth", str(depth)]

    def parse(run: dict) -> dict:
        stats = json.loads(run["stdout"])["stats"]
        note = next((line for line in run["stderr"].splitlines() if line.startswith("memory limit")), None)
        return {"s_per_token": stats["decode_s_per_pass"], "tokens": stats["new_tokens"], "memory_note": note,
                "read_s": stats["time_s"]["read"], "bytes_per_pass": stats["bytes_to_device_per_pass"],
                "passes": stats["passes"]}

    return command, parse


def llamacpp_arm(gguf: Path, load_mode: str, tokens: int, warm: bool) -> tuple[list[str], callable]:
    command = [str(LLAMACPP / "build/bin/llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-r", "1",
               *([] if warm else ["--no-warmup"]), "-t", "2", "-lm", load_mode, "-o", "json"]

    def parse(run: dict) -> dict:
        result = json.loads(run["stdout"])[0]
        return {"s_per_token": 1 / result["avg_ts"], "tokens": tokens}

    return command, parse


def arms_of(paths: dict[str, Path], names: list[str], tokens: int, warm: bool) -> dict:
    arms = {}
    for name in names:
        kind, precision, mode, *depth = name.split("-")  # endor-q8_0-direct[-d1], llamacpp-q4_0-mmap
        if kind == "endor":
            arms[name] = endor_arm(paths[f"store-{precision}"], mode, int(depth[0][1:]) if depth else None, tokens)
        else:
            arms[name] = llamacpp_arm(paths[precision], mode, tokens, warm)
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--limits-gb", type=float, nargs="+", default=[2.6, 3.6])
    parser.add_argument("--arms", nargs="+", default=[
        "endor-q8_0-buffered", "endor-q8_0-direct", "llamacpp-q8_0-mmap", "llamacpp-q8_0-none",
        "endor-q4_0-buffered", "endor-q4_0-direct", "llamacpp-q4_0-mmap", "llamacpp-q4_0-none"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=400)
    parser.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the stores' dtype (float32: a GGUF's own, what `endor convert` keeps by default; "
                             "the blocks' products then round no weight)")
    parser.add_argument("--warm", action="store_true",
                        help="in RAM as a user runs twice: no file evicted before a run, llama-bench's warm-up "
                             "token on (its mmap faults the file in before the timed tokens)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "beyond_memory.json")
    args = parser.parse_args()
    paths = prepare(args.workdir, args.layers, args.store_dtype)
    from endor_ray.store.store import Store

    files = [str(paths["q8_0"]), str(paths["q4_0"])]
    for name in ("store-q8_0", "store-q4_0"):
        store = Store(str(paths[name]))
        files += [store.local_path(entry["file"]) for entry in store.manifest["layers"]]
        files += [str(p) for p in paths[name].iterdir() if p.is_file()]
    arms = arms_of(paths, args.arms, args.new_tokens, args.warm)
    runs, probes, loads = {}, [], []
    for round_idx in range(args.rounds):
        probes.append(disk_GBps(args.workdir / "disk-probe.bin"))
        for limit in args.limits_gb:
            for name, (command, parse) in arms.items():
                if not args.warm:
                    evict_all(files)
                loads.append(os.getloadavg()[0])
                run = run_limited(command, int(limit * GB), f"bmem-{os.getpid()}-{round_idx}", args.timeout_s)
                row = {key: run[key] for key in ("rc", "wall_s", "peak_bytes", "oom_kills", "disk_read_bytes")}
                row["load"] = loads[-1]
                row["finished"] = run["rc"] == 0
                if row["finished"]:
                    row |= parse(run)
                else:
                    row["stderr_tail"] = run["stderr"][-600:]
                runs.setdefault((name, limit), []).append(row)
                shown = (f"{row['s_per_token']:.2f} s/token" if row["finished"]
                         else f"rc {run['rc']} (oom kills {run['oom_kills']})")
                print(f"round {round_idx} limit {limit} GB {name:>22}: {shown}, peak {run['peak_bytes'] / GB:.2f} GB, "
                      f"read {run['disk_read_bytes'] / GB:.2f} GB (load {loads[-1]:.1f})", flush=True)
    disk = statistics.median(probes)
    rows = summarize(runs, disk)
    result = {"benchmark": "beyond_memory", "disk_GBps_per_round": probes, "disk_GBps": disk, "load_average": loads,
              "settings": {"layers": args.layers, "shape": "7B (4096/11008/32 heads)", "vocab": 49152,
                           "new_tokens": args.new_tokens, "rounds": args.rounds, "limits_GB": args.limits_gb,
                           "order": "interleaved: round > limit > arm", "cpu_threads": 2,
                           "store_dtype": args.store_dtype, "warm": args.warm,
                           "files_GB": {k: sum(f.stat().st_size for f in (p.rglob("*") if p.is_dir() else [p]))
                                        / GB for k, p in paths.items() if k != "hf"}},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    plot(result, args.out.with_suffix(".png"))
    print(f"disk {disk:.2f} GB/s (probe per round {probes}); load {min(loads):.1f}-{max(loads):.1f}")
    for row in rows:
        if "s_per_token" in row:
            print(f"{row['arm']:>22} {row['limit_GB']:>4} GB: {row['s_per_token']:6.2f} s/token, "
                  f"{row['disk_bytes_per_token'] / GB:5.2f} GB/token, {row['GBps']:.2f} GB/s "
                  f"({row['pct_of_disk']:.0f}% of "
                  f"disk), peak {row['peak_GB_max']:.2f} GB, finished {row['finished']}")
        else:
            print(f"{row['arm']:>22} {row['limit_GB']:>4} GB: killed/failed {row['finished']}, "
                  f"peak {row['peak_GB_max']:.2f} GB")


def summarize(runs: dict[tuple[str, float], list[dict]], disk: float) -> list[dict]:
    """One row per (arm, limit): medians over the finished runs, rates against the disk's bandwidth."""
    rows = []
    for (name, limit), results in runs.items():
        done = [r for r in results if r["finished"]]
        row = {"arm": name, "limit_GB": limit, "runs": results, "finished": f"{len(done)}/{len(results)}",
               "peak_GB_max": max(r["peak_bytes"] for r in results) / GB}
        if done:
            s = statistics.median(r["s_per_token"] for r in done)
            # every pass over the weights: endor's prefill gives the first token; llama-bench -p 0 decodes only
            per_token = statistics.median(r["disk_read_bytes"] / r.get("passes", r["tokens"]) for r in done)
            row |= {"s_per_token": s, "disk_bytes_per_token": per_token, "GBps": per_token / s / GB,
                    "pct_of_disk": 100 * per_token / s / GB / disk}
            # endor: the rate its I/O thread read at (bytes it streamed over time reading); none where every
            # layer stayed resident (read_s 0: nothing streamed, as in a limit above the model's size)
            rates = [r["bytes_per_pass"] * r["passes"] / r["read_s"] / GB for r in done if r.get("read_s")]
            if rates:
                rate = statistics.median(rates)
                row |= {"reader_GBps": rate, "reader_pct_of_disk": 100 * rate / disk}
        rows.append(row)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = result["settings"]["limits_GB"]
    arms = list(dict.fromkeys(row["arm"] for row in result["rows"]))
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(limits)
    for offset, limit in enumerate(limits):
        by_arm = {row["arm"]: row for row in result["rows"] if row["limit_GB"] == limit}
        values = [by_arm.get(arm, {}).get("s_per_token", 0) for arm in arms]
        bars = axis.bar([i + offset * width for i in range(len(arms))], values, width, label=f"limit {limit} GB")
        for bar, arm in zip(bars, arms):
            if "s_per_token" not in by_arm.get(arm, {}):
                axis.text(bar.get_x() + width / 2, 0.05, "killed", rotation=90, ha="center", va="bottom", fontsize=8)
    axis.set_xticks([i + width * (len(limits) - 1) / 2 for i in range(len(arms))], arms, rotation=30, ha="right",
                    fontsize=8)
    axis.set_ylabel("s per token (start-up and prefill excluded)")
    axis.set_title(f"Beyond memory: 7B-shaped Llama, {result['settings']['layers']} layers; disk "
                   f"{result['disk_GBps']:.2f} GB/s")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
