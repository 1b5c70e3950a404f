"""The CPU decoder against a plain copy, and the GPU kernel's compiled resources, without a GPU.

Decode: a 4096x11008 weight (Llama-7B's MLP) at 50% sparsity, random unstructured mask, fp16,
bf16 and fp32 raw values, and bf16/fp16 INT8 and INT4 values (groups of 128; also INT4 without
pruning, the dense layout), decoded into a reused output buffer by every implementation the CPU runs
(`endor_ray.format.cpu_decode`: avx512, avx2, scalar) on one thread and on all cores, against
the torch reference decode and `torch.Tensor.copy_` of the dense tensor (the memory-speed
baseline). GB/s = dense bytes written per second. Median of --reps after a warm-up.

Kernel: `python -m endor_ray.kernels.aot` in a child process (no TRITON_INTERPRET): registers,
spills and occupancy of the decoding kernels (expand, dequantize) compiled for sm_90 and sm_80.

    python benchmarks/cpu_decode_bench.py  ->  benchmarks/results/cpu_decode_bench.json
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

import torch

from endor_ray.format import encode
from endor_ray.format.cpu_decode import backend, decode_into, supported_isas
from endor_ray.format.tensor import decode

SHAPE = (4096, 11008)
TARGET_GBPS = 4.0  # one core, dense output


def median_s(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_decode_bench.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_bench import machine_info

    cores = os.cpu_count() or 1
    rows = []
    cases = [(dtype, "raw", 0.5) for dtype in (torch.float16, torch.bfloat16, torch.float32)]
    cases += [(dtype, values, 0.5) for dtype in (torch.bfloat16, torch.float16) for values in ("int8", "int4")]
    cases += [(torch.bfloat16, "int4", 0.0)]
    for dtype, values, sparsity in cases:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(SHAPE, generator=generator).to(dtype)
        weight[torch.rand(SHAPE, generator=generator) < sparsity] = 0
        enc, out, source = encode(weight, encoding=values), torch.empty_like(weight), weight.clone()
        if values != "raw":
            weight = decode(enc)  # what every decoder must reproduce bit for bit
        dense_nbytes = weight.numel() * weight.element_size()
        copy_s = median_s(lambda: out.copy_(source), args.reps)
        reference_s = median_s(lambda: decode(enc, out=out), max(1, args.reps // 3))
        row = {"dtype": str(dtype).removeprefix("torch."), "values": values, "sparsity": sparsity,
               "layout": enc.layout, "shape": SHAPE, "dense_nbytes": dense_nbytes,
               "encoded_nbytes": enc.nbytes, "copy_GBps": dense_nbytes / copy_s / 1e9,
               "torch_reference_GBps": dense_nbytes / reference_s / 1e9, "decoders": {}}
        for isa in supported_isas(weight.element_size()):
            for threads in sorted({1, cores}):
                decode_s = median_s(lambda: decode_into(enc, out, threads=threads, isa=isa), args.reps)
                assert torch.equal(out.view(torch.uint8), weight.view(torch.uint8))
                row["decoders"][f"{isa}-{threads}t"] = dense_nbytes / decode_s / 1e9
        row["chosen"] = backend(weight.element_size()) if values == "raw" else supported_isas(weight.element_size())[-1]
        row["chosen_1t_GBps"] = row["decoders"][f"{row['chosen']}-1t"]
        row["chosen_1t_vs_copy"] = row["chosen_1t_GBps"] / row["copy_GBps"]
        rows.append(row)
        print(f"{row['dtype']:>9} {values} {enc.layout}: copy {row['copy_GBps']:.1f} GB/s, torch reference {row['torch_reference_GBps']:.2f}, "
              + ", ".join(f"{name} {gbps:.1f}" for name, gbps in row["decoders"].items()) + f" (chosen: {row['chosen']})")

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    aot = subprocess.run([sys.executable, "-m", "endor_ray.kernels.aot"], capture_output=True, text=True, env=env,
                         check=True)
    kernels = [json.loads(line) for line in aot.stdout.splitlines()]
    for kernel in kernels:
        print(f"sm_{kernel['capability']} {kernel['variant']} block {kernel['block_size']}: "
              f"{kernel['registers']} registers, {kernel['spill_bytes']} B spilled, occupancy {kernel['occupancy']:.0%}")
    result = {"benchmark": "cpu_decode_bench", "machine": machine_info(), "load_average": os.getloadavg(),
              "settings": {"sparsity": 0.5, "reps": args.reps, "statistic": "median", "GB": 1e9, "threads": [1, cores]},
              "target": f">= {TARGET_GBPS} GB/s of dense output on one core",
              "target_met": all(row["chosen_1t_GBps"] >= TARGET_GBPS for row in rows),
              "decode": rows, "kernel_aot": kernels}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
