"""Importance-weighted rounding into GGUF blocks, against the format's reference and gguf-py."""

import numpy as np
import pytest
import torch

from endor_ray.compress.rounding import WEIGHTED_ENCODINGS, quantize_weighted
from endor_ray.format.gguf_blocks import dequantize_blocks, quantize_blocks

gguf = pytest.importorskip("gguf")


def _case(seed: int, rows: int = 64, cols: int = 256):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.02
    weight[:, ::7] *= 4  # a few large columns, as real weights have
    importance = torch.rand(cols, generator=generator) ** 4 * 10 + 0.01
    return weight, importance


def _weighted(weight, approx, importance):
    sigma2 = 2 * weight.square().mean(dim=1, keepdim=True)
    weights = importance[None] * torch.sqrt(sigma2 + weight.square())
    return (weights * (approx - weight).square()).sum(dim=1)


@pytest.mark.parametrize("encoding", WEIGHTED_ENCODINGS)
def test_blocks_are_valid_gguf_and_no_worse_than_the_reference(encoding):
    weight, importance = _case(1)
    rows, cols = weight.shape
    ours = quantize_weighted(weight, encoding, importance)
    decoded = dequantize_blocks(ours, encoding, rows, cols)
    kind = getattr(gguf.GGMLQuantizationType, encoding.upper())
    by_gguf = gguf.quants.dequantize(ours.numpy().reshape(rows, -1), kind)  # an independent decoder
    assert np.array_equal(by_gguf.reshape(rows, cols), decoded.numpy())
    reference = dequantize_blocks(quantize_blocks(weight, encoding), encoding, rows, cols)
    # per row: the search keeps the reference fit as a candidate, so it never loses (up to rounding ties)
    assert bool((_weighted(weight, decoded, importance) <= _weighted(weight, reference, importance) * (1 + 1e-4)).all())


@pytest.mark.parametrize("encoding", ["q4_0", "q4_1", "q5_1"])
def test_the_output_error_on_correlated_inputs_falls(encoding):
    weight, importance = _case(2)
    rows, cols = weight.shape
    inputs = torch.randn(2048, cols, generator=torch.Generator().manual_seed(3)) * importance.sqrt()
    ours = dequantize_blocks(quantize_weighted(weight, encoding, importance), encoding, rows, cols)
    reference = dequantize_blocks(quantize_blocks(weight, encoding), encoding, rows, cols)
    error = lambda approx: float(((approx - weight) @ inputs.T).square().sum())  # noqa: E731
    assert error(ours) < 0.9 * error(reference)


def test_a_q4_1_grid_is_recovered_exactly():
    generator = torch.Generator().manual_seed(4)
    blocks = 64 * 576 // 32
    scale = (torch.rand(blocks, generator=generator) * 0.01 + 0.001).half().float()
    minimum = (-torch.rand(blocks, generator=generator) * 0.05).half().float()
    codes = torch.randint(0, 16, (blocks, 32), generator=generator).float()
    codes[:, 0], codes[:, 1] = 0, 15  # a real Q4_1 block holds its minimum and maximum
    grid = (scale[:, None] * codes + minimum[:, None]).reshape(64, 576)
    importance = torch.rand(576, generator=generator) + 0.1
    decoded = dequantize_blocks(quantize_weighted(grid, "q4_1", importance), "q4_1", 64, 576)
    assert torch.equal(decoded, grid)


def test_without_importance_it_is_the_reference():
    weight, _ = _case(5)
    assert torch.equal(quantize_weighted(weight, "q4_0", None), quantize_blocks(weight, "q4_0"))
