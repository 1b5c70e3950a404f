"""Rounding that uses the calibration data, for the super-block types and iq4_nl: fast weighted search.

`endor_ray.compress.rounding` does this for the 32-element types; here the same error,

    sum_j  w_j (x_j - dequant_j)^2,      w_j = importance_j * sqrt(sigma2 + x_j^2)

(``sigma2`` twice the super-block's mean ``x^2``, once for q2_k, twice the block's for iq4_nl: the
weights of llama.cpp's importance-matrix quantizers), is searched for the k-types q2_k, q3_k, q4_k,
q5_k, q6_k and the codebook type iq4_nl, in a few vectorized passes instead of llama.cpp's
sequential ones (`endor_ray.format.gguf_quantize`, a bit-exact port, takes 4-16 s for one SmolLM2
MLP weight; this takes a fraction of a second, which measuring every candidate setting of every
tensor needs). For each super-block of 256 (blocks over the flattened tensor, `gguf_blocks`):

1. every sub-block (32 for q4_k/q5_k, 16 for the others) gets its own scale (and minimum, which
   the k-types keep at most 0) by trying the reference fit and `STEPS` offsets of the outermost
   code, each with its weighted least-squares scale (and minimum), and keeping the least error;
2. the sub-block scales (and minimums) are quantized to the type's integer levels under a float16
   super-block scale (the largest at the top level), each level rounded down or up, whichever (of
   the two, or four with a minimum) gives the sub-block the least weighted error once its codes are
   rounded again to the stored grid;
3. the codes are the nearest of that stored grid.

iq4_nl's blocks of 32 get the scale among `STEPS` around the reference (the peak at -127) with the
least weighted error, each candidate's codes the nearest codebook levels and its scale their
weighted least-squares fit. The results are ordinary GGUF blocks (the format's packers): any
decoder reads them. Without importance the format's ports of llama.cpp's reference quantizers run.
"""

from __future__ import annotations

import torch

from endor_ray.errors import ConfigError
from endor_ray.format.gguf_blocks import BLOCK_TYPES, IQ4_NL_VALUES, blocks_fit, quantize_blocks
from endor_ray.format.gguf_lowbit import pack_iq4_nl, pack_q2_k, pack_q3_k
from endor_ray.format.gguf_quantize import pack_k_min, pack_q6_k

K_WEIGHTED = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl")
STEPS = (-0.9, -0.6, -0.3, 0.3, 0.6, 0.9, 1.2)  # offsets of the outermost code around the reference fit
# (sub-block elems, lowest code, highest code, with a minimum, top scale level) per type
_GEOMETRY = {"q4_k": (32, 0, 15, True, 63), "q5_k": (32, 0, 31, True, 63), "q2_k": (16, 0, 3, True, 15),
             "q3_k": (16, -4, 3, False, 32), "q6_k": (16, -32, 31, False, 128)}
_CHUNK = 4096  # super-blocks searched at once


def quantize_k_weighted(weight: torch.Tensor, encoding: str, importance: torch.Tensor | None) -> torch.Tensor:
    """uint8 blocks of `weight` ([rows, cols]; blocks over the flattened tensor) of a `K_WEIGHTED` type,
    searched for the least importance-weighted error; without importance llama.cpp's reference."""
    if importance is None:
        return quantize_blocks(weight, encoding, None)
    rows, cols = weight.shape
    elems = BLOCK_TYPES[encoding].block_elems
    if not blocks_fit(encoding, rows, cols) or importance.shape != (cols,):
        raise ConfigError(f"{encoding} needs whole blocks of {elems} weights and one importance per column; "
                          f"got a {tuple(weight.shape)} weight and {tuple(importance.shape)} importances")
    x = weight.detach().float().cpu()
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).reshape(-1, elems)
    imp = importance.detach().float().cpu().clamp(min=0).expand(rows, cols).reshape(-1, elems)
    quantize = _quantize_iq4_nl if encoding == "iq4_nl" else _quantize_k
    parts = [quantize(x[start:start + _CHUNK], imp[start:start + _CHUNK], encoding)
             for start in range(0, x.shape[0], _CHUNK)]
    return torch.cat(parts).reshape(-1).to(weight.device)


