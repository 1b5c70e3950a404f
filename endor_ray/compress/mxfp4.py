"""MXFP4 weights as gpt-oss's release checkpoints hold them, decoded exactly for conversion.

OCP Microscaling FP4 (MXFP4): a block of 32 consecutive weights along a row shares one scale.

    <name>_blocks  uint8 [..., rows, cols / 32, 16]  two 4-bit codes a byte, the low nibble first
                                                      (element 2j of the block), the high one second
    <name>_scales  uint8 [..., rows, cols / 32]       E8M0: the block's scale is 2 ** (byte - 127)

A code is FP4 E2M1 (sign, 2 exponent bits, 1 mantissa bit): `FP4_VALUES[code]`, 0, +-0.5, +-1,
+-1.5, +-2, +-3, +-4, +-6 (code 8 is -0.0). The weight is `FP4_VALUES[code] * 2 ** (scale - 127)`,
4.25 bits a weight. Every such value is a float32 (and a bfloat16) exactly, so decoding is exact;
the byte 255 (E8M0's NaN) is read as 2 ** 128 (inf) as transformers reads it.

gpt-oss stores each expert's projections this way (``mlp.experts.gate_up_proj_blocks`` [experts,
2 * inter, hidden / 32, 16], ``down_proj_blocks`` [experts, hidden, inter / 32, 16]): rows are a
Linear's outputs, as in ``nn.Linear``. transformers' experts module holds them transposed,
[experts, in, out]; `gpt_oss_expert_tensor` gives that, the tensor a bf16 gpt-oss checkpoint
holds under the name without ``_blocks``; the store then compresses it like any other weight.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., rows, cols / 32, 16] uint8 codes and [..., rows, cols / 32] uint8 scales -> float32 [..., rows, cols]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
                         f"expected [..., rows, groups, {BLOCK // 2}] and [..., rows, groups]")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [..., rows, groups, 32]
    values = lut[codes.long()]
    values = torch.ldexp(values, scales.to(torch.int32).sub(127).unsqueeze(-1).to(torch.float32))
    return values.flatten(-2)


def gpt_oss_expert_tensor(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss's [experts, out, in / 32, 16] blocks -> bfloat16 [experts, in, out], the module's layout
    (exact: every MXFP4 value is a bfloat16). One expert at a time, so the decode's temporaries stay
    one expert's (gpt-oss-120b: a layer's gate_up_proj is 2.1 G weights)."""
    if blocks.dim() != 4 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"gpt-oss MXFP4 experts are [experts, out, in / 32, 16] blocks and [experts, out, in / 32] "
                         f"scales, got {tuple(blocks.shape)} and {tuple(scales.shape)}")
    out = torch.empty(expert_shape(tuple(blocks.shape)), dtype=torch.bfloat16)
    for expert in range(blocks.shape[0]):
        out[expert] = dequantize(blocks[expert], scales[expert]).T
    return out


def mxfp4_pairs(names: list[str]) -> dict[str, tuple[str, str]]:
    """{tensor name: (its blocks' name, its scales' name)} for every `X_blocks` beside an `X_scales`."""
    present = set(names)
    return {name[:-len(BLOCKS_SUFFIX)]: (name, name[:-len(BLOCKS_SUFFIX)] + SCALES_SUFFIX) for name in names
            if name.endswith(BLOCKS_SUFFIX) and name[:-len(BLOCKS_SUFFIX)] + SCALES_SUFFIX in present}


def expert_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `gpt_oss_expert_tensor` gives for blocks of `blocks_shape` (nothing read)."""
    *lead, rows, groups, _ = blocks_shape
    return (*lead, groups * BLOCK, rows)
