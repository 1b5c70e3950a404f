"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with second-order weight updates,
jointly with the INT8 / INT4 quantization of `endor_ray.format.quant`.

What it does
------------
A Linear ``y = W x`` (``W[out, in]``) is pruned so that its outputs on calibration inputs change as
little as possible: for each row ``w`` the loss is ``(w - w') H (w - w')^T`` with the Hessian
``H = sum_t x_t x_t^T`` of the inputs the Linear saw. Columns are processed left to right; when
column ``j`` is fixed to a value ``q`` (0 if pruned, its quantized value if quantized, itself if
kept raw), the Optimal Brain Surgeon update spreads the error over the columns not yet fixed::

    err = (w_j - q) / U_jj            W[:, k] -= err * U_jk   for k > j

where ``U`` is the upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``). Row ``j`` of ``U`` is the
row of the inverse Hessian of the still-free columns ``j..in-1``, scaled by ``1 / sqrt`` of its
diagonal, so the whole left-to-right elimination costs one Cholesky, not one inverse per column.
Columns go in blocks of ``block_columns``: inside a block the update is applied column by column;
the rest of the matrix gets the block's errors at once (``W[:, i2:] -= Err @ U[i1:i2, i2:]``, the
paper's lazy batch update). At the start of each block the mask of that block is chosen from the
current (already updated) weights by the OBS saliency ``w_j^2 / [H_F^-1]_jj = w_j^2 / U_jj^2``
(``F`` = the free columns), the paper's adaptive mask selection.

Inputs as in the reference implementation: an input that never fired (``H_jj == 0``) gets
``H_jj = 1`` and ``W[:, j] = 0``; the diagonal is dampened by ``damp * mean(diag(H))``.
Scaling ``H`` changes nothing, so the caller may pass a sum or a mean over tokens.

Differences from the paper, and why
-----------------------------------
* Per-row masks. The paper prunes the ``sparsity`` fraction of each block over all rows at once,
  so rows end with different counts. Here each row is pruned on its own inside each block: block
  ``[i1, i2)`` prunes exactly ``int(i2 * s) - int(i1 * s)`` weights of every row, so every row
  loses exactly ``int(in * s)`` weights overall (the same count as `endor_ray.compress.prune`) and
  ``int(i2 * s)`` up to column ``i2``. Equal counts give every row the same number of
  quantization groups (no unused scale slots) and the same work per row in a kernel.

* Joint quantization in two sweeps. A quantization group is ``G`` consecutive *kept* weights of a
  row, so its members, and so its scale, are known only once the row's mask is known far ahead
  (with ``G = 128`` at 50% a group spans about 256 columns, i.e. later blocks whose masks the
  adaptive selection has not chosen yet). So:

  1. the first sweep is plain SparseGPT and only chooses the mask (its weights are dropped);
  2. the second sweep starts again from the original weights, with the mask fixed, and runs the
     paper's joint loop: a pruned weight goes to 0, a kept one to its dequantized value, and the
     error of either is spread over the later columns (GPTQ with the mask built in). A group's
     scale is set when the sweep reaches the group's first kept weight, from the *current* values
     of all its members (``max |w| / qmax``, rounded to ``dtype``; members in later blocks get the
     pending updates of the current block first, so they are exact too), and the codes are
     ``clamp(round_half_even(w / scale), -qmax, qmax)``, as the format defines them. Later
     members may have grown past the scale by the time they are reached; they clamp, as in GPTQ.

  With the mask fixed, the second sweep without rounding would reproduce the first exactly (the
  updates are linear), so the pruning error is compensated as before and the quantization error
  on top of it. The one difference from the paper's single loop is that the mask of a block does
  not see the quantization errors of earlier blocks: a second-order effect, for a 2x cost only on
  quantized encodings. GPTQ's reference computes a group's parameters from weights that miss the
  current block's updates; here they are current.

* ``sparsity == 0`` with a quantized encoding is GPTQ (no first sweep); ``encoding == "raw"`` is
  plain SparseGPT whose float32 result is rounded once to ``dtype``.

The result re-encodes exactly: ``encode(weight, encoding=..., mask=mask, scales=scales)`` decodes
to ``weight`` bit for bit (kept zeros included), because each kept value is already
``dtype(float32(code) * float32(scale))`` and re-quantizing it gives back its code.

Numerics: float32 throughout. If a Cholesky factorization fails (an indefinite or badly
conditioned Hessian), the dampening is raised tenfold, up to three times, before a ConfigError.
Cost: two Cholesky factorizations and an inverse of ``[in, in]``, ``~ out * in^2`` flops of
lazy updates and a Python loop over the columns (about 10 small tensor ops per column).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from endor_ray.errors import ConfigError
from endor_ray.format.quant import MAX_GROUP_SIZE, QUANTIZED_ENCODINGS
from endor_ray.format.tensor import DTYPES
from endor_ray.compress.prune import check_sparsity, lowest_in_rows