def _f16(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float16).float()


def _safe_inverse(value: torch.Tensor) -> torch.Tensor:
    return torch.where(value != 0, 1.0 / torch.where(value != 0, value, torch.ones_like(value)), 0.0)


def _weights(x: torch.Tensor, imp: torch.Tensor, sigma_factor: float) -> torch.Tensor:
    sigma2 = sigma_factor * x.square().mean(dim=1, keepdim=True)
    return imp * torch.sqrt(sigma2 + x.square())


def _fit_sub_blocks(x: torch.Tensor, w: torch.Tensor, low: int, high: int, with_min: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [N], minimum [N]) of sub-blocks x [N, n] (dequant = scale * code + minimum, codes in
    [low, high]; with_min: minimum <= 0 and scale >= 0, else minimum 0), least weighted error."""
    best_err = torch.full((x.shape[0],), float("inf"))
    best_d, best_m = torch.zeros(x.shape[0]), torch.zeros(x.shape[0])
    if with_min:
        lo = x.amin(dim=1).clamp(max=0)
        span = x.amax(dim=1) - lo
        inv_span = _safe_inverse(span)
    else:
        peak = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)  # signed: it lands on code `low`
        inv_peak = _safe_inverse(peak)
    sw, swx = w.sum(dim=1), (w * x).sum(dim=1)
    for step in (0.0, *STEPS):
        if with_min:
            codes = torch.round((x - lo[:, None]) * ((high + step) * inv_span)[:, None]).clamp_(0, high)
            sl, sl2, sxl = (w * codes).sum(dim=1), (w * codes.square()).sum(dim=1), (w * x * codes).sum(dim=1)
            det = sw * sl2 - sl * sl
            ok = det > 1e-12 * sw * sl2
            d = torch.where(ok, (sw * sxl - sl * swx) / torch.where(ok, det, torch.ones_like(det)), 0.0)
            m = torch.where(ok, (sl2 * swx - sl * sxl) / torch.where(ok, det, torch.ones_like(det)), 0.0)
            positive = m > 0  # the k-types' minimum is dmin * level >= 0 subtracted: keep m <= 0
            d_only = torch.where(sl2 > 0, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), 0.0)
            d, m = torch.where(positive, d_only, d).clamp(min=0), torch.where(positive, 0.0, m)
        else:
            codes = torch.round(x * ((low - step) * inv_peak)[:, None]).clamp_(low, high)
            sl2, sxl = (w * codes.square()).sum(dim=1), (w * x * codes).sum(dim=1)
            d = torch.where(sl2 > 0, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), 0.0)
            m = torch.zeros_like(d)
        err = (w * (x - d[:, None] * codes - m[:, None]).square()).sum(dim=1)
        better = err < best_err
        best_err, best_d, best_m = torch.where(better, err, best_err), torch.where(better, d, best_d), \
            torch.where(better, m, best_m)
    return best_d, best_m


def _codes_for(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Nearest codes of x [B, S, n] on the grid scale * code - minimum (scale, minimum [B, S])."""
    return torch.round((x + minimum[..., None]) * _safe_inverse(scale)[..., None]).clamp_(low, high)


