"""GPTQ into GGUF blocks: second-order rounding whose grid per 32 columns is a q4_0/q4_1/q5_0/q5_1/q8_0 block's.

GPTQ (Frantar et al., 2023) rounds a Linear's weight ``W[out, in]`` one column at a time and spreads
each column's rounding error over the columns not yet rounded, so that the outputs on the
calibration inputs change as little as possible (``tr(dW H dW^T)``, ``H = sum_t x_t x_t^T``). The
elimination is the one of `endor_ray.compress.sparsegpt` (upper Cholesky factor ``U`` of the
dampened ``H^-1``, columns in blocks of ``block_columns`` with lazy updates of the rest)::

    err = (w_j - q_j) / U_jj            W[:, k] -= err * U_jk   for k > j

Here the grid is a GGUF block's: every row's 32 columns ``[32 g, 32 g + 32)`` share one float16
scale (and, for the ``_1`` types, one float16 minimum). A block's parameters are chosen when the
column loop reaches its first column, from the block's *current* values (the updates of all
earlier columns applied), by the importance-weighted search of `endor_ray.compress.rounding`
(weights ``importance_j * sqrt(sigma2 + x_j^2)``, importance the Hessian diagonal unless given,
``sigma2`` from the original row); then each column is rounded to the nearest code of that fixed
grid as the loop reaches it (``round((w - m) / d)`` clamped to the type's codes; q4_0 uses all
16 levels, codes -8..7) and its error is spread on. The values fed back are computed as the
reference decoder computes them (``d * code`` or ``d * code + m`` in float32), so the blocks
written decode to exactly the values GPTQ compensated for.

Why: importance-weighted rounding alone fits each block to the weights as they are; GPTQ also
moves the weights not yet rounded to cancel the error already made. On SmolLM2 (q4_0, relative
output error on self-written tokens other than the 2048 fitted) layer 15's v_proj goes from 0.0288
(RTN) and 0.0168 (weighted RTN) to 0.0070, its q_proj from 0.0049 / 0.0023 to 0.0011, its
down_proj from 0.0076 / 0.0056 to 0.0048. The project's INT4 GPTQ (`endor_ray.compress.sparsegpt`,
group 32) was worse than weighted RTN there (layer 5 q_proj 0.0029 against 0.0021): its codes
leave -8 unused (15 levels), its scale is the group's largest magnitude over 7 with no search,
and its 1% dampening overfits the calibration tokens (see `DAMP`).

Inputs that never fired (``H_jj == 0``) get ``H_jj = 1`` and weight 0, as in the reference GPTQ;
the dampening is ``damp * mean(diag(H))`` (raised tenfold on a failed factorization, see
`endor_ray.compress.sparsegpt.inverse_hessian_factor`). Cost per tensor: one Cholesky and an
inverse of ``[in, in]``, ``~ out * in^2`` flops of updates, a Python loop over the columns (about
eight small tensor ops each) and one parameter search per 32 columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from endor_ray.errors import ConfigError
from endor_ray.compress.rounding import WEIGHTED_ENCODINGS, code_range, pack_32, search_blocks
from endor_ray.compress.sparsegpt import inverse_hessian_factor

BLOCK = 32  # elements per block of every type here
# Dampening, as a fraction of the mean Hessian diagonal. The reference's 1% overfits the
# calibration tokens: on SmolLM2 (2048 self-written tokens, layers 1/5/15, q4_0) the output error
# on other self-written tokens of mlp.down_proj (1536 inputs) was 0.0092 at 1%, above weighted
# RTN's 0.0052, and 0.0056 / 0.0050 at 30% / 100%; the 576-input Linears do best at 10-30%
# (self_attn.v_proj of layer 15: 0.0068 at 10%, 0.0070 at 30%, weighted RTN 0.0168).
DAMP = 0.3


def gptq_blocks(weight: torch.Tensor, hessian: torch.Tensor, encodings: Sequence[str],
                importance: torch.Tensor | None = None, damp: float = DAMP,
                block_columns: int = 128) -> dict[str, torch.Tensor]:
    """Per encoding, the uint8 GGUF blocks (``[rows * cols / 32 * type_size]``) of `weight`
    ``[rows, cols]`` rounded by GPTQ on that type's grid, given ``hessian = sum_t x_t x_t^T``.

    The encodings share one factorization and one column loop: GPTQ's updates are per row, so
    the rows of every encoding are eliminated together as one taller matrix.
    """
    rows, cols = weight.shape
    unknown = [encoding for encoding in encodings if encoding not in WEIGHTED_ENCODINGS]
    if unknown or not encodings:
        raise ConfigError(f"GPTQ writes the 32-element GGUF types {WEIGHTED_ENCODINGS}, not {list(encodings)}")
    if cols % BLOCK or hessian.shape != (cols, cols) or block_columns % BLOCK or block_columns < BLOCK:
        raise ConfigError(f"GPTQ into GGUF blocks needs columns in multiples of {BLOCK}, a [{cols}, {cols}] "
                          f"Hessian and block_columns a multiple of {BLOCK}; got a {tuple(weight.shape)} weight, "
                          f"a {tuple(hessian.shape)} Hessian and block_columns {block_columns}")
    W = weight.detach().float().cpu().clone()
    H = hessian.detach().float().cpu().clone()
    if not (bool(torch.isfinite(W).all()) and bool(torch.isfinite(H).all())):
        raise ConfigError("GPTQ needs a finite weight and Hessian: check the calibration activations")
    importance = (H.diagonal().clone() if importance is None else importance.detach().float().cpu()).clamp(min=0)
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_factor(H, damp)
    count = len(encodings)
    parts = [slice(k * rows, (k + 1) * rows) for k in range(count)]  # each encoding's rows of the stack
    sigma2 = (2 * W.square().mean(dim=1, keepdim=True)).repeat(count, 1)  # the search weighs the original rows
    ranges = torch.tensor([code_range(encoding) for encoding in encodings], dtype=torch.float32)
    low, high = ranges[:, 0].repeat_interleave(rows), ranges[:, 1].repeat_interleave(rows)
    groups = cols // BLOCK
    scales, minimums = torch.zeros(groups, count * rows), torch.zeros(groups, count * rows)
    codesT = torch.empty(cols, count * rows, dtype=torch.int16)
    WT = W.t().repeat(1, count).contiguous()  # [cols, count * rows]: column j of every copy is the row WT[j]
    scale = minimum = inverse = None
    for i1 in range(0, cols, block_columns):
        i2 = min(i1 + block_columns, cols)
        W1, U1 = WT[i1:i2], U[i1:i2, i1:i2]
        diagonal = U1.diagonal()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if j % BLOCK == 0:  # a block starts: its grid from its current values
                x = W1[i:i + BLOCK].t().contiguous()  # [count * rows, 32]
                weights = importance[j:j + BLOCK][None, :] * torch.sqrt(sigma2 + x.square())
                found = [search_blocks(x[part], weights[part], encoding) for part, encoding in zip(parts, encodings)]
                scale, minimum = torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
                scales[j // BLOCK], minimums[j // BLOCK] = scale, minimum
                inverse = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
            w = W1[i]
            code = torch.minimum(torch.maximum(torch.round((w - minimum) * inverse), low), high)
            q = scale * code + minimum  # as the decoder computes it (the minimum is 0 for the symmetric types)
            err = (w - q).div_(diagonal[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
            Err1[i] = err
            codesT[j] = code.to(torch.int16)
        WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    blocks = {}
    for part, encoding in zip(parts, encodings):
        codes = codesT[:, part].t().reshape(rows * groups, BLOCK)  # block b = row * groups + g, as the format orders
        blocks[encoding] = pack_32(encoding, scales[:, part].t().reshape(-1), minimums[:, part].t().reshape(-1),
                                   codes).reshape(-1)
    return blocks
