"""Rounding that uses the calibration data: GGUF 32-element blocks chosen by weighted error.

The format's own quantizers (`endor_ray.format.gguf_quantize`) are llama.cpp's reference
round-to-nearest: a block's scale comes from its largest magnitude (and minimum) alone. With
calibration statistics at hand the error that matters is the one the Linear's *outputs* carry:
for a row ``w`` and inputs ``x_t`` it is ``sum_t ((w - w') x_t)^2``, whose diagonal part weighs
column ``j``'s error by ``sum_t x_tj^2`` (the importance, llama.cpp's "importance matrix", here
`CalibrationStats.input_sq_sum`). So each block's parameters are searched for the least

    sum_j  w_j (x_j - dequant_j)^2,      w_j = importance_j * sqrt(sigma2 + x_j^2)

with ``sigma2 = 2 * mean(x^2)`` over the row (the weighting llama.cpp's importance-matrix
quantizers use: the importance, tempered by the weight's own size). For each block:

- symmetric types (q8_0, q4_0, q5_0; codes ``L`` in ``[-nmax, nmax - 1]``, q8_0 ``[-127, 127]``):
  the reference fit (``peak / -nmax``, ``peak`` the signed element of largest magnitude, so all
  2^b levels are used) plus 19 candidate inverse scales ``-(nmax + 0.1 k) / peak`` (``k = -9..9``),
  each followed by the weighted least-squares scale for its codes; then one more rounding with
  the best scale;
- types with a minimum (q4_1, q5_1; ``dequant = d L + m``, ``L`` in ``[0, nmax]``): the
  reference min/max fit plus 21 candidate inverse scales ``(nmax - 1 + 0.1 k) / (max - min)``
  (``k = 0..20``), each followed by the weighted least-squares ``(d, m)`` for its codes.

Every candidate is scored with its scale (and minimum) rounded to float16, as the block stores
them, and the best is kept; the reference fit is always a candidate, so the weighted error is
never worse than round-to-nearest's. The result is ordinary GGUF blocks: any decoder reads them.
"""

from __future__ import annotations

import torch

from endor_ray.errors import ConfigError
from endor_ray.format.gguf_blocks import BLOCK_TYPES, quantize_blocks

WEIGHTED_ENCODINGS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_SYMMETRIC = {"q8_0": (127, 127), "q4_0": (8, 7), "q5_0": (16, 15)}  # codes in [-low, high]
_WITH_MIN = {"q4_1": 15, "q5_1": 31}
_CHUNK_BLOCKS = 8192  # blocks searched at once (candidates x blocks x 32 floats in memory)


def quantize_weighted(weight: torch.Tensor, encoding: str, importance: torch.Tensor | None) -> torch.Tensor:
    """uint8 GGUF blocks of `weight` ([rows, cols]) with each block's parameters searched for the
    least importance-weighted error; without importance (or for other types), the reference."""
    if importance is None or encoding not in WEIGHTED_ENCODINGS:
        return quantize_blocks(weight, encoding)
    rows, cols = weight.shape
    block = BLOCK_TYPES[encoding].block_elems
    if cols % block or importance.shape != (cols,):
        raise ConfigError(f"{encoding} needs columns in multiples of {block} and one importance per column; "
                          f"got a {tuple(weight.shape)} weight and {tuple(importance.shape)} importances")
    x = weight.detach().float().cpu()
    sigma2 = 2 * x.square().mean(dim=1, keepdim=True)  # [rows, 1]
    w = importance.float().cpu().clamp(min=0)[None, :] * torch.sqrt(sigma2 + x.square())  # [rows, cols]
    xb, wb = x.reshape(-1, block), w.reshape(-1, block)
    d = torch.empty(xb.shape[0])
    m = torch.zeros(xb.shape[0])
    codes = torch.empty(xb.shape, dtype=torch.int16)
    for start in range(0, xb.shape[0], _CHUNK_BLOCKS):
        part = slice(start, start + _CHUNK_BLOCKS)
        if encoding in _SYMMETRIC:
            d[part], codes[part] = _search_symmetric(xb[part], wb[part], *_SYMMETRIC[encoding])
        else:
            d[part], m[part], codes[part] = _search_with_min(xb[part], wb[part], _WITH_MIN[encoding])
    return pack_32(encoding, d, m, codes).reshape(-1)


def _f16(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float16).float()