def _quantize_k(x: torch.Tensor, imp: torch.Tensor, encoding: str) -> torch.Tensor:
    """[B, 256] float32 weights and importances -> [B, type_size] uint8 blocks of a k-type."""
    sub, low, high, with_min, top = _GEOMETRY[encoding]
    num_blocks, count = x.shape[0], 256 // sub
    w = _weights(x, imp, 1.0 if encoding == "q2_k" else 2.0)
    scale, minimum = _fit_sub_blocks(x.reshape(-1, sub), w.reshape(-1, sub), low, high, with_min)
    scale, minimum = scale.view(num_blocks, count), -minimum.view(num_blocks, count)  # minimum: subtracted, >= 0
    xs, ws = x.view(num_blocks, count, sub), w.view(num_blocks, count, sub)
    if with_min:
        d = _f16(scale.amax(dim=1) / top)  # [B]
        dmin = _f16(minimum.amax(dim=1) / top)
        scale_levels = _level_pair(scale, d, 0, top)
        min_levels = _level_pair(minimum, dmin, 0, top)
        choices = [(ls, lm) for ls in scale_levels for lm in min_levels]
    else:
        magnitude = scale.abs()
        peak = scale.gather(1, magnitude.argmax(dim=1, keepdim=True)).squeeze(1)  # lands on level -top
        d = _f16(peak / -top)
        dmin = torch.zeros_like(d)
        choices = [(ls, None) for ls in _level_pair(scale, d, -top, top - 1)]
    best_err = torch.full((num_blocks, count), float("inf"))
    best_ls, best_lm = choices[0][0].clone(), torch.zeros_like(choices[0][0])
    best_codes = torch.zeros_like(xs)
    for ls, lm in choices:
        sub_d = d[:, None] * ls
        sub_m = dmin[:, None] * lm if lm is not None else torch.zeros_like(sub_d)
        codes = _codes_for(xs, sub_d, sub_m, low, high)
        err = (ws * (xs - (sub_d[..., None] * codes - sub_m[..., None])).square()).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ls = torch.where(better, ls, best_ls)
        if lm is not None:
            best_lm = torch.where(better, lm, best_lm)
        best_codes = torch.where(better[..., None], codes, best_codes)
    d16, dmin16 = d.to(torch.float16), dmin.to(torch.float16)
    if encoding in ("q4_k", "q5_k"):
        return pack_k_min(encoding, d16, dmin16, best_ls.to(torch.uint8), best_lm.to(torch.uint8),
                          best_codes.to(torch.uint8))
    if encoding == "q2_k":
        packed = best_ls.to(torch.uint8) | (best_lm.to(torch.uint8) << 4)
        return pack_q2_k(d16, dmin16, packed, best_codes.to(torch.uint8))
    if encoding == "q3_k":
        return pack_q3_k(d16, (best_ls + 32).to(torch.int32), (best_codes + 4).to(torch.uint8))
    return pack_q6_k(d16, best_ls.to(torch.int8), (best_codes + 32).to(torch.uint8))


def _level_pair(value: torch.Tensor, unit: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor, ceil) of value / unit ([B, S] / [B]) clamped to [low, high] (0 where unit is 0)."""
    ratio = value * _safe_inverse(unit)[:, None]
    return ratio.floor().clamp(low, high), ratio.ceil().clamp(low, high)


_IQ4 = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)
_IQ4_MIDPOINTS = (_IQ4[1:] + _IQ4[:-1]) / 2


def _nearest_level(scaled: torch.Tensor) -> torch.Tensor:
    """Indices of the nearest iq4_nl codebook level of each element of `scaled`."""
    return torch.bucketize(scaled, _IQ4_MIDPOINTS)


def _quantize_iq4_nl(x: torch.Tensor, imp: torch.Tensor, encoding: str) -> torch.Tensor:
    """[B, 32] float32 weights and importances -> [B, 18] uint8 iq4_nl blocks."""
    w = _weights(x, imp, 2.0)
    peak = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    inv_peak = _safe_inverse(peak)
    best_err, best_d = torch.full((x.shape[0],), float("inf")), torch.zeros(x.shape[0])
    for step in (0.0, *(10 * s for s in STEPS)):  # the codebook spans -127..113: offsets of ~1-12 levels
        idx = _nearest_level(x * ((-127.0 + step) * inv_peak)[:, None])
        levels = _IQ4[idx]
        sl2, sxl = (w * levels.square()).sum(dim=1), (w * x * levels).sum(dim=1)
        d = _f16(torch.where(sl2 > 0, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), 0.0))
        idx = _nearest_level(x * _safe_inverse(d)[:, None])  # the codes of the stored scale
        err = (w * (x - d[:, None] * _IQ4[idx]).square()).sum(dim=1)
        better = err < best_err
        best_err, best_d = torch.where(better, err, best_err), torch.where(better, d, best_d)
    idx = _nearest_level(x * _safe_inverse(best_d)[:, None])
    return pack_iq4_nl(best_d, idx.to(torch.uint8))
