"""One Linear weight -> its stored form: prune by a method, quantize the kept values, encode.

A *setting* is the pair (sparsity, values encoding). `compress_weight` applies one to a weight:
magnitude and Wanda prune exactly per row and then round the kept values to the nearest code
(`endor_ray.format.quant`); SparseGPT prunes and quantizes jointly, compensating each choice on
the weights not yet chosen (`endor_ray.compress.sparsegpt`). It returns the encoded tensor and the
weight the store now holds (decoded by the reference decoder), which the converter feeds to the
next layer's calibration and the mixed-precision choice measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from endor_ray.errors import StoreError
from endor_ray.format.tensor import EncodedTensor, decode, encode
from endor_ray.compress.prune import prune_weight


@dataclass(frozen=True)
class Setting:
    """How one tensor is stored: the fraction of each row pruned and how kept values are encoded."""

    sparsity: float
    values: str = "raw"  # "raw" (the stored dtype) | "int8" | "int4"

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
    if method == "sparsegpt" and (setting.sparsity > 0 or setting.values != "raw"):
        from endor_ray.compress.sparsegpt import sparsegpt

        if stats.hessian is None:
            raise StoreError("sparsegpt needs the Linear's input Hessian from calibration; was it collected?")
        result = sparsegpt(weight, stats.hessian, setting.sparsity, setting.values, group_size, dtype)
        encoded = encode(result.weight.to(dtype), block_size, layout=layout,
                         encoding=setting.values, group_size=group_size,
                         mask=result.mask.reshape(-1) if setting.values != "raw" else None, scales=result.scales)
    else:
        pruned = prune(weight, setting.sparsity, method, stats)
        encoded = encode(pruned.to(dtype), block_size, layout=layout, encoding=setting.values, group_size=group_size)
    return encoded, decode(encoded)