def _weighted_error(x: torch.Tensor, w: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return (w * (x - approx).square()).sum(dim=-1)


def _search_symmetric(x: torch.Tensor, w: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float16-valued scale [B], codes [B, 32] in [-low, high]) for blocks x [B, 32]."""
    magnitude = x.abs()
    peak = x.gather(1, magnitude.argmax(dim=1, keepdim=True))  # [B, 1] signed
    safe_peak = torch.where(peak != 0, peak, torch.ones_like(peak))
    steps = torch.arange(-9, 10, dtype=torch.float32)
    base = float(low) if low != high else float(high)  # q8_0: 127 / peak; q4_0: -8 / peak (all 16 levels)
    sign = -1.0 if low != high else 1.0
    iscale = sign * (base + 0.1 * steps)[:, None, None] / safe_peak[None]  # [K, B, 1]
    codes = torch.round(x[None] * iscale).clamp_(-low, high)  # [K, B, 32]
    sum_lx = (w * x * codes).sum(dim=-1)
    sum_l2 = (w * codes.square()).sum(dim=-1)
    scale = _f16(torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), 0.0))
    # the reference fit as a candidate too: the peak on the outermost code, codes by rounding
    ref_scale = _f16(peak.squeeze(1) / (-low if low != high else high))
    ref_inverse = torch.where(ref_scale != 0, 1.0 / torch.where(ref_scale != 0, ref_scale, torch.ones_like(ref_scale)), 0.0)
    ref_codes = torch.round(x * ref_inverse[:, None]).clamp_(-low, high)
    scale, codes = torch.cat([scale, ref_scale[None]]), torch.cat([codes, ref_codes[None]])
    error = _weighted_error(x[None], w[None], scale[..., None] * codes)  # [K + 1, B]
    best = error.argmin(dim=0)
    picked = torch.arange(x.shape[0])
    scale, codes, error = scale[best, picked], codes[best, picked], error[best, picked]
    # one more rounding with the chosen scale, kept where it lowers the error
    inverse = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, torch.ones_like(scale)), 0.0)
    again = torch.round(x * inverse[:, None]).clamp_(-low, high)
    refit_l2 = (w * again.square()).sum(dim=-1)
    refit = _f16(torch.where(refit_l2 > 0, (w * x * again).sum(dim=-1) / torch.where(refit_l2 > 0, refit_l2,
                                                                                      torch.ones_like(refit_l2)), 0.0))
    better = _weighted_error(x, w, refit[:, None] * again) < error
    scale = torch.where(better, refit, scale)
    codes = torch.where(better[:, None], again, codes)
    zero = magnitude.amax(dim=1) == 0
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, codes).to(torch.int16)


def _search_with_min(x: torch.Tensor, w: torch.Tensor, nmax: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float16-valued scale [B], minimum [B], codes [B, 32] in [0, nmax]) for blocks x [B, 32]."""
    low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    steps = torch.arange(0, 21, dtype=torch.float32)
    iscale = torch.cat([torch.full((1,), float(nmax)), nmax - 1 + 0.1 * steps])[:, None, None] / span[None]  # [K, B, 1]
    codes = torch.round((x[None] - low[None]) * iscale).clamp_(0, nmax)  # [K, B, 32]
    # weighted least squares for (d, m) given the codes: [sum w L^2, sum w L; sum w L, sum w] [d; m] = [sum w x L; sum w x]
    sw, sl, sl2 = w.sum(dim=-1), (w * codes).sum(dim=-1), (w * codes.square()).sum(dim=-1)
    sx, sxl = (w * x).sum(dim=-1), (w * x * codes).sum(dim=-1)
    det = sw * sl2 - sl * sl
    ok = det > 1e-20 * sw * sl2 + 1e-30
    safe = torch.where(ok, det, torch.ones_like(det))
    scale = torch.where(ok, (sw * sxl - sl * sx) / safe, (high - low).squeeze(1) / nmax)
    minimum = torch.where(ok, (sl2 * sx - sl * sxl) / safe, low.squeeze(1))
    candidates = [(_f16(scale), _f16(minimum), codes)]
    # the reference fit (min / max, codes by rounding) as it is stored
    ref_scale = _f16((high - low).squeeze(1) / nmax)
    ref_min = _f16(low.squeeze(1))
    inverse = torch.where(ref_scale != 0, 1.0 / torch.where(ref_scale != 0, ref_scale, torch.ones_like(ref_scale)), 0.0)
    ref_codes = torch.round((x - ref_min[:, None]) * inverse[:, None]).clamp_(0, nmax)
    candidates.append((ref_scale[None], ref_min[None], ref_codes[None]))
    scale = torch.cat([c[0] for c in candidates])  # [K + 1, B]
    minimum = torch.cat([c[1] for c in candidates])
    codes = torch.cat([c[2] for c in candidates])
    error = _weighted_error(x[None], w[None], scale[..., None] * codes + minimum[..., None])
    best = error.argmin(dim=0)
    picked = torch.arange(x.shape[0])
    return scale[best, picked], minimum[best, picked], codes[best, picked].to(torch.int16)


def pack_32(encoding: str, d: torch.Tensor, m: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """[B, type_size] uint8 GGUF blocks from float16-valued scales d [B], minimums m [B] (the
    ``_1`` types) and codes [B, 32] (signed for the symmetric types, as dequantized: d * code)."""
    fp16 = lambda value: value.to(torch.float16).view(torch.uint8).view(-1, 2)  # noqa: E731
    if encoding == "q8_0":
        return torch.cat([fp16(d), codes.to(torch.int8).view(torch.uint8)], dim=1)
    if encoding in ("q4_0", "q5_0"):
        offset = _SYMMETRIC[encoding][0]
        stored = (codes + offset).to(torch.uint8)  # the block stores code + 8 (q4_0) / + 16 (q5_0)
        head = [fp16(d)]
    else:
        stored = codes.to(torch.uint8)
        head = [fp16(d), fp16(m)]
    if encoding in ("q5_0", "q5_1"):
        fifth = ((stored >> 4) & 1).to(torch.int64)
        head.append((fifth << torch.arange(32)).sum(dim=1).to(torch.int32).view(torch.uint8).view(-1, 4))
    nibbles = (stored[:, :16] & 0x0F) | ((stored[:, 16:] & 0x0F) << 4)
    return torch.cat([*head, nibbles], dim=1)
