"""The fast importance-weighted search for the super-block types and iq4_nl: its blocks decode (by
gguf-py, an independent decoder) to an importance-weighted error no worse than a few percent above
llama.cpp's own importance-matrix quantizers' (the format's bit-exact port), on 576-wide rows."""

import gguf
import numpy as np
import pytest
import torch

from endor_ray.compress.rounding_k import K_WEIGHTED, quantize_k_weighted
from endor_ray.errors import ConfigError
from endor_ray.format.gguf_blocks import quantize_blocks

ROWS, COLS = 8, 576  # 18 super-blocks over the flattened tensor, some spanning two rows


def gguf_py_decode(blocks: torch.Tensor, encoding: str) -> torch.Tensor:
    flat = gguf.quants.dequantize(blocks.numpy().reshape(1, -1), gguf.GGMLQuantizationType[encoding.upper()])
    return torch.from_numpy(np.ascontiguousarray(flat)).reshape(ROWS, COLS)


def weighted_error(weight, importance, blocks, encoding) -> float:
    return float((importance * (gguf_py_decode(blocks, encoding) - weight).square()).sum())


@pytest.mark.parametrize("encoding", K_WEIGHTED)
def test_weighted_error_is_llama_cpps_or_better(encoding):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(ROWS, COLS, generator=generator) * 0.02 * (1 + torch.rand(ROWS, 1, generator=generator))
    weight[:, :7] *= 5  # a few outlier columns, as real Linears have
    importance = torch.rand(COLS, generator=generator) ** 4 + 0.01
    ours = quantize_k_weighted(weight, encoding, importance)
    theirs = quantize_blocks(weight, encoding, importance)
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
    assert weighted_error(weight, importance, ours, encoding) <= 1.05 * weighted_error(weight, importance, theirs,
                                                                                         encoding)


def test_without_importance_it_is_llama_cpps_reference():
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(6))
    assert torch.equal(quantize_k_weighted(weight, "q3_k", None), quantize_blocks(weight, "q3_k"))


def test_refusals_say_what_to_change():
    with pytest.raises(ConfigError, match="whole blocks of 256"):
        quantize_k_weighted(torch.randn(1, 576), "q4_k", torch.ones(576))
    with pytest.raises(ConfigError, match="one importance per column"):
        quantize_k_weighted(torch.randn(4, 576), "q4_k", torch.ones(575))
