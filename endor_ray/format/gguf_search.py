"""llama.cpp's scale searches (ggml-quants.c ``make_qx_quants``, ``make_qkx2/3_quants``,
``make_qp_quants``, ``make_q3_quants``) in torch, vectorised over blocks, every float32 operation in C's order.

The quantizers in `endor_ray.format.gguf_quantize` are built from these. Three things make torch
agree with C bit for bit: sums accumulate element by element, left to right (`seq_sum`; torch's
and numpy's own sums are pairwise); a constant divided by a tensor is one division (`rdiv`;
torch's ``c / t`` multiplies by a rounded reciprocal); and square roots go through float64 (torch's
float32 ``sqrt`` on the CPU is not correctly rounded, C's ``sqrtf`` is). A search over candidates
that C leaves early per block runs to its end here, taking no step where C would have stopped.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml-quants.c: a group below this magnitude is all zero


def f32(value: float) -> float:
    """`value` rounded to float32 (so a Python constant is the C `float` literal)."""
    return float(np.float32(value))


def nearest_int(value: torch.Tensor) -> torch.Tensor:
    """int32: C's nearest_int, round half to even through the float32 add of 1.5 * 2^23."""
    shifted = (value.float() + 12582912.0).view(torch.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [...]: the float32 sum of terms in index order (C's `sum += term` loop)."""
    return _sum_rows(terms.detach().float().movedim(-1, 0).contiguous())


def _sum_rows(columns: torch.Tensor) -> torch.Tensor:
    """[n, S] -> [S]: the sum over the first axis in index order, one vector add per index (torch's
    and numpy's own sums are pairwise)."""
    total = torch.zeros(columns.shape[1:], dtype=torch.float32, device=columns.device)
    for column in columns:
        total += column
    return total


def rdiv(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as one float32 division."""
    return torch.full_like(denominator, numerator) / denominator


def sqrtf(value: torch.Tensor) -> torch.Tensor:
    """C's correctly rounded sqrtf (float64 square root, rounded once to float32)."""
    return value.double().sqrt().float()


def safe(value: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """`value` where `ok`, else 1 (a divisor for lanes whose result is discarded)."""
    return torch.where(ok, value, torch.ones_like(value))


def first_extreme(x: torch.Tensor, index: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] where `found`, else +0.0 (C's initial value)."""
    picked = x.gather(1, index.unsqueeze(1)).squeeze(1)
    return torch.where(found, picked, torch.zeros_like(picked))


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [S], codes [S, n] uint8 in 0..2 nmax - 1) for blocks x [S, n]: symmetric, the largest
    magnitude at -nmax, 19 candidate scales by weighted least squares (rmse_type 1; weights
    default x^2)."""
    magnitude = x.abs()
    amax = magnitude.amax(dim=1)
    zero = amax < GROUP_MAX_EPS
    peak = safe(first_extreme(x, magnitude.argmax(dim=1), amax > 0), ~zero)  # first largest, as C's `>`
    xt = x.t().contiguous()  # [n, S]: a block's elements down a column
    wt = xt * xt if weights is None else weights.t().contiguous()
    wx = wt * xt

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = nearest_int(iscale * xt).clamp(-nmax, nmax - 1).float()
        return levels, _sum_rows(wx * levels), _sum_rows((wt * levels) * levels)

    levels, sumlx, suml2 = trial(rdiv(-nmax, peak))
    scale = torch.where(suml2 != 0, sumlx / safe(suml2, suml2 != 0), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        candidate, sumlx, suml2 = trial(rdiv(-f32(np.float32(nmax) + np.float32(0.1) * np.float32(step)), peak))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better, candidate, levels)
        new_scale = sumlx / safe(suml2, suml2 > 0)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    codes = torch.where(zero, torch.zeros_like(levels), levels + nmax).t().contiguous()
    return torch.where(zero, torch.zeros_like(scale), scale), codes.to(torch.uint8)


def make_qkx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                    nstep: int, use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale [S], the_min [S], codes [S, n] uint8 in 0..nmax) for blocks x [S, n]: a scale and a
    minimum (at most 0) by weighted least squares over nstep + 1 candidate ranges (make_qkx2_quants
    and make_qkx3_quants, which are the same search for given weights); candidates are compared by
    the weighted squared error, or with `use_mad` the weighted absolute error (q2_k's reference)."""

    def error_of(diff: torch.Tensor) -> torch.Tensor:
        return _sum_rows(wt * (diff.abs() if use_mad else diff * diff))

    xt, wt = x.t().contiguous(), weights.t().contiguous()  # [n, S]: a block's elements down a column
    low = x.amin(dim=1)
    minimum = torch.where(low > 0, torch.zeros_like(low), low)
    maximum = x.amax(dim=1)
    sum_w = _sum_rows(wt)
    sum_x = _sum_rows(wt * xt)
    flat = maximum <= minimum

    def codes_for(iscale: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale * (xt - minimum)).clamp(0, nmax).float()

    iscale = rdiv(nmax, safe(maximum - minimum, ~flat))
    scale = rdiv(1.0, iscale)
    codes = codes_for(iscale)
    best_error = error_of((scale * codes + minimum) - xt)
    for step in range(nstep + 1):
        factor = f32(f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax))
        trial = codes_for(rdiv(factor, safe(maximum - minimum, ~flat)))  # C divides by the current range
        weighted = wt * trial
        sum_l = _sum_rows(weighted)
        sum_l2 = _sum_rows(weighted * trial)
        sum_xl = _sum_rows(weighted * xt)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe(det, ok)
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe(det, ok)
        clipped = this_min > 0
        this_scale = torch.where(clipped, sum_xl / safe(sum_l2, sum_l2 != 0), this_scale)
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        error = error_of((this_scale * trial + this_min) - xt)
        better = ok & (error < best_error) & ~flat
        codes = torch.where(better, trial, codes)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    return scale, -minimum, codes.t().contiguous().to(torch.uint8)


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [S], codes [S, n] int64 in 0..nmax) for non-negative x [S, n] (the k-types' sub-block
    scales and minimums under an importance matrix): 9 candidate scales, then 5 passes moving one
    code at a time while the weighted fit improves."""
    peak = x.clamp(min=0).amax(dim=1)  # C: max = MAX(max, x[i]) from 0
    zero = peak < GROUP_MAX_EPS
    peak = safe(peak, ~zero)

    def error_of(iscale: torch.Tensor, scale: torch.Tensor, clamp: bool) -> torch.Tensor:
        levels = nearest_int(iscale.unsqueeze(1) * x)
        levels = (levels.clamp(max=nmax) if clamp else levels & 0xFF).float()  # C's first pass stores into uint8
        diff = x - scale.unsqueeze(1) * levels
        return seq_sum((weights * diff) * diff)

    iscale = rdiv(nmax, peak)
    best = error_of(iscale, rdiv(1.0, iscale), clamp=False)
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = rdiv(f32(np.float32(0.1) * np.float32(step) + np.float32(nmax)), peak)
        error = error_of(trial, rdiv(1.0, trial), clamp=True)
        better = error < best
        best = torch.where(better, error, best)
        iscale = torch.where(better, trial, iscale)
    codes = nearest_int(iscale.unsqueeze(1) * x).clamp(max=nmax).to(torch.int64) & 0xFF
    levels = codes.float()
    sumlx = seq_sum((weights * x) * levels)
    suml2 = seq_sum((weights * levels) * levels)
    for _ in range(5):  # C stops after a pass that changes nothing; such a pass changes nothing here either
        for index in range(x.shape[1]):
            w, value, old = weights[:, index], x[:, index], codes[:, index].float()
            slx = sumlx - (w * value) * old
            sl2 = suml2 - (w * old) * old
            open_ = (slx > 0) & (sl2 > 0)
            new = nearest_int((value * sl2) / safe(slx, open_)).clamp(max=nmax)
            new_f = new.float()
            slx = slx + (w * value) * new_f
            sl2 = sl2 + (w * new_f) * new_f
            take = open_ & (new.to(torch.int64) != codes[:, index]) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            codes[:, index] = torch.where(take, new.to(torch.int64) & 0xFF, codes[:, index])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / safe(suml2, suml2 > 0), torch.zeros_like(sumlx))
    codes = torch.where(zero.unsqueeze(1), torch.zeros_like(codes), codes)
    return torch.where(zero, torch.zeros_like(scale), scale), codes


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [S], codes [S, n] uint8 in 0..2 nmax - 1; all 0 for an empty block) for blocks x [S, n]:
    symmetric, the largest magnitude at -nmax, then 5 passes moving one code at a time while the
    x^2-weighted fit improves (make_q3_quants with do_rmse, q3_k's reference)."""
    magnitude = x.abs()
    amax = magnitude.amax(dim=1)
    zero = amax < GROUP_MAX_EPS
    peak = safe(first_extreme(x, magnitude.argmax(dim=1), amax > 0), ~zero)
    levels = nearest_int(rdiv(-nmax, peak).unsqueeze(1) * x).clamp(-nmax, nmax - 1)  # [S, n] int32
    weights = x * x
    sumlx = seq_sum((weights * x) * levels.float())
    suml2 = seq_sum((weights * levels.float()) * levels.float())
    for _ in range(5):  # C stops after a pass that changes nothing; such a pass changes nothing here either
        for index in range(x.shape[1]):
            w, value, old = weights[:, index], x[:, index], levels[:, index].float()
            slx = sumlx - (w * value) * old
            sl2 = suml2 - (w * old) * old
            open_ = slx > 0
            new = nearest_int((value * sl2) / safe(slx, open_)).clamp(-nmax, nmax - 1)
            new_f = new.float()
            slx = slx + (w * value) * new_f
            sl2 = sl2 + (w * new_f) * new_f
            take = open_ & (new != levels[:, index]) & (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            levels[:, index] = torch.where(take, new, levels[:, index])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / safe(suml2, suml2 > 0), torch.zeros_like(sumlx))
    codes = torch.where(zero.unsqueeze(1), torch.zeros_like(levels), levels + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes.to(torch.uint8)


def best_index(values: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 indices, float32 levels): C's best_index_int8, the nearest of the sorted levels
    `values` [n] float32 to each x by C's test ``x - below < above - x`` (a tie: the upper one;
    beyond either end, that end: the clamped neighbours' test already gives it)."""
    upper = torch.searchsorted(values, x.contiguous(), right=True).clamp_(1, values.numel() - 1)
    below, above = values[upper - 1], values[upper]
    lower = (x - below) < (above - x)
    return upper - lower.long(), torch.where(lower, below, above)
