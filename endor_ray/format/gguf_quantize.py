"""llama.cpp's quantizers for the GGUF block types (ggml-quants.c), ported from the algorithm.

Without an importance matrix these are the reference functions ``quantize_row_*_ref``:

- q8_0: ``d = amax / 127``, codes C's ``roundf(x / d)``; q4_0 / q5_0: ``d = max / -8`` (``-16``)
  with ``max`` the first weight of largest magnitude, codes ``min(15, trunc(x / d + 8.5))``
  (31, 16.5); q4_1 / q5_1: ``d = (max - min) / 15`` (31), ``m = min``, codes
  ``trunc((x - min) / d + 0.5)``. (``1 / d`` is computed once per block, as in C.)
- q4_k / q5_k: per sub-block of 32 a scale and a minimum by weighted least squares over 21 / 16
  candidate ranges (weights ``rms(sub-block) + |x|``), then 6-bit scales and minimums under f16
  super-block scales (the largest / 63), then every code again from the stored scales.
- q6_k: per sub-block of 16 a symmetric scale over 19 candidates weighted by ``x^2``, then int8
  scales under an f16 super-block scale (the largest at -128), then every code again.

With an importance matrix (``importance[cols]``, per column, as llama.cpp's ``quant_weights``;
e.g. the mean squared activation of each input feature) they are ``quantize_row_*_impl``: the
weights of every search become ``importance * sqrt(sigma2 + x^2)`` (``sigma2`` the mean ``x^2`` of
the row, twice that of the super-block for the k-types; q6_k takes ``importance`` itself), q4_0 /
q5_0 search 19 scales, q4_1 / q5_1 37 ranges with a minimum, and the k-types choose their 6-bit
sub-block scales by ``make_qp_quants``; q8_0 ignores it, as llama.cpp does.

q3_k, q2_k and iq4_nl are quantized by `endor_ray.format.gguf_lowbit` (the same ports, its docstring).

Every float32 operation runs in C's order (`endor_ray.format.gguf_search`), so the bytes equal
libggml's (tests compare against a built libggml where one is present, and against gguf-py's
``quantize`` for the five types it implements, which agree except where a block's largest
magnitude is a zero of either sign: C keeps its initial ``+0.0``). Weights are converted to float32
first; NaN and infinities quantize as 0.0 (llama.cpp's float-to-int casts of them are undefined).
"""

from __future__ import annotations

import torch

from endor_ray.errors import FormatError
from endor_ray.format.gguf_blocks import BLOCK_TYPES
from endor_ray.format.gguf_lowbit import quantize_iq4_nl, quantize_q2_k, quantize_q3_k
from endor_ray.format.gguf_search import (
    GROUP_MAX_EPS, first_extreme, make_qkx_quants, make_qp_quants, make_qx_quants, nearest_int, rdiv, safe,
    seq_sum, sqrtf,
)


def _fp16_bytes(value: torch.Tensor) -> torch.Tensor:
    """[num_blocks] float32 -> [num_blocks, 2] uint8: GGML_FP32_TO_FP16 (round to nearest even)."""
    return value.to(torch.float16).view(torch.uint8).view(-1, 2)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 8 * n] 0/1 -> [num_blocks, n] uint8, bit k of byte b = bits[:, 8 b + k]."""
    weights = 1 << torch.arange(8, dtype=torch.int32, device=bits.device)
    return (bits.to(torch.int32).view(bits.shape[0], -1, 8) * weights).sum(-1).to(torch.uint8)


def _round_away(value: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly: floor(|v|) + floor(2 * frac(|v|)), signed."""
    magnitude = value.abs()
    floored = magnitude.floor()
    return torch.sign(value) * (floored + (2 * (magnitude - floored)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """C's `d ? 1.0f/d : 0.0f`."""
    return torch.where(d != 0, rdiv(1.0, safe(d, d != 0)), torch.zeros_like(d))


def _pack_32(encoding: str, d: torch.Tensor, m: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
    """A 32-element type's blocks from its f16 scale d, minimum m ([B] float32) and codes [B, 32] uint8."""
    nibbles = (codes[:, :16] & 0x0F) | ((codes[:, 16:] & 0x0F) << 4)
    head = [_fp16_bytes(d)] + ([] if m is None else [_fp16_bytes(m)])
    if encoding in ("q5_0", "q5_1"):
        head.append(_pack_bits((codes >> 4) & 1))  # qh: bit e is the fifth bit of element e's code
    return torch.cat([*head, nibbles], dim=1)


def _reference_32(x: torch.Tensor, encoding: str) -> torch.Tensor:
    """[B, 32] float32 -> blocks by quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref."""
    if encoding == "q8_0":
        d = x.abs().amax(dim=1) / 127
        codes = _round_away(x * _inverse(d).unsqueeze(1)).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), codes], dim=1)
    if encoding in ("q4_0", "q5_0"):
        half = 8 if encoding == "q4_0" else 16  # codes 0..2*half-1, zero at `half`
        magnitude = x.abs()
        peak = first_extreme(x, magnitude.argmax(dim=1), magnitude.amax(dim=1) > 0)  # first largest, C's `<`
        d = peak / -half
        codes = (x * _inverse(d).unsqueeze(1) + (half + 0.5)).trunc().clamp(max=2 * half - 1).to(torch.uint8)
        return _pack_32(encoding, d, None, codes)
    levels = 15 if encoding == "q4_1" else 31
    everywhere = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    minimum = first_extreme(x, x.argmin(dim=1), everywhere)  # the first of equal extremes, as C's strict `<`
    maximum = first_extreme(x, x.argmax(dim=1), everywhere)
    d = (maximum - minimum) / levels
    codes = ((x - minimum.unsqueeze(1)) * _inverse(d).unsqueeze(1) + 0.5).trunc().clamp(max=levels).to(torch.uint8)
    return _pack_32(encoding, d, minimum, codes)


