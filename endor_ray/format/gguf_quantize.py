"""llama.cpp's reference quantizers (ggml-quants.c ``quantize_row_*_ref``) for the GGUF block types.

Ported from the algorithm, vectorised over blocks, with every float32 operation in the C order
(sums accumulate element by element, left to right; no fused multiply-add), so that:

- q8_0, q4_0, q4_1, q5_0, q5_1 (round to nearest with one scale, and a minimum for the ``_1``
  types) produce the bytes llama.cpp's reference functions produce. gguf-py's
  ``gguf.quants.quantize`` implements the same rules and gives the same bytes, except where a
  block's largest magnitude is a zero of either sign (C keeps its initial ``+0.0``).
- q4_k, q5_k (``make_qkx2_quants``: a search over 21 / 16 candidate scales with a minimum per
  sub-block of 32, then 6-bit sub-block scales under f16 super-block scales) and q6_k
  (``make_qx_quants``: 18 candidate scales per sub-block of 16 weighted by x^2, then 8-bit scales)
  follow the reference search step for step; compilers may contract C's products into fused
  multiply-adds, so a particular llama.cpp build can differ from these bytes in rare ties.

``nearest_int`` is C's ``fval + 1.5 * 2^23`` trick (round half to even for |fval| < 2^22). An
importance matrix (llama.cpp's ``quantize_row_*_impl``) is not implemented yet.
"""

from __future__ import annotations

import numpy as np
import torch

from endor_ray.errors import FormatError
from endor_ray.format.gguf_blocks import BLOCK_TYPES

GROUP_MAX_EPS = float(np.float32(1e-15))


def _f32(value: float) -> float:
    """`value` rounded to float32 (so a Python constant is the C `float` literal)."""
    return float(np.float32(value))


