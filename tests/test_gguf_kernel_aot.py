"""The GGUF dequantization kernel compiled ahead of time for sm_90 and sm_80, as a GPU would run it.

Every block type x output dtype, as `dequantize_gguf` launches it (`endor_ray.kernels.aot`'s
`gguf_variants`): registers, spills and occupancy from the bundled ptxas, and no fused
multiply-add in the PTX (the launch turns FP fusion off, so a GPU rounds each product and sum as
gguf-py does). No GPU needed; the compilation runs in a child process without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys

import pytest

from endor_ray.format.gguf_blocks import GGUF_ENCODINGS

OUT_NAMES = ("fp16", "bf16", "fp32")
# PTX fused multiply-adds of a variant, compiled as launched and with FP fusion on (the control)
FMA_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from endor_ray.kernels.aot import gguf_variants

for variant in gguf_variants():
    if variant.name not in sys.argv[1:]:
        continue
    signature = {p.name: "constexpr" if p.is_constexpr else variant.arg_types[p.name] for p in variant.kernel.params}
    for fusion in (variant.enable_fp_fusion, True):
        source = ASTSource(fn=variant.kernel, signature=signature, constexprs=variant.constexprs)
        options = {"num_warps": variant.num_warps, "maxnreg": variant.maxnreg, "enable_fp_fusion": fusion}
        ptx = triton.compiler.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        print(json.dumps({"variant": variant.name, "fusion": fusion, "fma": ptx.count("fma.rn")}))
"""


def run_without_interpreter(*args: str) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return run_without_interpreter("-m", "endor_ray.kernels.aot", "gguf_variants")


def test_every_target_block_type_and_dtype_compiles(compiled):
    combos = {(kernel["capability"], kernel["variant"]) for kernel in compiled}
    assert combos == {(cap, f"{encoding}>{out}") for cap in (90, 80)
                      for encoding in GGUF_ENCODINGS for out in OUT_NAMES}
    assert len(compiled) == 2 * len(GGUF_ENCODINGS) * 3
    assert {kernel["kernel"] for kernel in compiled} == {"gguf_dequant_kernel"}


def test_no_spills_and_full_occupancy(compiled):
    for kernel in compiled:
        assert kernel["max_registers"] == 32, kernel  # the cap reached ptxas
        assert kernel["spill_bytes"] == 0, kernel
        assert kernel["registers"] <= 32, kernel
        assert kernel["occupancy"] == 1.0, kernel


def test_no_fused_multiply_add_in_q2_k_s_scale_then_minimum():
    counts = run_without_interpreter("-c", FMA_SCRIPT, "q2_k>fp32")
    assert [count["fma"] > 0 for count in counts] == [False, True]  # as launched: none; the control: fused


def test_no_fused_multiply_add_where_gguf_py_rounds_a_product_then_a_sum():
    counts = run_without_interpreter("-c", FMA_SCRIPT, "q4_1>fp32", "q5_1>bf16", "q4_k>fp16", "q5_k>fp32")
    assert len(counts) == 8
    for count in counts:
        if count["fusion"]:
            assert count["fma"] > 0, count  # the control: with fusion on, the compiler does fuse
        else:
            assert count["fma"] == 0, count
