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
  2^b levels are used) plus the codes of inverse scales ``-(nmax + t) / peak`` for the offsets
  ``t`` in `SEARCH_STEPS`, each with the weighted least-squares scale for its codes; then one
  more rounding with the best scale;
- types with a minimum (q4_1, q5_1; ``dequant = d L + m``, ``L`` in ``[0, nmax]``): the
  reference min/max fit plus the codes of inverse scales ``(nmax + t) / (max - min)``, each with
  the weighted least-squares ``(d, m)`` for its codes.

Every candidate is scored with its scale (and minimum) rounded to float16, as the block stores
them, and the best is kept; the reference fit is always a candidate, so the weighted error is
never worse than round-to-nearest's. The result is ordinary GGUF blocks: any decoder reads them.

`endor_ray.format.gguf_quantize` also ports llama.cpp's own importance-matrix quantizers
(``quantize_row_*_impl``), bit for bit, which is what a comparison with llama.cpp's files needs;
this search reaches the same weighted error (within 2% on random and SmolLM2 weights) in a
fraction of the time, which is what measuring a dozen candidate settings for every tensor
(`endor_ray.compress.mixed`) needs. The k-types are left to that port.
"""

from __future__ import annotations

import torch

from endor_ray.errors import ConfigError
from endor_ray.format.gguf_blocks import BLOCK_TYPES, quantize_blocks

WEIGHTED_ENCODINGS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_SYMMETRIC = {"q8_0": (127, 127), "q4_0": (8, 7), "q5_0": (16, 15)}  # codes in [-low, high]
_WITH_MIN = {"q4_1": 15, "q5_1": 31}
_CHUNK_BLOCKS = 8192  # blocks searched at once
# Offsets of the outermost code tried around the reference fit (llama.cpp tries 19-21 in steps of
# 0.1; on SmolLM2's weights 7 offsets keep 95% of the gain at a third of the time)
SEARCH_STEPS = (-0.9, -0.6, -0.3, 0.3, 0.6, 0.9, 1.2)


def quantize_weighted(weight: torch.Tensor, encoding: str, importance: torch.Tensor | None) -> torch.Tensor:
    """uint8 GGUF blocks of `weight` ([rows, cols]) with each block's parameters searched for the
    least importance-weighted error; the k-types by llama.cpp's importance-matrix quantizers, and
    without importance llama.cpp's reference."""
    if importance is None or encoding not in WEIGHTED_ENCODINGS:
        return quantize_blocks(weight, encoding, importance)
    rows, cols = weight.shape
    block = BLOCK_TYPES[encoding].block_elems
    if cols % block or importance.shape != (cols,):
        raise ConfigError(f"{encoding} needs columns in multiples of {block} and one importance per column; "
                          f"got a {tuple(weight.shape)} weight and {tuple(importance.shape)} importances")
    x = weight.detach().float().cpu()
    w = block_weights(x, importance.cpu())  # [rows, cols]
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


