"""Batch-1 products on the CPU straight from the stored blocks, against decoding first (issue 24, item 3).

Kernel: Llama-7B-shaped weights ([4096, 4096] attention, [11008, 4096] gate/up, [4096, 11008] down,
and the [49152, 4096] LM head llama.cpp's Q4_0 / Q4_K_M files store as Q6_K), bf16, stored as INT8 /
INT4 (groups of 32, dense) and as llama.cpp's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K blocks (random
rows quantized, then tiled: the bytes a product reads, not their values, set its speed).
--shapes / --encodings pick a subset (the default: every encoding on the three layer shapes).
Arms, interleaved round by round (the machine is shared; medians over the rounds):

  matvec        `cpu_matvec.matvec` at x rows 1, 4, 8, all cores (what a decode step now runs)
  dense-matmul  torch's F.linear on the weight already decoded to bf16 (the resident layer before)
  decode+matmul `cpu_decode.decode_into` to bf16, then F.linear (a streamed layer before)

GB/s = the bytes the arm reads from memory for the weight per second (stored bytes for matvec,
2 bytes a weight for dense-matmul, stored bytes for decode+matmul). The x1 arms are also timed on
one thread by its CPU time (time.thread_time), which a loaded machine's wall clock does not hide.

Engine: a random Llama with --layers 7B-shaped layers (vocab 32000), converted to dense INT8 and
INT4 group-32 stores, run by `endor generate --in-process --device cpu` in a child process with
and without `--cpu-matvec`, rounds interleaved; seconds per pass over the weights (the stats'
s_per_pass, start-up excluded) for --new-tokens greedy tokens, and the tokens (identical or not).

    python benchmarks/cpu_matvec_bench.py [--rounds 5] [--layers 4] [--skip-engine]
        [--shapes attn lm_head] [--encodings q4_k q5_k q6_k] [--out FILE]
        ->  benchmarks/results/cpu_matvec_bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from endor_ray.format import encode
from endor_ray.format.cpu_decode import decode_into
from endor_ray.format.cpu_matvec import matvec, supported_isas
from endor_ray.format.tensor import EncodedTensor

SHAPES = {"attn [4096, 4096]": (4096, 4096), "gate/up [11008, 4096]": (11008, 4096),
          "down [4096, 11008]": (4096, 11008), "lm_head [49152, 4096]": (49152, 4096)}
DEFAULT_SHAPES = ("attn", "gate/up", "down")
ENCODINGS = {"int8 g32": ("int8", 32), "int4 g32": ("int4", 32), "q8_0": ("q8_0", 0), "q4_0": ("q4_0", 0),
             "q4_1": ("q4_1", 0), "q4_k": ("q4_k", 0), "q5_k": ("q5_k", 0), "q6_k": ("q6_k", 0)}
X_ROWS = (1, 4, 8)
TILE_ROWS = 64
RESULTS = Path(__file__).parent / "results" / "cpu_matvec_bench.json"


def tiled(shape: tuple[int, int], encoding: str, group_size: int) -> EncodedTensor:
    """A [rows, cols] bf16 tensor of `encoding` whose rows repeat TILE_ROWS random quantized rows."""
    rows, cols = shape
    weight = (torch.randn(TILE_ROWS, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    tile = encode(weight, layout="dense", encoding=encoding, **({"group_size": group_size} if group_size else {}))
    repeats = rows // TILE_ROWS
    values = tile.values.repeat(repeats)
    scales = None if tile.scales is None else tile.scales.repeat(repeats)
    return dataclasses.replace(tile, shape=(rows, cols), nnz=rows * cols, values=values, scales=scales)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def kernel_rounds(rounds: int, threads: int, shapes: dict, encodings: dict) -> list[dict]:
    rows_out = []
    for shape_name, shape in shapes.items():
        for enc_name, (encoding, group_size) in encodings.items():
            enc = tiled(shape, encoding, group_size)
            dense = torch.empty(shape, dtype=torch.bfloat16)
            decode_into(enc, dense, threads=threads)
            xs = {x_rows: torch.randn(x_rows, shape[1]) for x_rows in X_ROWS}
            arms = {f"matvec x{x_rows}": (lambda x=x: matvec(enc, x, threads=threads)) for x_rows, x in xs.items()}
            arms.update({f"dense-matmul x{x_rows}": (lambda x=x.bfloat16(): F.linear(x, dense))
                         for x_rows, x in xs.items()})
            scratch = torch.empty(shape, dtype=torch.bfloat16)
            arms["decode+matmul x1"] = lambda: F.linear(xs[1].bfloat16(), decode_into(enc, scratch, threads=threads))
            samples: dict[str, list[float]] = {name: [] for name in arms}
            loads = [load_average()]
            for arm in arms.values():
                arm()  # warm: pages touched, thread pools started
            for _ in range(rounds):
                for name, arm in arms.items():
                    started = time.perf_counter()
                    arm()
                    samples[name].append(time.perf_counter() - started)
            loads.append(load_average())
            for name, times in samples.items():
                seconds = statistics.median(times)
                nbytes = 2 * enc.numel if name.startswith("dense") else enc.nbytes
                rows_out.append({"shape": shape_name, "encoding": enc_name, "arm": name, "median_s": seconds,
                                 "GBps": nbytes / seconds / 1e9, "weight_nbytes_read": nbytes,
                                 "samples_s": times, "load_average": loads})
                print(f"{shape_name:22} {enc_name:9} {name:18} {seconds * 1e3:8.2f} ms {nbytes / seconds / 1e9:6.1f} GB/s"
                      f"  (load {loads[0]}-{loads[1]})", flush=True)
    return rows_out


def cpu_time_rounds(rounds: int, shapes: dict, encodings: dict) -> list[dict]:
    """The same x1 arms on one thread, timed by the thread's CPU time: what a core does while it runs,
    which a loaded machine's wall clock hides (torch on one thread too)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    rows_out = []
    try:
        for shape_name, shape in shapes.items():
            for enc_name, (encoding, group_size) in encodings.items():
                enc = tiled(shape, encoding, group_size)
                dense = torch.empty(shape, dtype=torch.bfloat16)
                decode_into(enc, dense)
                x = torch.randn(1, shape[1])
                arms = {f"matvec {isa}": (lambda isa=isa: matvec(enc, x, isa=isa)) for isa in supported_isas()
                        if isa != "scalar"}
                arms["dense-matmul"] = lambda: F.linear(x.bfloat16(), dense)
                arms["decode+matmul"] = lambda: F.linear(x.bfloat16(), decode_into(enc, dense))
                samples: dict[str, list[float]] = {name: [] for name in arms}
                for arm in arms.values():
                    arm()
                for _ in range(rounds):
                    for name, arm in arms.items():
                        started = time.thread_time()
                        arm()
                        samples[name].append(time.thread_time() - started)
                for name, times in samples.items():
                    seconds = statistics.median(times)
                    nbytes = 2 * enc.numel if name.startswith("dense") else enc.nbytes
                    rows_out.append({"shape": shape_name, "encoding": enc_name, "arm": name, "cpu_s": seconds,
                                     "GB_per_cpu_s": nbytes / seconds / 1e9,
                                     "weights_per_cpu_ns": enc.numel / seconds / 1e9, "load_average": load_average()})
                    print(f"1 core  {shape_name:22} {enc_name:9} {name:14} {seconds * 1e3:7.2f} ms CPU "
                          f"{enc.numel / seconds / 1e9:5.2f} G weights/s", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    return rows_out


def summary(one_core: list[dict], wall: list[dict]) -> list[dict]:
    """Per shape and encoding at x rows 1: the product from the blocks against decode+matmul and against
    the already decoded weight's matmul, as one-core CPU-time ratios and all-core wall-clock ratios."""
    rows_out = []
    for key in dict.fromkeys((row["shape"], row["encoding"]) for row in one_core):
        shape_name, enc_name = key
        cpu = {row["arm"]: row["cpu_s"] for row in one_core if (row["shape"], row["encoding"]) == key}
        clock = {row["arm"]: row["median_s"] for row in wall if (row["shape"], row["encoding"]) == key}
        best = "matvec avx512" if "matvec avx512" in cpu else "matvec avx2"
        entry = {"shape": shape_name, "encoding": enc_name, "one_core_matvec_isa": best,
                 "one_core_decode_matmul_over_matvec": cpu["decode+matmul"] / cpu[best],
                 "one_core_dense_matmul_over_matvec": cpu["dense-matmul"] / cpu[best]}
        if clock:
            entry["wall_decode_matmul_over_matvec_x1"] = clock["decode+matmul x1"] / clock["matvec x1"]
            entry["wall_dense_matmul_over_matvec_x1"] = clock["dense-matmul x1"] / clock["matvec x1"]
        rows_out.append(entry)
        print(f"{shape_name:22} {enc_name:9} decode+matmul / matvec: one core "
              f"{entry['one_core_decode_matmul_over_matvec']:.2f}x"
              + (f", all cores {entry['wall_decode_matmul_over_matvec_x1']:.2f}x" if clock else ""), flush=True)
    return rows_out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


# -- the engine ---------------------------------------------------------------------------------------

def build_stores(root: Path, num_layers: int, values_kinds: tuple[str, ...] = ("int8", "int4")) -> dict[str, Path]:
    """A random 7B-shaped Llama checkpoint and its dense INT8 / INT4 group-32 stores (built once)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from offload_models import random_checkpoint

    from endor_ray.compress.convert import ConvertConfig, convert

    checkpoint = root / "checkpoint"
    stores = {values: root / f"store-{values}-g32" for values in values_kinds}
    if not (checkpoint / "config.json").is_file():
        shape = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     vocab_size=32000)
        model, tokenizer = random_checkpoint(shape, num_layers, torch.bfloat16)
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        del model
    for values, store in stores.items():
        if not (store / "manifest.json").is_file():
            convert(str(checkpoint), store, ConvertConfig(0.0, "magnitude", values=values, group_size=32, force=True),
                    progress=False)
    return stores


def generate(store: Path, cpu_matvec: bool, new_tokens: int) -> dict:
    command = [sys.executable, "-m", "endor_ray.cli", "generate", str(store), "--in-process", "--device", "cpu",
               "--json", "--prompt", "t5 t6 t7 t8", "--max-new-tokens", str(new_tokens),
               "--cpu-matvec" if cpu_matvec else "--no-cpu-matvec"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    result = json.loads(done.stdout)
    return {"s_per_pass": result["stats"]["s_per_pass"], "wall_s": result["stats"]["wall_s"],
            "process_s": time.perf_counter() - started, "tokens": result["completions"][0]["token_ids"]}


def engine_rounds(root: Path, num_layers: int, rounds: int, new_tokens: int, values_kinds: tuple[str, ...]) -> list[dict]:
    stores = build_stores(root, num_layers, values_kinds)
    runs: dict[tuple[str, bool], list[dict]] = {(values, on): [] for values in stores for on in (True, False)}
    for _ in range(rounds):
        for (values, on), results in runs.items():
            load = load_average()
            results.append({**generate(stores[values], on, new_tokens), "load_average": load})
            print(f"engine {values} cpu_matvec={on}: {results[-1]['s_per_pass']:.3f} s/pass (load {load})", flush=True)
    rows_out = []
    for (values, on), results in runs.items():
        rows_out.append({"store": f"{values} group 32 dense, {num_layers} layers 7B-shaped", "cpu_matvec": on,
                         "median_s_per_pass": statistics.median(r["s_per_pass"] for r in results),
                         "runs": results})
    for values in stores:
        on, off = (next(r for r in rows_out if r["store"].startswith(values) and r["cpu_matvec"] is flag)
                   for flag in (True, False))
        on["speedup"] = off["median_s_per_pass"] / on["median_s_per_pass"]
        on["same_tokens"] = all(a["tokens"] == b["tokens"] for a, b in zip(on["runs"], off["runs"]))
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine-rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--values", nargs="+", default=["int8", "int4"], choices=["int8", "int4"],
                        help="the engine's stores (converting a 7B-shaped layer takes minutes)")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        choices=[name.split(" [")[0] for name in SHAPES], help="kernel shapes (by name)")
    parser.add_argument("--encodings", nargs="+", default=[name.split()[0] for name in ENCODINGS],
                        choices=[name.split()[0] for name in ENCODINGS], help="kernel encodings")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "endor-cpu-matvec-bench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "isas": supported_isas(), "torch_threads": torch.get_num_threads(),
                          "load_average_start": os.getloadavg()},
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds}
    shapes = {name: shape for name, shape in SHAPES.items() if name.split(" [")[0] in args.shapes}
    encodings = {name: spec for name, spec in ENCODINGS.items() if name.split()[0] in args.encodings}
    if not args.skip_kernel:
        result["kernel_one_core_cpu_time"] = cpu_time_rounds(args.rounds, shapes, encodings)
        result["kernel"] = kernel_rounds(args.rounds, args.threads, shapes, encodings)
        result["summary"] = summary(result["kernel_one_core_cpu_time"], result["kernel"])
    if not args.skip_engine:
        result["engine"] = engine_rounds(args.root, args.layers, args.engine_rounds, args.new_tokens, tuple(args.values))
    result["machine"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
