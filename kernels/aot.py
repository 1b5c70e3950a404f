"""Ahead-of-time compilation of the decompression kernel for CUDA targets, on any machine.

Triton compiles for a `GPUTarget` without a GPU; the `ptxas` bundled with Triton then reports
what the hardware would see: registers per thread, spills, and with the launch shape the
occupancy. The AOT test asserts on these; `benchmarks/kernel_bench.py` records them.

    python -m endor_ray.kernels.aot          # one JSON line per target, values dtype and block size

Run it in a process without TRITON_INTERPRET=1: under the interpreter @triton.jit builds an
interpreted stand-in that cannot be compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from endor_ray.kernels.decompress import decompress_kernel, launch_config

# Per-SM limits (CUDA occupancy calculator): registers, warps, blocks, shared memory, and the
# allocation granularity of registers (per warp) and shared memory (per block, plus 1 KiB reserved).
SM_LIMITS = {
    80: {"registers": 65536, "warps": 64, "blocks": 32, "shared": 164 * 1024, "reg_unit": 256},
    90: {"registers": 65536, "warps": 64, "blocks": 32, "shared": 228 * 1024, "reg_unit": 256},
}


@dataclass(frozen=True)
class KernelResources:
    capability: int
    variant: str  # raw: "i16" (fp16, bf16) or "i32" (fp32); quantized: e.g. "int4>bf16", "int8>fp16 dense"
    block_size: int
    num_warps: int
    registers: int  # per thread
    spill_bytes: int  # spill stores
    shared_bytes: int  # dynamic shared memory per program
    max_registers: int | None  # the cap the kernel was compiled with (.maxnreg)
    sass_instructions: int

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


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


RAW_VARIANTS = ("i16", "i32")
QUANT_VARIANTS = tuple(f"{codes}>{out}{layout}" for codes in ("int8", "int4") for out in ("fp16", "bf16", "fp32")
                       for layout in ("", " dense"))


def _signature(variant: str) -> tuple[dict[str, str], dict[str, int]]:
    """The kernel's argument types and constexprs for a variant name (see `KernelResources.variant`)."""
    if variant in RAW_VARIANTS:
        values, out, quant_bits, dense, out_bf16 = variant, variant, 0, False, False
    else:
        codes, rest = variant.split(">")
        out_name, _, layout = rest.partition(" ")
        quant_bits, dense, out_bf16 = int(codes[3:]), layout == "dense", out_name == "bf16"
        values, out = ("i8" if quant_bits == 8 else "u8"), ("i16" if out_bf16 else out_name)
    signature = {"bitmap_ptr": "*u8", "block_offsets_ptr": "*i64", "values_ptr": f"*{values}", "out_ptr": f"*{out}",
                 "numel": "i64", "scales_ptr": f"*{'fp32' if variant in RAW_VARIANTS else out_name}",
                 "row_offsets_ptr": "*i64", "cols": "i64", "groups_per_row": "i64", "group_size": "i64",
                 "num_scales": "i64", "BLOCK": "constexpr", "CHUNK": "constexpr", "QUANT": "constexpr",
                 "DENSE": "constexpr", "OUT_BF16": "constexpr"}
    return signature, {"QUANT": quant_bits, "DENSE": dense, "OUT_BF16": out_bf16}


def compile_decompress(capability: int, variant: str, block_size: int = 4096) -> KernelResources:
    """Compile `decompress_kernel` for sm_<capability> and report its resources (no GPU needed)."""
    config = launch_config(block_size, quantized=variant not in RAW_VARIANTS)
    signature, flags = _signature(variant)
    # Pointers 16-byte aligned, as in a slot buffer holding a version-2 layer file
    attrs = {(index,): [["tt.divisibility", 16]] for index, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = ASTSource(fn=decompress_kernel, signature=signature, attrs=attrs,
                       constexprs={"BLOCK": block_size, "CHUNK": config["CHUNK"], **flags})
    compiled = triton.compiler.compile(source, target=GPUTarget("cuda", capability, 32),
                                       options={"num_warps": config["num_warps"], "maxnreg": config["maxnreg"]})
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
        capability=capability, variant=variant, block_size=block_size, num_warps=config["num_warps"],
        registers=int(re.search(r"Used (\d+) registers", report).group(1)),
        spill_bytes=int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        shared_bytes=compiled.metadata.shared, max_registers=int(cap.group(1)) if cap else None,
        sass_instructions=sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)),
    )


def main() -> None:
    for capability in (90, 80):
        combos = [(variant, block) for variant in RAW_VARIANTS for block in (256, 4096, 65536)]
        combos += [(variant, block) for variant in QUANT_VARIANTS for block in (256, 4096)]
        for variant, block_size in combos:
            resources = compile_decompress(capability, variant, block_size)
            print(json.dumps({**dataclasses.asdict(resources), "occupancy": resources.occupancy}), flush=True)


if __name__ == "__main__":
    main()
