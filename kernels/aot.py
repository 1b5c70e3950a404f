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
    values_dtype: str  # "i16" (fp16, bf16) or "i32" (fp32)
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


def compile_decompress(capability: int, values_dtype: str, block_size: int = 4096) -> KernelResources:
    """Compile `decompress_kernel` for sm_<capability> and report its resources (no GPU needed)."""
    config = launch_config(block_size)
    signature = {"bitmap_ptr": "*u8", "block_offsets_ptr": "*i64", "values_ptr": f"*{values_dtype}",
                 "out_ptr": f"*{values_dtype}", "numel": "i64", "BLOCK": "constexpr", "CHUNK": "constexpr"}
    # Pointers 16-byte aligned, as in a slot buffer holding a version-2 layer file
    attrs = {(index,): [["tt.divisibility", 16]] for index, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = ASTSource(fn=decompress_kernel, signature=signature, attrs=attrs,
                       constexprs={"BLOCK": block_size, "CHUNK": config["CHUNK"]})
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
        capability=capability, values_dtype=values_dtype, block_size=block_size, num_warps=config["num_warps"],
        registers=int(re.search(r"Used (\d+) registers", report).group(1)),
        spill_bytes=int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        shared_bytes=compiled.metadata.shared, max_registers=int(cap.group(1)) if cap else None,
        sass_instructions=sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)),
    )


def main() -> None:
    for capability in (90, 80):
        for values_dtype in ("i16", "i32"):
            for block_size in (256, 4096, 65536):
                resources = compile_decompress(capability, values_dtype, block_size)
                print(json.dumps({**dataclasses.asdict(resources), "occupancy": resources.occupancy}))


if __name__ == "__main__":
    main()