def nearest_int(value: torch.Tensor) -> torch.Tensor:
    """int32: C's nearest_int, round half to even through the float32 add of 1.5 * 2^23."""
    shifted = (value.float() + 12582912.0).view(torch.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def _seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [...]: the float32 sum of terms in index order (C's `sum += term` loop)."""
    # numpy's accumulate adds in order in float32 (torch's sum and numpy's sum are pairwise)
    columns = np.ascontiguousarray(np.moveaxis(terms.detach().cpu().float().numpy(), -1, 0))
    return torch.from_numpy(np.add.accumulate(columns, axis=0)[-1].copy())


def _rdiv(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as one float32 division (torch's `scalar / tensor` multiplies by a
    rounded reciprocal, which is not C's `c / x`)."""
    return torch.full_like(denominator, numerator) / denominator


def _fp16_bytes(value: torch.Tensor) -> torch.Tensor:
    """[num_blocks] float32 -> [num_blocks, 2] uint8: GGML_FP32_TO_FP16 (round to nearest even)."""
    return value.to(torch.float16).view(torch.uint8).view(-1, 2)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 8 * n] 0/1 -> [num_blocks, n] uint8, bit k of byte b = bits[:, 8 b + k]."""
    weights = (1 << torch.arange(8, dtype=torch.int32, device=bits.device))
    return (bits.to(torch.int32).view(bits.shape[0], -1, 8) * weights).sum(-1).to(torch.uint8)


def _round_away(value: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly: floor(|v|) + floor(2 * frac(|v|)), signed."""
    magnitude = value.abs()
    floored = magnitude.floor()
    return torch.sign(value) * (floored + (2 * (magnitude - floored)).floor())


def _first_extreme(x: torch.Tensor, index: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] where `found`, else +0.0 (C's initial value)."""
    picked = x.gather(1, index.unsqueeze(1)).squeeze(1)
    return torch.where(found, picked, torch.zeros_like(picked))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """C's `d ? 1.0f/d : 0.0f`."""
    return torch.where(d != 0, _rdiv(1.0, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))


def _quantize_32(x: torch.Tensor, encoding: str) -> torch.Tensor:
    """[num_blocks, 32] float32 -> [num_blocks, type_size] uint8 for the 32-element types."""
    if encoding == "q8_0":
        d = x.abs().amax(dim=1) / 127
        codes = _round_away(x * _inverse(d).unsqueeze(1)).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), codes], dim=1)
    if encoding in ("q4_0", "q5_0"):
        half = 8 if encoding == "q4_0" else 16  # codes 0..2*half-1, zero at `half`
        magnitude = x.abs()
        largest = magnitude.argmax(dim=1)  # first index of the largest magnitude, as C's strict `<`
        peak = _first_extreme(x, largest, magnitude.amax(dim=1) > 0)
        d = peak / -half
        scaled = x * _inverse(d).unsqueeze(1)
        codes = (scaled + (half + 0.5)).trunc().clamp(max=2 * half - 1).to(torch.uint8)
        minimum = None
    else:
        levels = 15 if encoding == "q4_1" else 31
        minimum = _first_extreme(x, x.argmin(dim=1), torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
        maximum = _first_extreme(x, x.argmax(dim=1), torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
        d = (maximum - minimum) / levels
        scaled = (x - minimum.unsqueeze(1)) * _inverse(d).unsqueeze(1)
        codes = (scaled + 0.5).trunc().clamp(max=levels).to(torch.uint8)
    nibbles = (codes[:, :16] & 0x0F) | ((codes[:, 16:] & 0x0F) << 4)
    head = [_fp16_bytes(d)] + ([] if minimum is None else [_fp16_bytes(minimum)])
    if encoding in ("q5_0", "q5_1"):
        head.append(_pack_bits((codes >> 4) & 1))  # qh: bit e is the fifth bit of element e's code
    return torch.cat([*head, nibbles], dim=1)


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale [S], the_min [S], codes [S, n] uint8) for sub-blocks x [S, n] (least squares, use_mad false)."""
    minimum = torch.where(x.amin(dim=1) > 0, torch.zeros(x.shape[0], device=x.device), x.amin(dim=1))
    maximum = x.amax(dim=1)
    sum_w = _seq_sum(weights)
    sum_x = _seq_sum(weights * x)
    flat = maximum == minimum

    def codes_for(iscale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale.unsqueeze(1) * (x - low.unsqueeze(1))).clamp(0, nmax).float()

    span = torch.where(flat, torch.ones_like(maximum), maximum - minimum)
    iscale = _rdiv(nmax, span)
    scale = _rdiv(1.0, iscale)
    codes = codes_for(iscale, minimum)
    diff = (scale.unsqueeze(1) * codes + minimum.unsqueeze(1)) - x
    best_error = _seq_sum(weights * (diff * diff))
    for step in range(nstep + 1):
        factor = _f32(_f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax))
        span = torch.where(flat, torch.ones_like(maximum), maximum - minimum)
        trial = codes_for(_rdiv(factor, span), minimum)
        sum_l = _seq_sum(weights * trial)
        sum_l2 = _seq_sum((weights * trial) * trial)
        sum_xl = _seq_sum((weights * trial) * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        clipped = this_min > 0
        safe_l2 = torch.where(sum_l2 != 0, sum_l2, torch.ones_like(sum_l2))
        this_scale = torch.where(clipped, sum_xl / safe_l2, this_scale)
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        diff = (this_scale.unsqueeze(1) * trial + this_min.unsqueeze(1)) - x
        error = _seq_sum(weights * (diff * diff))
        better = ok & (error < best_error) & ~flat
        codes = torch.where(better.unsqueeze(1), trial, codes)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat.unsqueeze(1), torch.zeros_like(codes), codes)
    return scale, -minimum, codes.to(torch.uint8)


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [S], codes [S, n] uint8 in 0..2 nmax-1) for sub-blocks x [S, n] (rmse_type 1, weights x^2)."""
    magnitude = x.abs()
    amax = magnitude.amax(dim=1)
    peak = _first_extreme(x, magnitude.argmax(dim=1), amax > 0)
    zero = amax < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    weights = x * x

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = nearest_int(iscale.unsqueeze(1) * x).clamp(-nmax, nmax - 1).float()
        return levels, _seq_sum((weights * x) * levels), _seq_sum((weights * levels) * levels)

    levels, sumlx, suml2 = trial(_rdiv(-nmax, peak))
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        candidate, sumlx, suml2 = trial(_rdiv(-_f32(np.float32(nmax) + np.float32(0.1) * np.float32(step)), peak))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better.unsqueeze(1), candidate, levels)
        new_scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    codes = torch.where(zero.unsqueeze(1), torch.zeros_like(levels), levels + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes.to(torch.uint8)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """[B, 8] 6-bit scales and minimums -> the 12 scale bytes of q4_k / q5_k, [B, 12] uint8."""
    low = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    high = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([low, mid, high], dim=1)


def _quantize_k_min(x: torch.Tensor, encoding: str) -> torch.Tensor:
    """[B, 256] float32 -> q4_k / q5_k blocks (quantize_row_q4_K_ref / q5_K_ref)."""
    num_blocks = x.shape[0]
    nmax, rmin, nstep = (15, -1.0, 20) if encoding == "q4_k" else (31, -0.5, 15)
    sub = x.reshape(num_blocks * 8, 32)
    av_x = _seq_sum(sub * sub).div(32).double().sqrt().float()  # C's sqrtf: torch's float32 sqrt is not exact
    scales, mins, codes = make_qkx2_quants(sub, av_x.unsqueeze(1) + sub.abs(), nmax, rmin, 0.1, nstep)
    scales, mins, codes = scales.view(num_blocks, 8), mins.view(num_blocks, 8), codes.view(num_blocks, 8, 32)
    max_scale = scales.amax(dim=1).clamp(min=0)
    max_min = mins.amax(dim=1).clamp(min=0)
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_min = torch.where(max_min > 0, _rdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    ls = (nearest_int(inv_scale.unsqueeze(1) * scales) & 0xFF).clamp(max=63).to(torch.uint8)
    lm = (nearest_int(inv_min.unsqueeze(1) * mins) & 0xFF).clamp(max=63).to(torch.uint8)
    d, dmin = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
    sub_d = d.float().unsqueeze(1) * ls.float()  # [B, 8]
    sub_m = dmin.float().unsqueeze(1) * lm.float()
    again = nearest_int((x.view(num_blocks, 8, 32) + sub_m.unsqueeze(2))
                        / torch.where(sub_d != 0, sub_d, 1.0).unsqueeze(2)).clamp(0, nmax).to(torch.uint8)
    codes = torch.where((sub_d != 0).unsqueeze(2), again, codes)  # C skips a sub-block whose scale is 0
    pairs = codes.view(num_blocks, 4, 2, 32)  # sub-blocks 2c and 2c+1 share bytes 32c..32c+31
    qs = ((pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)).reshape(num_blocks, 128)
    head = [d.view(torch.uint8).view(-1, 2), dmin.view(torch.uint8).view(-1, 2), _pack_k_scales(ls, lm)]
    if encoding == "q5_k":  # bit s of qh[l]: the fifth bit of sub-block s's element l
        fifth = ((codes >> 4) & 1).transpose(1, 2).reshape(num_blocks, 256)
        head.append(_pack_bits(fifth))
    return torch.cat([*head, qs], dim=1)


def _quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """[B, 256] float32 -> q6_k blocks (quantize_row_q6_K_ref)."""
    num_blocks = x.shape[0]
    scales, codes = make_qx_quants(x.reshape(num_blocks * 16, 16), 32)
    scales, codes = scales.view(num_blocks, 16), codes.view(num_blocks, 16, 16)
    magnitude = scales.abs()
    max_abs = magnitude.amax(dim=1)
    max_scale = _first_extreme(scales, magnitude.argmax(dim=1), max_abs > 0)
    empty = max_abs < GROUP_MAX_EPS
    iscale = _rdiv(-128.0, torch.where(empty, torch.ones_like(max_scale), max_scale))
    d = torch.where(empty, torch.zeros_like(iscale), _rdiv(1.0, iscale)).to(torch.float16)
    sc = nearest_int(iscale.unsqueeze(1) * scales).clamp(max=127)  # [B, 16], within [-128, 127]
    sc = torch.where(empty.unsqueeze(1), torch.zeros_like(sc), sc).to(torch.int8)
    sub_d = d.float().unsqueeze(1) * sc.float()
    again = (nearest_int(x.view(num_blocks, 16, 16) / torch.where(sub_d != 0, sub_d, 1.0).unsqueeze(2))
             .clamp(-32, 31) + 32).to(torch.uint8)
    codes = torch.where((sub_d != 0).unsqueeze(2), again, codes)
    codes = torch.where(empty.view(-1, 1, 1), torch.zeros_like(codes), codes).view(num_blocks, 2, 4, 32)
    low = codes & 0x0F  # [B, half, k, l]
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    high = codes >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return torch.cat([ql.reshape(num_blocks, 128), qh.reshape(num_blocks, 64), sc.view(torch.uint8),
                      d.view(torch.uint8).view(-1, 2)], dim=1)


def quantize_rows(weight: torch.Tensor, encoding: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """[rows * cols / block_elems * type_size] uint8: `weight` [rows, cols] quantized to `encoding`."""
    if importance is not None:
        raise FormatError(f"quantizing to {encoding} with an importance matrix is not implemented yet; "
                          "pass importance=None (llama.cpp's reference quantizer)")
    block = BLOCK_TYPES[encoding]
    x = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).reshape(-1, block.block_elems)
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    if block.block_elems == 32:
        blocks = _quantize_32(x, encoding)
    elif encoding == "q6_k":
        blocks = _quantize_q6_k(x)
    else:
        blocks = _quantize_k_min(x, encoding)
    assert blocks.shape == (x.shape[0], block.type_size)
    return blocks.reshape(-1).to(weight.device)