def search_blocks(x: torch.Tensor, w: torch.Tensor, encoding: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float16-valued scale [B], minimum [B] (0 for the symmetric types), codes [B, 32]) of the
    blocks x [B, 32] searched for the least error weighted by w [B, 32]."""
    if encoding in _SYMMETRIC:
        d, codes = _search_symmetric(x, w, *_SYMMETRIC[encoding])
        return d, torch.zeros_like(d), codes
    return _search_with_min(x, w, _WITH_MIN[encoding])


def block_weights(x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """[rows, cols] search weights importance_j * sqrt(sigma2 + x_j^2) of a weight x ([rows, cols])."""
    sigma2 = 2 * x.square().mean(dim=1, keepdim=True)  # [rows, 1]
    return importance.float().clamp(min=0)[None, :] * torch.sqrt(sigma2 + x.square())


def code_range(encoding: str) -> tuple[int, int]:
    """The (lowest, highest) code of a 32-element type, as `pack_32` takes them (signed for the symmetric ones)."""
    if encoding in _SYMMETRIC:
        low, high = _SYMMETRIC[encoding]
        return -low, high
    return 0, _WITH_MIN[encoding]


def _f16(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float16).float()


def _weighted_error(x: torch.Tensor, w: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return (w * (x - approx).square()).sum(dim=-1)


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, torch.ones_like(scale)), 0.0)


def _least_squares_scale(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """[B]: the scale d minimising sum w (x - d L)^2 for codes L, rounded to float16."""
    sum_l2 = (w * codes.square()).sum(dim=-1)
    sum_lx = (w * x * codes).sum(dim=-1)
    return _f16(torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), 0.0))


class _Best:
    """The best candidate so far per block (error, scale, minimum, codes), updated in place."""

    def __init__(self, x: torch.Tensor):
        self.error = torch.full((x.shape[0],), float("inf"))
        self.scale, self.minimum = torch.zeros(x.shape[0]), torch.zeros(x.shape[0])
        self.codes = torch.zeros_like(x)

    def offer(self, error: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, codes: torch.Tensor) -> None:
        better = error < self.error
        self.error = torch.where(better, error, self.error)
        self.scale = torch.where(better, scale, self.scale)
        self.minimum = torch.where(better, minimum, self.minimum)
        self.codes = torch.where(better[:, None], codes, self.codes)


def _search_symmetric(x: torch.Tensor, w: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float16-valued scale [B], codes [B, 32] in [-low, high]) for blocks x [B, 32]."""
    peak = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)  # [B] signed
    outer = -low if low != high else high  # the code the peak lands on: -8 (q4_0: all 16 levels) or 127 (q8_0)
    zero = torch.zeros(x.shape[0])
    best = _Best(x)
    reference = _f16(peak / outer)
    codes = torch.round(x * _inverse(reference)[:, None]).clamp_(-low, high)
    best.offer(_weighted_error(x, w, reference[:, None] * codes), reference, zero, codes)
    for step in SEARCH_STEPS:
        codes = torch.round(x * _inverse(peak / (outer + step * (1 if outer > 0 else -1)))[:, None]).clamp_(-low, high)
        scale = _least_squares_scale(x, w, codes)
        best.offer(_weighted_error(x, w, scale[:, None] * codes), scale, zero, codes)
    # one more rounding with the chosen scale, and its least-squares scale
    codes = torch.round(x * _inverse(best.scale)[:, None]).clamp_(-low, high)
    scale = _least_squares_scale(x, w, codes)
    best.offer(_weighted_error(x, w, scale[:, None] * codes), scale, zero, codes)
    return best.scale, best.codes.to(torch.int16)


def _search_with_min(x: torch.Tensor, w: torch.Tensor, nmax: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float16-valued scale [B], minimum [B], codes [B, 32] in [0, nmax]) for blocks x [B, 32]."""
    low, high = x.amin(dim=1), x.amax(dim=1)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    best = _Best(x)
    ref_scale, ref_min = _f16((high - low) / nmax), _f16(low)  # the reference fit, as stored
    codes = torch.round((x - ref_min[:, None]) * _inverse(ref_scale)[:, None]).clamp_(0, nmax)
    best.offer(_weighted_error(x, w, ref_scale[:, None] * codes + ref_min[:, None]), ref_scale, ref_min, codes)
    sw, sx = w.sum(dim=-1), (w * x).sum(dim=-1)
    for step in SEARCH_STEPS:
        codes = torch.round((x - low[:, None]) * ((nmax + step) / span)[:, None]).clamp_(0, nmax)
        # weighted least squares for (d, m) given the codes:
        # [sum w L^2, sum w L; sum w L, sum w] [d; m] = [sum w x L; sum w x]
        sl, sl2, sxl = (w * codes).sum(dim=-1), (w * codes.square()).sum(dim=-1), (w * x * codes).sum(dim=-1)
        det = sw * sl2 - sl * sl
        ok = det > 1e-12 * sw * sl2
        safe = torch.where(ok, det, torch.ones_like(det))
        scale = _f16(torch.where(ok, (sw * sxl - sl * sx) / safe, ref_scale))
        minimum = _f16(torch.where(ok, (sl2 * sx - sl * sxl) / safe, ref_min))
        best.offer(_weighted_error(x, w, scale[:, None] * codes + minimum[:, None]), scale, minimum, codes)
    return best.scale, best.minimum, best.codes.to(torch.int16)


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