log = logging.getLogger(__name__)

# The joint sweep rounds to the format's group-scaled codes (block encodings are chosen elsewhere)
ENCODINGS = ("raw", *QUANTIZED_ENCODINGS)
DAMP_RETRIES = 3  # each multiplies the dampening by 10


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # [out, in] in `dtype`: pruned, OBS-updated and (if quantized) dequantized values
    mask: torch.Tensor  # [out, in] bool: kept positions (a kept weight may be exactly 0 after quantization)
    scales: torch.Tensor | None  # quantized: [rows * groups_per_row] in `dtype`, as format.quant defines them


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    encoding: str = "raw",
    group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    block_columns: int = 128,
    damp: float = 0.01,
) -> SparseGPTResult:
    """Prune (and quantize) one Linear weight ``[out, in]`` given ``hessian = sum_t x_t x_t^T``.

    Every row loses exactly ``int(in * sparsity)`` weights; see the module docstring.
    """
    _check_arguments(weight, hessian, sparsity, encoding, group_size, dtype, block_columns, damp)
    rows, cols = weight.shape
    W = weight.detach().to(torch.float32).clone()
    if rows == 0 or cols == 0:
        mask = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
        scales = None if encoding == "raw" else torch.zeros(0, dtype=dtype, device=W.device)
        return SparseGPTResult(W.to(dtype), mask, scales)
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_factor(H, damp)

    WT = W.t().contiguous()  # [in, out]: column j of W is the contiguous row WT[j]
    if sparsity > 0:
        swept = WT.clone() if encoding != "raw" else WT
        prunedT = _prune_sweep(swept, U, sparsity, block_columns)
        keepT = ~prunedT
    else:
        keepT = torch.ones_like(WT, dtype=torch.bool)
        swept = WT
    if encoding == "raw":
        return SparseGPTResult(swept.to(dtype).t().contiguous(), keepT.t().contiguous(), None)
    QT, scales = _quantize_sweep(WT, U, keepT, encoding, group_size, dtype, block_columns)
    return SparseGPTResult(QT.to(dtype).t().contiguous(), keepT.t().contiguous(), scales)


def _check_arguments(weight, hessian, sparsity, encoding, group_size, dtype, block_columns, damp) -> None:
    check_sparsity(sparsity)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ConfigError(f"SparseGPT needs a 2-D floating-point weight [out, in], got {tuple(weight.shape)} {weight.dtype}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ConfigError(f"the Hessian must be [{cols}, {cols}] for a weight {tuple(weight.shape)}, "
                          f"got {tuple(hessian.shape)}")
    if encoding not in ENCODINGS:
        raise ConfigError(f"unknown values encoding {encoding!r}; expected one of {ENCODINGS}")
    if not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ConfigError(f"group size must be an integer in [1, {MAX_GROUP_SIZE}], got {group_size!r}")
    if dtype not in DTYPES.values():
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
    if not isinstance(block_columns, int) or block_columns < 1:
        raise ConfigError(f"block_columns must be a positive integer, got {block_columns!r}")
    if not (math.isfinite(damp) and damp >= 0):
        raise ConfigError(f"damp must be a finite number >= 0, got {damp}")
    if not bool(torch.isfinite(weight).all()):
        raise ConfigError("the weight has NaN or infinite values; SparseGPT cannot prune it")
    if not bool(torch.isfinite(hessian).all()):
        raise ConfigError("the Hessian has NaN or infinite values: check that the calibration activations are "
                          "finite and that the sum of x x^T was accumulated in float32")
    if bool((hessian.diagonal() < 0).any()):
        raise ConfigError("the Hessian has a negative diagonal entry, so it is not a sum of x x^T: "
                          "check how it was accumulated")


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """[in, in] upper Cholesky factor U of (H + lambda I)^-1, lambda = damp * mean(diag(H)).

    If a factorization fails, lambda is raised tenfold up to `DAMP_RETRIES` times (from at
    least 0.01 of the mean diagonal), then ConfigError.
    """
    mean_diag = float(H.diagonal().mean())
    attempts = [damp] + [max(damp, 0.01) * 10**k for k in range(1, DAMP_RETRIES + 1)]
    for relative in attempts:
        damped = H.clone()
        damped.diagonal().add_(relative * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()) and bool((upper.diagonal() > 0).all()):
                if relative != damp:
                    log.warning("SparseGPT: Cholesky failed with dampening %g; used %g of the mean diagonal",
                                damp, relative)
                return upper
    raise ConfigError(
        f"the Hessian is not positive definite even with dampening {attempts[-1]:g} x its mean diagonal "
        f"({mean_diag:g}): check that it is the sum of x x^T over the Linear's calibration inputs "
        "(symmetric, accumulated in float32, finite) and that the calibration text is long enough"
    )


