"""GPTQ into GGUF blocks, against a plain reference GPTQ, gguf-py's decoder and importance-weighted rounding."""

import numpy as np
import pytest
import torch

from endor_ray.compress.gptq_blocks import gptq_blocks
from endor_ray.compress.rounding import code_range, quantize_weighted, search_blocks
from endor_ray.compress.setting import GPTQ_ENCODINGS
from endor_ray.errors import ConfigError
from endor_ray.format.gguf_blocks import dequantize_blocks

gguf = pytest.importorskip("gguf")


def _layer(seed: int, rows: int = 48, cols: int = 128, tokens: int = 4096):
    """A weight and correlated inputs with a few loud channels, as a transformer Linear sees them."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.02
    weight[:, ::9] *= 4
    mixing = 0.3 * torch.eye(cols) + torch.randn(cols, cols, generator=generator) / cols**0.5  # correlated channels
    loud = torch.rand(cols, generator=generator) ** 3 * 8 + 0.1
    inputs = (torch.randn(tokens, cols, generator=generator) @ mixing) * loud
    return weight, inputs


def _relative_error(weight, approx, inputs):
    return float(((approx - weight) @ inputs.T).square().sum() / (weight @ inputs.T).square().sum())


def _reference_gptq(weight, hessian, encoding, damp):
    """Frantar et al.'s loop without the tricks: float64, the inverse Hessian shrunk one column at a
    time (OBS), a block's grid searched on its current values when the loop reaches it."""
    rows, cols = weight.shape
    W = weight.double().clone()
    H = hessian.double().clone()
    importance = hessian.diagonal().float().clone()
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    Hinv = torch.linalg.inv(H)
    sigma2 = 2 * weight.square().mean(dim=1, keepdim=True)
    low, high = code_range(encoding)
    Q = torch.empty(rows, cols, dtype=torch.float64)
    for j in range(cols):
        if j % 32 == 0:
            x = W[:, j:j + 32].float()
            scale, minimum, _ = search_blocks(x, importance[j:j + 32][None] * torch.sqrt(sigma2 + x.square()), encoding)
        code = torch.round((W[:, j].float() - minimum) / torch.where(scale != 0, scale, 1.0)).clamp(low, high)
        q = (scale * code + minimum).double()
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
        Q[:, j] = q
    return Q.float()


@pytest.mark.parametrize("encoding", GPTQ_ENCODINGS)
def test_blocks_decode_as_gguf_py_does_and_match_the_reference_gptq(encoding):
    weight, inputs = _layer(1)
    rows, cols = weight.shape
    hessian = inputs.T @ inputs
    blocks = gptq_blocks(weight, hessian, [encoding], damp=0.1)[encoding]
    decoded = dequantize_blocks(blocks, encoding, rows, cols)
    kind = getattr(gguf.GGMLQuantizationType, encoding.upper())
    by_gguf = gguf.quants.dequantize(blocks.numpy().reshape(rows, -1), kind).reshape(rows, cols)
    assert np.array_equal(by_gguf, decoded.numpy())
    reference = _reference_gptq(weight, hessian, encoding, damp=0.1)
    # float32 against float64 may round a rare tie the other way; the rest is the same algorithm
    assert float((decoded == reference).float().mean()) > 0.97
    assert _relative_error(weight, decoded, inputs) == pytest.approx(_relative_error(weight, reference, inputs), rel=0.03)


@pytest.mark.parametrize("encoding", GPTQ_ENCODINGS)
def test_gptq_beats_importance_weighted_rounding_on_other_tokens(encoding):
    weight, inputs = _layer(2)
    rows, cols = weight.shape
    fit, check = inputs[:2048], inputs[2048:]
    hessian = fit.T @ fit
    ours = dequantize_blocks(gptq_blocks(weight, hessian, [encoding])[encoding], encoding, rows, cols)
    weighted = dequantize_blocks(quantize_weighted(weight, encoding, hessian.diagonal()), encoding, rows, cols)
    assert _relative_error(weight, ours, check) < 0.85 * _relative_error(weight, weighted, check)


def test_encodings_computed_together_equal_each_alone():
    weight, inputs = _layer(3, rows=40, cols=96)
    hessian = inputs.T @ inputs
    together = gptq_blocks(weight, hessian, list(GPTQ_ENCODINGS))
    for encoding in GPTQ_ENCODINGS:
        assert torch.equal(together[encoding], gptq_blocks(weight, hessian, [encoding])[encoding])


def test_a_weight_on_a_q4_1_grid_is_kept_exactly():
    generator = torch.Generator().manual_seed(4)
    rows, cols = 32, 128
    scale = (torch.rand(rows * cols // 32, generator=generator) * 0.01 + 0.001).half().float()
    minimum = (-torch.rand(rows * cols // 32, generator=generator) * 0.05).half().float()
    codes = torch.randint(0, 16, (rows * cols // 32, 32), generator=generator).float()
    codes[:, 0], codes[:, 1] = 0, 15
    grid = (scale[:, None] * codes + minimum[:, None]).reshape(rows, cols)
    _, inputs = _layer(5, rows=rows, cols=cols)
    blocks = gptq_blocks(grid, inputs.T @ inputs, ["q4_1"])["q4_1"]
    assert torch.equal(dequantize_blocks(blocks, "q4_1", rows, cols), grid)


def test_inputs_that_never_fired_and_bad_shapes():
    weight, inputs = _layer(6, rows=16, cols=64)
    inputs[:, 5] = 0
    blocks = gptq_blocks(weight, inputs.T @ inputs, ["q4_0"])["q4_0"]
    assert bool(torch.isfinite(dequantize_blocks(blocks, "q4_0", 16, 64)).all())
    with pytest.raises(ConfigError, match="multiples of 32"):
        gptq_blocks(weight[:, :48], torch.eye(48), ["q4_0"])
    with pytest.raises(ConfigError, match="32-element GGUF types"):
        gptq_blocks(weight, torch.eye(64), ["q4_k"])
