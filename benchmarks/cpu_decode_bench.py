"""The CPU decoder against a plain copy, and the GPU kernel's compiled resources, without a GPU.

Decode: a 4096x11008 weight (Llama-7B's MLP) at 50% sparsity, random unstructured mask, fp16,
bf16 and fp32 raw values, and bf16/fp16 INT8 and INT4 values (groups of 128; also INT4 without
pruning, the dense layout), decoded into a reused output buffer by every implementation the CPU runs
(`endor_ray.format.cpu_decode`: avx512, avx2, scalar) on one thread and on all cores, against
the torch reference decode and `torch.Tensor.copy_` of the dense tensor (the memory-speed
baseline). GB/s = dense bytes written per second. Median of --reps after a warm-up.

GGUF blocks: the same shape as Q4_1, Q8_0 and Q4_K blocks (llama.cpp's reference quantizers on 16
random rows, tiled to 4096), decoded to bf16 by every implementation on one thread and two, against
the same copy (`cpu_decode.dequantize_gguf_into`, checked against gguf-py's dequantize).

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
from endor_ray.format.cpu_decode import backend, decode_into, dequantize_gguf_into, supported_gguf_isas, supported_isas
from endor_ray.format.gguf_blocks import quantize_blocks
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


GGUF_CASES = ("q4_1", "q8_0", "q4_k")


def gguf_row(encoding: str, reps: int) -> dict:
    """bf16 output GB/s of each GGUF decoder on 1 and 2 threads, beside a copy of the dense tensor."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, cols = SHAPE
    sample = torch.randn(16, cols, generator=torch.Generator().manual_seed(0))
    blocks = quantize_blocks(sample, encoding).view(16, -1).repeat(rows // 16, 1).view(-1)  # [nbytes] uint8
    expected = torch.from_numpy(np.ascontiguousarray(
        dequantize(blocks.numpy().reshape(rows, -1), GGMLQuantizationType[encoding.upper()]))).to(torch.bfloat16)
    out, source = torch.empty(SHAPE, dtype=torch.bfloat16), expected.clone()
    dense_nbytes = out.numel() * out.element_size()
    copy_s = median_s(lambda: out.copy_(source), reps)
    copy_cpu_s = median_cpu_s(lambda: out.copy_(source), reps)
    row = {"dtype": "bfloat16", "values": encoding, "layout": "dense", "shape": SHAPE, "dense_nbytes": dense_nbytes,
           "encoded_nbytes": blocks.numel(), "load_average_before": os.getloadavg(),
           "copy_GBps": dense_nbytes / copy_s / 1e9, "decoders": {},
           "copy_cpu_time_GBps": dense_nbytes / copy_cpu_s / 1e9, "decoders_1t_cpu_time_GBps": {}}
    for isa in supported_gguf_isas():
        for threads in (1, 2):
            decode_s = median_s(lambda: dequantize_gguf_into(blocks, encoding, rows, cols, out, threads, isa), reps)
            assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
            row["decoders"][f"{isa}-{threads}t"] = dense_nbytes / decode_s / 1e9
        cpu_s = median_cpu_s(lambda: dequantize_gguf_into(blocks, encoding, rows, cols, out, 1, isa), reps)
        row["decoders_1t_cpu_time_GBps"][isa] = dense_nbytes / cpu_s / 1e9
    row["chosen"] = supported_gguf_isas()[-1]
    row["chosen_1t_vs_copy"] = row["decoders"][f"{row['chosen']}-1t"] / row["copy_GBps"]
    row["load_average_after"] = os.getloadavg()
    print(f" bfloat16 {encoding} dense: copy {row['copy_GBps']:.1f} GB/s, "
          + ", ".join(f"{name} {gbps:.1f}" for name, gbps in row["decoders"].items()) + f" (chosen: {row['chosen']}); "
          f"CPU time, 1 thread: copy {row['copy_cpu_time_GBps']:.1f}, "
          + ", ".join(f"{name} {gbps:.1f}" for name, gbps in row["decoders_1t_cpu_time_GBps"].items()))
    return row


def median_cpu_s(fn, reps: int) -> float:
    """Median CPU time of this thread (less inflated than wall time on a loaded machine)."""
    fn()
    samples = []
    for _ in range(reps):
        started = time.thread_time()
        fn()
        samples.append(time.thread_time() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_decode_bench.json")
    parser.add_argument("--gguf-only", action="store_true",
                        help="measure the GGUF rows only and replace them in an existing --out file")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_bench import machine_info

    if args.gguf_only:
        result = json.loads(args.out.read_text())
        result["gguf_decode"] = [gguf_row(encoding, args.reps) for encoding in GGUF_CASES]
        result["gguf_settings"] = {"reps": args.reps, "statistic": "median", "machine": machine_info()}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        return

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

    gguf_rows = [gguf_row(encoding, args.reps) for encoding in GGUF_CASES]
    gguf_settings = {"reps": args.reps, "statistic": "median", "machine": machine_info()}

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
              "decode": rows, "gguf_decode": gguf_rows, "gguf_settings": gguf_settings, "kernel_aot": kernels}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
