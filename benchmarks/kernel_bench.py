"""Benchmark of the Endor decompression kernel (endor_ray.kernels.decompress) against a dense copy.

What it measures, per case (Llama-2-70B shapes 8192x8192, 8192x28672, 28672x8192 at 50/60/70%
sparsity, fp16, random weights pruned by a random unstructured mask, fixed seeds):

- the kernel's output is bit-identical to the original weight (checked before timing);
- kernel time: median of --reps CUDA-event timings of ``decompress(enc, out=out)`` after a
  warm-up, with the output buffer allocated once and reused;
- kernel GB/s = (compressed bytes read + dense bytes written) / time, and effective dense
  GB/s = dense bytes / time (the rate at which usable weights appear);
- the same process's baseline: a device-to-device ``dst.copy_(src)`` of the dense tensor,
  GB/s = 2 * dense bytes / time, and the ratio kernel GB/s / copy GB/s (target on H100: >= 0.70);
- the compressed / dense size ratio, and, once per run, pinned host-to-device bandwidth
  (the transfer the kernel has to keep up with).

Run it with ``python benchmarks/kernel_bench.py``; it prints a table and writes JSON to
benchmarks/results/kernel_bench-<device>.json. Without CUDA it runs a small smoke version under
TRITON_INTERPRET=1 (``"mode": "cpu-interpreter-smoke"``): it proves correctness only, its
timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is defined: set it first

import triton  # noqa: E402

from endor_ray.format.tensor import BITS_DTYPES, DEFAULT_BLOCK_SIZE, encode  # noqa: E402
from endor_ray.kernels.decompress import decompress  # noqa: E402

GPU_SHAPES = [(8192, 8192), (8192, 28672), (28672, 8192)]  # Llama-2-70B q/o, gate/up, down
SMOKE_SHAPES = [(256, 512), (512, 256)]
SPARSITIES = [0.5, 0.6, 0.7]
DTYPE = torch.float16
SEED = 0
WARMUP = 3
H2D_NBYTES = 256 * 2**20


def time_ms(fn: Callable[[], Any], reps: int, warmup: int = WARMUP) -> float:
    """Median wall time of one call of `fn` in ms: CUDA events on the GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def pruned_weight(shape: tuple[int, int], sparsity: float, seed: int) -> torch.Tensor:
    """[rows, cols] fp16 on CPU: random normal weights, a random `sparsity` fraction set to +0.0."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator, dtype=torch.float32).to(DTYPE)
    keep = torch.rand(shape, generator=generator) >= sparsity
    return torch.where(keep, weight, torch.zeros((), dtype=DTYPE))


def bench_case(shape: tuple[int, int], sparsity: float, block_size: int, reps: int, seed: int) -> dict[str, Any]:
    """Encode one weight, check the kernel bit for bit, time it and a dense copy on the same device."""
    device = "cuda" if CUDA else "cpu"
    weight_cpu = pruned_weight(shape, sparsity, seed)
    enc = encode(weight_cpu, block_size, layout="bitmap").to(device)
    weight = weight_cpu.to(device)
    out = torch.empty_like(weight)
    bits_dtype = BITS_DTYPES[DTYPE]
    if not torch.equal(decompress(enc, out=out).view(bits_dtype), weight.view(bits_dtype)):
        raise RuntimeError(f"decompress({shape}, sparsity {sparsity}) is not bit-identical to the input")

    kernel_ms = time_ms(lambda: decompress(enc, out=out), reps)
    copy_ms = time_ms(lambda: out.copy_(weight), reps)
    dense_nbytes = enc.dense_nbytes
    kernel_gbps = (enc.nbytes + dense_nbytes) / kernel_ms / 1e6
    copy_gbps = 2 * dense_nbytes / copy_ms / 1e6
    return {
        "shape": list(shape), "dtype": str(DTYPE).removeprefix("torch."), "block_size": block_size,
        "target_sparsity": sparsity, "sparsity": round(enc.sparsity, 6), "seed": seed,
        "dense_nbytes": dense_nbytes, "compressed_nbytes": enc.nbytes,
        "size_ratio": enc.nbytes / dense_nbytes, "bit_identical": True,
        "kernel_ms": kernel_ms, "kernel_GBps": kernel_gbps,
        "effective_dense_GBps": dense_nbytes / kernel_ms / 1e6,
        "copy_ms": copy_ms, "copy_GBps": copy_gbps, "kernel_vs_copy": kernel_gbps / copy_gbps,
    }


def pinned_h2d_gbps(reps: int, nbytes: int = H2D_NBYTES) -> float | None:
    """Median pinned host -> GPU copy bandwidth in GB/s (None without CUDA)."""
    if not CUDA:
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / time_ms(lambda: device.copy_(host, non_blocking=True), reps) / 1e6


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if CUDA else None,
        "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'shape':>12} {'sparsity':>8} {'size':>6} {'kernel ms':>10} {'kernel GB/s':>11} " \
             f"{'dense GB/s':>10} {'copy GB/s':>9} {'vs copy':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        print(f"{shape:>12} {row['sparsity']:>8.3f} {row['size_ratio']:>6.3f} {row['kernel_ms']:>10.3f} "
              f"{row['kernel_GBps']:>11.1f} {row['effective_dense_GBps']:>10.1f} {row['copy_GBps']:>9.1f} "
              f"{row['kernel_vs_copy']:>7.2f}")


def parse_shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/kernel_bench-<device>.json)")
    parser.add_argument("--reps", type=int, default=50 if CUDA else 3, help="timed runs per measurement")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", help="ROWSxCOLS, e.g. 8192x28672")
    parser.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    args = parser.parse_args()

    mode = "cuda" if CUDA else "cpu-interpreter-smoke"
    shapes = args.shapes or (GPU_SHAPES if CUDA else SMOKE_SHAPES)
    device_name = torch.cuda.get_device_name() if CUDA else "cpu-interpreter"
    device_slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out_path = args.out or Path(__file__).parent / "results" / f"kernel_bench-{device_slug}.json"
    if not CUDA:
        print("No CUDA device: smoke run under TRITON_INTERPRET=1 (correctness only, timings are meaningless)")

    h2d_gbps = pinned_h2d_gbps(args.reps)
    rows = []
    for case_idx, (shape, sparsity) in enumerate((s, p) for s in shapes for p in args.sparsities):
        rows.append(bench_case(shape, sparsity, args.block_size, args.reps, seed=SEED + case_idx))
    print(f"mode: {mode}   device: {device_name}   pinned H2D: "
          + (f"{h2d_gbps:.1f} GB/s" if h2d_gbps is not None else "n/a"))
    print_table(rows)

    result = {
        "benchmark": "kernel_bench", "mode": mode, "machine": machine_info(),
        "settings": {"reps": args.reps, "warmup": WARMUP, "block_size": args.block_size, "seed": SEED,
                     "statistic": "median", "GB": 1e9},
        "pinned_h2d_GBps": h2d_gbps, "pinned_h2d_nbytes": H2D_NBYTES if CUDA else None,
        "cases": rows,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
