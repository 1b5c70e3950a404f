"""llama.cpp's quantizers for the low-bit GGUF types q3_k, q2_k and iq4_nl (ggml-quants.c).

Without an importance matrix (llama.cpp's ``quantize_<type>`` given no ``quant_weights``):

- q3_k (``quantize_row_q3_K_ref``): per sub-block of 16 a symmetric scale by ``make_q3_quants``
  (the largest magnitude at -4, then moves of one code at a time weighted by ``x^2``); signed 6-bit
  scales under an f16 super-block scale (the largest at -32); every code again from the stored scales.
- q2_k (``quantize_row_q2_K_ref``): per sub-block of 16 a scale and a minimum over 16 candidate
  ranges, weighted by ``|x|`` and compared by the weighted absolute error; 4-bit scales and
  minimums under f16 super-block scales (the largest at 15); every code again.
- iq4_nl (``quantize_iq4_nl`` with no weights; its ``_ref`` row function takes no search and is not
  what llama-quantize writes): per block of 32 the scale that fits the codebook best (weights
  ``x^2``) among 15 candidates around ``max / -127``, then every code the nearest level of it.

With ``importance[cols]`` (``quantize_row_<type>_impl``): the weights become ``importance *
sqrt(sigma2 + x^2)`` (``sigma2`` twice the super-block's mean ``x^2`` for q3_k and iq4_nl's
block, once for q2_k); q3_k searches by ``make_qx_quants`` and chooses its 6-bit scales by
``make_qx_quants`` weighted by each sub-block's total weight; q2_k searches 37 ranges by squared
error and chooses its 4-bit scales and minimums by ``make_qp_quants``.

Every float32 operation runs in C's order (`endor_ray.format.gguf_search`), so the bytes equal
libggml's where a built one is at hand to compare (tests/test_gguf_blocks.py).
"""

from __future__ import annotations

import torch

from endor_ray.format.gguf_blocks import IQ4_NL_VALUES, q3_k_scales
from endor_ray.format.gguf_search import (
    GROUP_MAX_EPS, best_index, first_extreme, make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants,
    nearest_int, rdiv, safe, seq_sum, sqrtf,
)
from endor_ray.format.gguf_search import _sum_rows as sum_rows  # [n, S] -> [S] in index order


def _fp16_bytes(value: torch.Tensor) -> torch.Tensor:
    """[num_blocks] float32 -> [num_blocks, 2] uint8: GGML_FP32_TO_FP16 (round to nearest even)."""
    return value.to(torch.float16).view(torch.uint8).view(-1, 2)