def _importance_32(x: torch.Tensor, weights: torch.Tensor, encoding: str) -> torch.Tensor:
    """[B, 32] float32 -> blocks by quantize_row_{q4_0,q4_1,q5_0,q5_1}_impl with search weights [B, 32]."""
    if encoding in ("q4_0", "q5_0"):
        scale, codes = make_qx_quants(x, 8 if encoding == "q4_0" else 16, weights)
        return _pack_32(encoding, scale, None, codes)
    scale, the_min, codes = make_qkx_quants(x, weights, 15 if encoding == "q4_1" else 31, -0.9, 0.05, 36)
    return _pack_32(encoding, scale, -the_min, codes)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """[B, 8] 6-bit scales and minimums -> the 12 scale bytes of q4_k / q5_k, [B, 12] uint8."""
    low = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    high = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([low, mid, high], dim=1)


def _k_min(x: torch.Tensor, encoding: str, importance: torch.Tensor | None) -> torch.Tensor:
    """[B, 256] float32 -> q4_k / q5_k blocks (quantize_row_q4_K/q5_K _ref, or _impl with importance [B, 256])."""
    num_blocks = x.shape[0]
    nmax = 15 if encoding == "q4_k" else 31
    sub = x.reshape(num_blocks * 8, 32)
    if importance is None:
        av_x = sqrtf(seq_sum(sub * sub) / 32)
        weights = av_x.unsqueeze(1) + sub.abs()
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if encoding == "q4_k" else (-0.5, 0.1, 15)
    else:
        sigma2 = (2 * seq_sum(x * x)) / 256  # [B]
        weights = importance.reshape(num_blocks * 8, 32) * sqrtf(sigma2.repeat_interleave(8).unsqueeze(1) + sub * sub)
        rmin, rdelta, nstep = -0.9, 0.05, 36
    scales, mins, codes = make_qkx_quants(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins, codes = scales.view(num_blocks, 8), mins.view(num_blocks, 8), codes.view(num_blocks, 8, 32)
    if importance is None:
        max_scale, max_min = scales.amax(dim=1).clamp(min=0), mins.amax(dim=1).clamp(min=0)
        inv_scale = torch.where(max_scale > 0, rdiv(63.0, safe(max_scale, max_scale > 0)), 0.0)
        inv_min = torch.where(max_min > 0, rdiv(63.0, safe(max_min, max_min > 0)), 0.0)
        ls = (nearest_int(inv_scale.unsqueeze(1) * scales) & 0xFF).clamp(max=63)
        lm = (nearest_int(inv_min.unsqueeze(1) * mins) & 0xFF).clamp(max=63)
        d, dmin = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
    else:
        sum_w = seq_sum(weights).view(num_blocks, 8)
        d_block, ls = make_qp_quants(scales, 63, sum_w)
        m_block, lm = make_qp_quants(mins, 63, sum_w)
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        d, dmin = d_block.to(torch.float16), m_block.to(torch.float16)
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    sub_d = d.float().unsqueeze(1) * ls.float()  # [B, 8]
    sub_m = dmin.float().unsqueeze(1) * lm.float()
    again = nearest_int((x.view(num_blocks, 8, 32) + sub_m.unsqueeze(2)) / safe(sub_d, sub_d != 0).unsqueeze(2))
    codes = torch.where((sub_d != 0).unsqueeze(2), again.clamp(0, nmax).to(torch.uint8), codes)  # C skips d == 0
    return pack_k_min(encoding, d, dmin, ls, lm, codes)


def pack_k_min(encoding: str, d: torch.Tensor, dmin: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor,
               codes: torch.Tensor) -> torch.Tensor:
    """q4_k / q5_k blocks [B, 144 / 176] uint8 from float16 d, dmin [B], 6-bit sub-block scales ls and
    minimums lm [B, 8] (uint8) and codes [B, 8, 32] (uint8, 0..15 / 0..31)."""
    num_blocks = codes.shape[0]
    codes = codes.view(num_blocks, 8, 32)
    pairs = codes.view(num_blocks, 4, 2, 32)  # sub-blocks 2c and 2c+1 share bytes 32c..32c+31
    qs = ((pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)).reshape(num_blocks, 128)
    head = [d.view(torch.uint8).view(-1, 2), dmin.view(torch.uint8).view(-1, 2), _pack_k_scales(ls, lm)]
    if encoding == "q5_k":  # bit s of qh[l]: the fifth bit of sub-block s's element l
        head.append(_pack_bits(((codes >> 4) & 1).transpose(1, 2).reshape(num_blocks, 256)))
    return torch.cat([*head, qs], dim=1)


def _q6_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """[B, 256] float32 -> q6_k blocks (quantize_row_q6_K_ref, or _impl with importance [B, 256])."""
    num_blocks = x.shape[0]
    weights = None if importance is None else importance.reshape(num_blocks * 16, 16)
    scales, codes = make_qx_quants(x.reshape(num_blocks * 16, 16), 32, weights)
    scales, codes = scales.view(num_blocks, 16), codes.view(num_blocks, 16, 16)
    magnitude = scales.abs()
    max_abs = magnitude.amax(dim=1)
    max_scale = first_extreme(scales, magnitude.argmax(dim=1), max_abs > 0)
    empty = max_abs < GROUP_MAX_EPS
    iscale = rdiv(-128.0, safe(max_scale, ~empty))
    d = torch.where(empty, torch.zeros_like(iscale), rdiv(1.0, iscale)).to(torch.float16)
    sc = nearest_int(iscale.unsqueeze(1) * scales).clamp(max=127)  # [B, 16], within [-128, 127]
    sc = torch.where(empty.unsqueeze(1), torch.zeros_like(sc), sc).to(torch.int8)
    sub_d = d.float().unsqueeze(1) * sc.float()
    again = (nearest_int(x.view(num_blocks, 16, 16) / safe(sub_d, sub_d != 0).unsqueeze(2)).clamp(-32, 31) + 32)
    codes = torch.where((sub_d != 0).unsqueeze(2), again.to(torch.uint8), codes)
    codes = torch.where(empty.view(-1, 1, 1), torch.zeros_like(codes), codes)
    return pack_q6_k(d, sc, codes)


def pack_q6_k(d: torch.Tensor, sc: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """q6_k blocks [B, 210] uint8 from float16 d [B], int8 sub-block scales sc [B, 16] and codes
    [B, 16, 16] (uint8, the code + 32: 0..63)."""
    num_blocks = codes.shape[0]
    codes = codes.reshape(num_blocks, 2, 4, 32)
    low = codes & 0x0F  # [B, half, k, l]
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    high = codes >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return torch.cat([ql.reshape(num_blocks, 128), qh.reshape(num_blocks, 64), sc.view(torch.uint8),
                      d.view(torch.uint8).view(-1, 2)], dim=1)


def quantize_rows(weight: torch.Tensor, encoding: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """[rows * cols / block_elems * type_size] uint8: `weight` [rows, cols] quantized to `encoding`,
    with llama.cpp's importance-weighted search where `importance` ([cols], finite, >= 0) is given."""
    block = BLOCK_TYPES[encoding]
    rows, cols = weight.shape
    x = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    if importance is not None:
        importance = importance.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        if importance.numel() != cols or not bool((torch.isfinite(importance) & (importance >= 0)).all()):
            raise FormatError(f"the importance of a [{rows}, {cols}] weight is {cols} finite, non-negative values "
                              f"(one per column), got {importance.numel()}")
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=weight.device)
    per_block = None if importance is None else importance.repeat(rows).view(-1, block.block_elems)
    blocks_x = x.view(-1, block.block_elems)
    low_bit = {"q3_k": quantize_q3_k, "q2_k": quantize_q2_k, "iq4_nl": quantize_iq4_nl}
    if encoding in low_bit:
        blocks = low_bit[encoding](blocks_x, per_block)
    elif encoding == "q8_0" or (block.block_elems == 32 and importance is None):
        blocks = _reference_32(blocks_x, encoding)
    elif block.block_elems == 32:
        sigma2 = seq_sum(x * x) / cols  # [rows]: the row's mean x^2
        sigma2 = sigma2.repeat_interleave(cols // 32).unsqueeze(1)
        blocks = _importance_32(blocks_x, per_block * sqrtf(sigma2 + blocks_x * blocks_x), encoding)
    elif encoding == "q6_k":
        blocks = _q6_k(blocks_x, per_block)
    else:
        blocks = _k_min(blocks_x, encoding, per_block)
    assert blocks.shape == (blocks_x.shape[0], block.type_size)
    return blocks.reshape(-1).to(weight.device)
