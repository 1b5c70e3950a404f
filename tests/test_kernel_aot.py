"""The raw and quantized decoding kernels compiled ahead of time for sm_90 and sm_80, as a GPU would run them.

No GPU is needed: Triton compiles for a CUDA target and its bundled ptxas reports registers and
spills; the launch shape gives the occupancy (resident warps per SM / 64). The compilation runs
in a child process without TRITON_INTERPRET (under the interpreter a kernel cannot be compiled).
"""

import json
import os
import subprocess
import sys

import pytest

from endor_ray.kernels.aot import QUANT_VARIANTS, RAW_VARIANTS, KernelResources


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "endor_ray.kernels.aot", "expand_variants", "dequant_variants"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_target_dtype_encoding_and_block_size_compiles(compiled):
    combos = {(k["capability"], k["variant"], k["block_size"]) for k in compiled}
    raw = {(cap, variant, block) for cap in (90, 80) for variant in RAW_VARIANTS for block in (256, 4096, 65536)}
    quantized = {(cap, variant, block) for cap in (90, 80) for variant in QUANT_VARIANTS for block in (256, 4096)}
    assert len(QUANT_VARIANTS) == 12  # int8/int4 codes -> fp16/bf16/fp32, bitmap and dense layouts
    assert combos == raw | quantized


def test_no_spills_and_full_occupancy(compiled):
    for kernel in compiled:
        assert kernel["max_registers"] == 32, kernel  # the cap reached ptxas
        assert kernel["spill_bytes"] == 0, kernel
        assert kernel["registers"] <= 32, kernel
        if kernel["capability"] == 90:
            assert kernel["occupancy"] >= 0.75, kernel  # the floor
        assert kernel["occupancy"] == 1.0, kernel  # what launch_config is designed for


def test_occupancy_calculator_matches_the_cuda_rules():
    """The calculator itself, on the numbers of the kernel before this design (issue 8)."""
    def occupancy(registers, warps=8, shared=512):
        return KernelResources(90, "i16", 4096, warps, registers, 0, shared, None, 0).occupancy

    assert occupancy(40) == 0.75  # 1280 registers per warp: 51 warps fit, 6 blocks of 8
    assert occupancy(63) == 0.5  # 2048 per warp: 32 warps, 4 blocks
    assert occupancy(32) == 1.0
    assert occupancy(32, shared=60 * 1024) == 0.375  # 3 blocks by shared memory
