"""Ahead-of-time compilation of the decoding kernels for CUDA targets, on any machine.

Triton compiles for a `GPUTarget` without a GPU; the `ptxas` bundled with Triton then reports
what the hardware would see: registers per thread, spills, and with the launch shape the
occupancy. The AOT test asserts on these; `benchmarks/kernel_bench.py` records them.

    python -m endor_ray.kernels.aot          # one JSON line per target, kernel variant and block size

Each kernel module's variants come from one function listed in `VARIANT_SETS` (a `Variant`:
the kernel, its argument types and compile-time values, its launch options); a new kernel
module adds its function there.

Run it in a process without TRITON_INTERPRET=1: under the interpreter @triton.jit builds an
interpreted stand-in that cannot be compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from endor_ray.format.gguf_blocks import GGUF_ENCODINGS
from endor_ray.kernels import dequant, expand, gguf_dequant

# Per-SM limits (CUDA occupancy calculator): registers, warps, blocks, shared memory, and the
# allocation granularity of registers (per warp) and shared memory (per block, plus 1 KiB reserved).
SM_LIMITS = {
    80: {"registers": 65536, "warps": 64, "blocks": 32, "shared": 164 * 1024, "reg_unit": 256},
    90: {"registers": 65536, "warps": 64, "blocks": 32, "shared": 228 * 1024, "reg_unit": 256},
}
CAPABILITIES = (90, 80)


@dataclass(frozen=True)
class KernelResources:
    capability: int
    variant: str  # raw: "i16" (fp16, bf16) or "i32" (fp32); quantized: e.g. "int4>bf16", "int8>fp16 dense"; "q4_k>bf16"
    block_size: int  # the format's block size; GGUF: the block type's elements per block
    num_warps: int
    registers: int  # per thread
    spill_bytes: int  # spill stores
    shared_bytes: int  # dynamic shared memory per program
    max_registers: int | None  # the cap the kernel was compiled with (.maxnreg)
    sass_instructions: int
    kernel: str = ""  # the @triton.jit function's name

    @property
    def occupancy(self) -> float:
        """Resident warps per SM / the SM's maximum, limited by registers, warps, blocks, shared memory."""
        limits = SM_LIMITS[self.capability]
        regs_per_warp = -(-self.registers * 32 // limits["reg_unit"]) * limits["reg_unit"]
        blocks = min(
            limits["registers"] // regs_per_warp // self.num_warps,
            limits["warps"] // self.num_warps,
            limits["blocks"],
            limits["shared"] // (self.shared_bytes + 1024),
        )
        return blocks * self.num_warps / limits["warps"]


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel, as its wrapper launches it."""

    name: str  # KernelResources.variant
    kernel: Any  # the @triton.jit function
    arg_types: dict[str, str]  # every non-constexpr argument -> its Triton type ("*u8", "i64")
    constexprs: dict[str, int | bool]  # every tl.constexpr argument, BLOCK and CHUNK included
    block_size: int
    num_warps: int
    maxnreg: int | None
    enable_fp_fusion: bool = True  # False where the wrapper launches without FMA contraction


def _launched(name: str, kernel: Any, arg_types: dict[str, str], flags: dict[str, int | bool], block_size: int,
              config: dict[str, int]) -> Variant:
    """A Variant from a kernel module's `launch_config` result (CHUNK, num_warps, maxnreg)."""
    constexprs = {"BLOCK": block_size, "CHUNK": config["CHUNK"], **flags}
    return Variant(name, kernel, arg_types, constexprs, block_size, config["num_warps"], config["maxnreg"])


RAW_VARIANTS = ("i16", "i32")
QUANT_VARIANTS = tuple(f"{codes}>{out}{layout}" for codes in ("int8", "int4") for out in ("fp16", "bf16", "fp32")
                       for layout in ("", " dense"))


def expand_variants() -> list[Variant]:
    """`expand_kernel` for int16 and int32 bits (fp16/bf16, fp32) at block sizes 256, 4096, 65536."""
    return [
        _launched(bits, expand.expand_kernel,
                  {"bitmap_ptr": "*u8", "block_offsets_ptr": "*i64", "values_ptr": f"*{bits}", "out_ptr": f"*{bits}",
                   "numel": "i64"},
                  {}, block_size, expand.launch_config(block_size))
        for bits in RAW_VARIANTS for block_size in (256, 4096, 65536)
    ]


def dequant_variants() -> list[Variant]:
    """Both dequantizing kernels for every code width and output dtype at block sizes 256, 4096."""
    variants = []
    for name in QUANT_VARIANTS:
        codes, rest = name.split(">")
        out_name, _, layout = rest.partition(" ")
        quant_bits, out_bf16 = int(codes[3:]), out_name == "bf16"
        data = {"values_ptr": "*i8" if quant_bits == 8 else "*u8", "scales_ptr": f"*{out_name}",
                "out_ptr": "*i16" if out_bf16 else f"*{out_name}", "numel": "i64", "cols": "i64",
                "groups_per_row": "i64", "group_size": "i64"}
        if layout == "dense":
            kernel, arg_types = dequant.dequantize_dense_kernel, data
        else:
            kernel = dequant.dequantize_kernel
            arg_types = {"bitmap_ptr": "*u8", "block_offsets_ptr": "*i64", "row_offsets_ptr": "*i64", **data,
                         "num_scales": "i64"}
        for block_size in (256, 4096):
            variants.append(_launched(name, kernel, arg_types, {"QUANT": quant_bits, "OUT_BF16": out_bf16},
                                      block_size, dequant.launch_config(block_size)))
    return variants


def gguf_variants() -> list[Variant]:
    """`gguf_dequant_kernel` for every GGUF block type and output dtype, as `dequantize_gguf` launches it."""
    variants = []
    for encoding in GGUF_ENCODINGS:
        for out_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
            config = gguf_dequant.launch_config(encoding, dtype)
            options = {name: config.pop(name) for name in ("num_warps", "maxnreg", "enable_fp_fusion")}
            out_type = "*i16" if out_name == "bf16" else f"*{out_name}"  # bf16: its bits
            arg_types = {"blocks_ptr": "*u8", "out_ptr": out_type, "numel": "i64"}
            variants.append(Variant(f"{encoding}>{out_name}", gguf_dequant.gguf_dequant_kernel, arg_types, config,
                                    config["BLOCK_ELEMS"], **options))
    return variants


# Every kernel module's variants, compiled in this order; a new kernel module adds its function here.
VARIANT_SETS: tuple[Callable[[], list[Variant]], ...] = (expand_variants, dequant_variants, gguf_variants)


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_variant(capability: int, variant: Variant) -> KernelResources:
    """Compile `variant` for sm_<capability> and report its resources (no GPU needed)."""
    signature = {}
    for param in variant.kernel.params:  # in the kernel's argument order; a KeyError names a missing type
        signature[param.name] = "constexpr" if param.is_constexpr else variant.arg_types[param.name]
    # Pointers 16-byte aligned, as in a slot buffer holding a version-2 layer file
    attrs = {(index,): [["tt.divisibility", 16]] for index, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = ASTSource(fn=variant.kernel, signature=signature, attrs=attrs, constexprs=variant.constexprs)
    options = {"num_warps": variant.num_warps, **({"maxnreg": variant.maxnreg} if variant.maxnreg else {}),
               "enable_fp_fusion": variant.enable_fp_fusion}
    compiled = triton.compiler.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as directory:
        ptx, cubin = os.path.join(directory, "k.ptx"), os.path.join(directory, "k.cubin")
        Path(ptx).write_text(compiled.asm["ptx"])
        Path(cubin).write_bytes(compiled.asm["cubin"])
        report = subprocess.run([_tool("ptxas"), f"-arch={arch}", "-v", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    cap = re.search(r"\.maxnreg (\d+)", compiled.asm["ptx"])
    return KernelResources(
        capability=capability, variant=variant.name, block_size=variant.block_size, num_warps=variant.num_warps,
        registers=int(re.search(r"Used (\d+) registers", report).group(1)),
        spill_bytes=int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        shared_bytes=compiled.metadata.shared, max_registers=int(cap.group(1)) if cap else None,
        sass_instructions=sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)),
        kernel=variant.kernel.__name__,
    )


def main(set_names: list[str]) -> None:
    """Compile every variant set, or only those named (e.g. `python -m endor_ray.kernels.aot gguf_variants`)."""
    variants = [variant for variant_set in VARIANT_SETS if not set_names or variant_set.__name__ in set_names
                for variant in variant_set()]
    for capability in CAPABILITIES:
        for variant in variants:
            resources = compile_variant(capability, variant)
            print(json.dumps({**dataclasses.asdict(resources), "occupancy": resources.occupancy}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
