"""One Linear weight -> its stored form: prune by a method, quantize the kept values, encode.

A *setting* is the pair (sparsity, values encoding). `compress_weight` applies one to a weight:
magnitude and Wanda prune exactly per row and then round the kept values to the nearest code
(`endor_ray.format.quant`); SparseGPT prunes and quantizes jointly, compensating each choice on
the weights not yet chosen (`endor_ray.compress.sparsegpt`). A GGUF block encoding (q4_1, q4_k,
...; dense, no pruning) is quantized block by block, with the block parameters searched for the
least error weighted by the calibration inputs' squared activations where they were gathered
(`endor_ray.compress.rounding`; the super-block types and iq4_nl by `endor_ray.compress.rounding_k`),
llama.cpp's reference rounding otherwise. It returns the encoded tensor and the
weight the store now holds (decoded by the reference decoder), which the converter feeds to the
next layer's calibration and the mixed-precision choice measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from endor_ray.errors import StoreError
from endor_ray.format.gguf_blocks import GGUF_ENCODINGS
from endor_ray.format.tensor import EncodedTensor, decode, encode
from endor_ray.compress.prune import prune_weight


# GGUF types rounded by GPTQ on their block grid when the Hessian is at hand (`_block_encode`); q8_0
# keeps importance-weighted rounding (its error is already ~1e-5 of the outputs', GPTQ's time is not)
GPTQ_ENCODINGS = ("q4_0", "q4_1", "q5_0", "q5_1")


@dataclass(frozen=True)
class Setting:
    """How one tensor is stored: the fraction of each row pruned and how kept values are encoded."""

    sparsity: float
    values: str = "raw"  # "raw" (the stored dtype) | "int8" | "int4" | a GGUF block type (no pruning)

    def __str__(self) -> str:
        return f"{self.sparsity:.0%}/{self.values}"


@dataclass
class CalibrationStats:
    """What calibration gathered for one Linear: sum_t x_t^2 ([in]) and, if collected, sum_t x_t x_t^T."""

    input_sq_sum: torch.Tensor | None = None
    hessian: torch.Tensor | None = None


def prune(weight: torch.Tensor, sparsity: float, method: str, stats: CalibrationStats) -> torch.Tensor:
    """`weight` pruned to `sparsity` by magnitude or Wanda (itself at sparsity 0)."""
    return prune_weight(weight, sparsity, method, stats.input_sq_sum) if sparsity > 0 else weight


def compress_weight(
    weight: torch.Tensor,
    setting: Setting,
    method: str,
    dtype: torch.dtype,
    block_size: int,
    group_size: int,
    stats: CalibrationStats | None = None,
    layout: str | None = None,
) -> tuple[EncodedTensor, torch.Tensor]:
    """(encoded tensor, the decoded weight in `dtype`) for `weight` under `setting` by `method`."""
    stats = stats or CalibrationStats()
    if setting.values in GGUF_ENCODINGS:
        return _block_encode(weight, setting, dtype, block_size, stats)
    if method == "sparsegpt" and (setting.sparsity > 0 or setting.values != "raw"):
        from endor_ray.compress.gptq_blocks import DAMP as GPTQ_DAMP
        from endor_ray.compress.sparsegpt import sparsegpt

        if stats.hessian is None:
            raise StoreError("sparsegpt needs the Linear's input Hessian from calibration; was it collected?")
        # Without pruning it is GPTQ, whose reference 1% dampening overfits the calibration tokens
        # (`endor_ray.compress.gptq_blocks.DAMP`); SparseGPT's pruning keeps the paper's 1%.
        damp = GPTQ_DAMP if setting.sparsity == 0 else 0.01
        result = sparsegpt(weight, stats.hessian, setting.sparsity, setting.values, group_size, dtype, damp=damp)
        encoded = encode(result.weight.to(dtype), block_size, layout=layout,
                         encoding=setting.values, group_size=group_size,
                         mask=result.mask.reshape(-1) if setting.values != "raw" else None, scales=result.scales)
    else:
        pruned = prune(weight, setting.sparsity, method, stats)
        encoded = encode(pruned.to(dtype), block_size, layout=layout, encoding=setting.values, group_size=group_size)
    return encoded, decode(encoded)


def _block_encode(weight: torch.Tensor, setting: Setting, dtype: torch.dtype, block_size: int,
                  stats: CalibrationStats) -> tuple[EncodedTensor, torch.Tensor]:
    """A GGUF block encoding of the whole weight (dense layout): GPTQ on the block grid where the
    Hessian was gathered (`GPTQ_ENCODINGS`), else importance-weighted where possible."""
    from endor_ray.compress.gptq_blocks import gptq_blocks
    from endor_ray.compress.rounding import quantize_weighted
    from endor_ray.compress.rounding_k import K_WEIGHTED, quantize_k_weighted

    if setting.sparsity > 0:
        raise StoreError(f"{setting.values} blocks hold every element (dense layout): use sparsity 0")
    rows_weight = weight.reshape(-1, weight.shape[-1]) if weight.dim() != 2 else weight
    if stats.hessian is not None and setting.values in GPTQ_ENCODINGS and weight.dim() == 2:
        blocks = gptq_blocks(rows_weight, stats.hessian, [setting.values], stats.input_sq_sum)[setting.values]
    elif setting.values in K_WEIGHTED and stats.input_sq_sum is not None:  # as `mixed` measures them
        blocks = quantize_k_weighted(rows_weight, setting.values, stats.input_sq_sum)
    else:
        blocks = quantize_weighted(rows_weight, setting.values, stats.input_sq_sum)
    return block_tensor(weight, setting.values, blocks, dtype, block_size)


def block_tensor(weight: torch.Tensor, encoding: str, blocks: torch.Tensor, dtype: torch.dtype,
                 block_size: int) -> tuple[EncodedTensor, torch.Tensor]:
    """(the dense tensor of `weight`'s shape holding the GGUF `blocks`, the weight it decodes to)."""
    encoded = EncodedTensor(tuple(weight.shape), dtype, "dense", weight.numel(), values=blocks, block_size=block_size,
                            values_encoding=encoding)
    return encoded, decode(encoded)