def _prune_sweep(WT: torch.Tensor, U: torch.Tensor, sparsity: float, block_columns: int) -> torch.Tensor:
    """SparseGPT on WT ([in, out], updated in place, pruned entries +0.0); returns the pruned mask."""
    cols = WT.shape[0]
    prunedT = torch.zeros(WT.shape, dtype=torch.bool, device=WT.device)
    for i1 in range(0, cols, block_columns):
        i2 = min(i1 + block_columns, cols)
        count = int(i2 * sparsity) - int(i1 * sparsity)
        if count == 0:
            continue  # nothing pruned here: no error to spread
        W1 = WT[i1:i2]  # a view: the updates land in WT
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        P1 = lowest_in_rows((W1.square() / d.square()[:, None]).t(), count).t()  # per row of W
        prunedT[i1:i2] = P1
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            err = torch.where(P1[i], W1[i], 0.0).div_(d[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
            Err1[i] = err
        W1.masked_fill_(P1, 0.0)
        WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    return prunedT


def _quantize_sweep(WT: torch.Tensor, U: torch.Tensor, keepT: torch.Tensor, encoding: str, group_size: int,
                    dtype: torch.dtype, block_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint loop with the mask fixed: ([in, out] float32 values of `dtype`, scales in `dtype`).

    WT ([in, out]) is consumed (updated in place).
    """
    cols, rows = WT.shape
    device = WT.device
    qmax = QUANTIZED_ENCODINGS[encoding]
    rank = keepT.cumsum(dim=0) - 1  # [in, out]: kept weights of the row before this one
    gid = torch.where(keepT, torch.div(rank, group_size, rounding_mode="floor"), -1)  # group within the row
    kept_per_row = keepT.sum(dim=0)
    per_row = -(-int(kept_per_row.max()) // group_size)
    slot = gid + torch.arange(rows, device=device) * per_row  # scale slot of a kept weight
    column = torch.arange(cols, device=device)[:, None].expand(cols, rows)
    group_last = torch.full((rows * per_row,), -1, dtype=torch.int64, device=device)
    group_last.scatter_reduce_(0, slot[keepT], column[keepT], reduce="amax")  # last column of each group

    start_cols, start_rows = torch.nonzero(keepT & (rank % group_size == 0), as_tuple=True)  # by column
    per_column = torch.bincount(start_cols, minlength=cols)
    start_slots = slot[start_cols, start_rows]
    reach = torch.full((cols,), -1, dtype=torch.int64, device=device)  # last column a group started here covers
    reach.scatter_reduce_(0, start_cols, group_last[start_slots], reduce="amax")
    sizes = per_column.tolist()
    rows_at = start_rows.split(sizes)
    slots_at = start_slots.split(sizes)

    scales = torch.zeros(rows * per_row, dtype=torch.float32, device=device)
    scale = torch.zeros(rows, dtype=torch.float32, device=device)  # the current group's scale, per row
    divisor = torch.ones(rows, dtype=torch.float32, device=device)  # the same, 1 where it is 0
    QT = torch.empty_like(WT)
    for i1 in range(0, cols, block_columns):
        i2 = min(i1 + block_columns, cols)
        W1 = WT[i1:i2]
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        Err1 = torch.zeros_like(W1)
        end = max(i2, int(reach[i1:i2].max()) + 1)  # groups starting in this block end before `end`
        for i in range(i2 - i1):
            j = i1 + i
            starting = rows_at[j]
            if starting.numel():  # rows whose next group starts here: its scale from its current values
                current = W1[i:, starting]
                if end > i2:  # members past the block: their values with this block's pending updates
                    later = WT[i2:end, starting] - U[i1:j, i2:end].t() @ Err1[:i, starting]
                    current = torch.cat([current, later])
                members = gid[j:end, starting] == gid[j, starting]
                amax = torch.where(members, current.abs(), 0.0).amax(dim=0)
                group_scale = (amax / qmax).to(dtype).float()
                scale[starting] = group_scale
                divisor[starting] = torch.where(group_scale > 0, group_scale, 1.0)
                scales[slots_at[j]] = group_scale
            w = W1[i]
            code = torch.round(w / divisor).clamp_(-qmax, qmax)
            q = (code * scale).to(dtype).float().add_(0.0)  # + 0.0: a zero code decodes to +0.0
            q = torch.where(keepT[j], q, 0.0)
            err = (w - q).div_(d[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
            Err1[i] = err
            QT[j] = q
        WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    return QT, scales.to(dtype)