def _pack_crumbs(codes: torch.Tensor) -> torch.Tensor:
    """[B, 256] codes 0..3 -> qs [B, 64]: element 128 h + 32 k + l at bits 2k of byte 32 h + l."""
    parts = codes.to(torch.uint8).view(-1, 2, 4, 32)
    packed = parts[:, :, 0] | (parts[:, :, 1] << 2) | (parts[:, :, 2] << 4) | (parts[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _pack_q3_scales(levels: torch.Tensor) -> torch.Tensor:
    """[B, 16] 6-bit scale codes (0..63) -> q3_k's 12 scale bytes."""
    low = levels[:, :8] & 0x0F | ((levels[:, 8:] & 0x0F) << 4)  # S[s % 8]: nibble s // 8
    high = levels >> 4  # S[8 + s % 4]: bits 2 (s // 4)
    packed_high = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
    return torch.cat([low, packed_high], dim=1).to(torch.uint8)


def _requantize(x: torch.Tensor, sub_d: torch.Tensor, sub_m: torch.Tensor | None, low: int, high: int,
                codes: torch.Tensor) -> torch.Tensor:
    """[B, 16, 16] codes again from the stored sub-block scales sub_d (and minimums sub_m) [B, 16]:
    nearest_int((x [+ m]) / d) clamped, offset to 0; C skips sub-blocks whose d is 0 (`codes` kept)."""
    shifted = x if sub_m is None else x + sub_m.unsqueeze(2)
    again = nearest_int(shifted / safe(sub_d, sub_d != 0).unsqueeze(2)).clamp(low, high) - low
    return torch.where((sub_d != 0).unsqueeze(2), again.to(torch.uint8), codes)


def quantize_q3_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """[B, 256] float32 -> q3_k blocks [B, 110] (importance [B, 256] per element, or None)."""
    num_blocks = x.shape[0]
    sub = x.reshape(num_blocks * 16, 16)
    if importance is None:
        scales, codes = make_q3_quants(sub, 4)
        scales, codes = scales.view(num_blocks, 16), codes.view(num_blocks, 16, 16)
        magnitude = scales.abs()
        max_scale = first_extreme(scales, magnitude.argmax(dim=1), magnitude.amax(dim=1) > 0)
        some = max_scale != 0
        iscale = rdiv(-32.0, safe(max_scale, some))
        levels = (nearest_int(iscale.unsqueeze(1) * scales).to(torch.int8).to(torch.int32).clamp(-32, 31) + 32)
        levels = torch.where(some.unsqueeze(1), levels, torch.zeros_like(levels))
        d = torch.where(some, rdiv(1.0, iscale), torch.zeros_like(iscale)).to(torch.float16)
    else:
        sigma2 = (2 * seq_sum(x * x)) / 256  # [B]
        weights = importance.reshape(num_blocks * 16, 16) * sqrtf(sigma2.repeat_interleave(16).unsqueeze(1) + sub * sub)
        scales, codes = make_qx_quants(sub, 4, weights)
        scales, codes = scales.view(num_blocks, 16), codes.view(num_blocks, 16, 16)
        d_block, levels = make_qx_quants(scales, 32, seq_sum(weights).view(num_blocks, 16))
        levels, d = levels.to(torch.int32), d_block.to(torch.float16)
    packed_scales = _pack_q3_scales(levels)
    sub_d = d.float().unsqueeze(1) * q3_k_scales(packed_scales).float()  # [B, 16]
    codes = _requantize(x.view(num_blocks, 16, 16), sub_d, None, -4, 3, codes)
    return pack_q3_k(d, levels, codes)


def pack_q3_k(d: torch.Tensor, levels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """q3_k blocks [B, 110] uint8 from float16 d [B], 6-bit scale levels [B, 16] (the signed scale
    + 32: 0..63) and codes [B, 16, 16] (uint8, the code + 4: 0..7)."""
    num_blocks = codes.shape[0]
    codes = codes.reshape(num_blocks, 256)
    high = (codes > 3).view(num_blocks, 8, 32)  # bit e // 32 of hmask[e % 32]
    bit_weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device)).view(1, 8, 1)
    hmask = (high.to(torch.int32) * bit_weights).sum(dim=1).to(torch.uint8)
    return torch.cat([hmask, _pack_crumbs(codes & 3), _pack_q3_scales(levels), d.view(torch.uint8).view(-1, 2)],
                     dim=1)


def quantize_q2_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """[B, 256] float32 -> q2_k blocks [B, 84] (importance [B, 256] per element, or None)."""
    num_blocks = x.shape[0]
    sub = x.reshape(num_blocks * 16, 16)
    if importance is None:
        scales, mins, codes = make_qkx_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = scales.view(num_blocks, 16), mins.view(num_blocks, 16)
        max_scale, max_min = scales.amax(dim=1).clamp(min=0), mins.amax(dim=1).clamp(min=0)  # C's max from 0
        inv_scale = torch.where(max_scale > 0, rdiv(15.0, safe(max_scale, max_scale > 0)), 0.0)
        inv_min = torch.where(max_min > 0, rdiv(15.0, safe(max_min, max_min > 0)), 0.0)
        ls = nearest_int(inv_scale.unsqueeze(1) * scales)  # 0 where the maximum is not positive
        lm = nearest_int(inv_min.unsqueeze(1) * mins)
        d, dmin = (max_scale / 15).to(torch.float16), (max_min / 15).to(torch.float16)
    else:
        sigma2 = seq_sum(x * x) / 256
        weights = importance.reshape(num_blocks * 16, 16) * sqrtf(sigma2.repeat_interleave(16).unsqueeze(1) + sub * sub)
        scales, mins, codes = make_qkx_quants(sub, weights, 3, -0.9, 0.05, 36)
        sum_w = seq_sum(weights).view(num_blocks, 16)
        d_block, ls = make_qp_quants(scales.view(num_blocks, 16), 15, sum_w)
        m_block, lm = make_qp_quants(mins.view(num_blocks, 16), 15, sum_w)
        d, dmin = d_block.to(torch.float16), m_block.to(torch.float16)
    packed = ((ls & 0xFF) | (lm << 4)) & 0xFF  # C stores into a uint8
    sub_d = d.float().unsqueeze(1) * (packed & 0x0F).float()  # [B, 16]
    sub_m = dmin.float().unsqueeze(1) * (packed >> 4).float()
    codes = _requantize(x.view(num_blocks, 16, 16), sub_d, sub_m, 0, 3, codes.view(num_blocks, 16, 16))
    return pack_q2_k(d, dmin, packed, codes)


def pack_q2_k(d: torch.Tensor, dmin: torch.Tensor, packed: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """q2_k blocks [B, 84] uint8 from float16 d, dmin [B], the scale bytes [B, 16] (4-bit scale |
    4-bit minimum << 4) and codes [B, 16, 16] (uint8, 0..3)."""
    return torch.cat([packed.to(torch.uint8), _pack_crumbs(codes.reshape(codes.shape[0], 256)),
                      d.view(torch.uint8).view(-1, 2), dmin.view(torch.uint8).view(-1, 2)], dim=1)


def quantize_iq4_nl(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """[B, 32] float32 -> iq4_nl blocks [B, 18] (importance [B, 32] per element, or None)."""
    values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)
    if importance is None:
        weights = x * x
    else:
        sigma2 = seq_sum(x * x) * 0.0625  # C: sigma2 *= 2.f / 32
        weights = importance * sqrtf(sigma2.unsqueeze(1) + x * x)
    magnitude = x.abs()
    amax = magnitude.amax(dim=1)
    zero = amax < GROUP_MAX_EPS
    peak = safe(first_extreme(x, magnitude.argmax(dim=1), amax > 0), ~zero)
    xt, wt = x.t().contiguous(), weights.t().contiguous()  # [32, B]: a block's elements down a column

    def fit(inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        level = best_index(values, inverse * xt)[1]
        weighted = wt * level
        return sum_rows(weighted * xt), sum_rows(weighted * level)

    sumqx, sumq2 = fit(rdiv(1.0, -peak / -127.0))
    d = torch.where(sumq2 > 0, sumqx / safe(sumq2, sumq2 > 0), torch.zeros_like(sumqx))
    best = d * sumqx
    for step in range(-7, 8):
        sumqx, sumq2 = fit(rdiv(float(step - 127), peak))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / safe(sumq2, better), d)
        best = torch.where(better, d * sumqx, best)
    d = torch.where(zero, torch.zeros_like(d), d)
    inverse = torch.where(d != 0, rdiv(1.0, safe(d, d != 0)), torch.zeros_like(d))
    codes = best_index(values, inverse.unsqueeze(1) * x)[0].to(torch.uint8)  # with the unrounded scale, as C
    return pack_iq4_nl(d, codes)


def pack_iq4_nl(d: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """iq4_nl blocks [B, 18] uint8 from float32 d [B] (stored as float16) and codebook indices [B, 32] (uint8)."""
    return torch.cat([_fp16_bytes(d), codes[:, :16] | (codes[:, 16:] << 4)], dim=1)
