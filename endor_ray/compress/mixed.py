"""Mixed precision per tensor: each tensor's sparsity and value encoding, chosen for one byte budget.

M2Cache keeps neurons at FP16/INT8/INT4 by importance; a store can vary the setting per tensor.
For every prunable tensor of every decoder layer, `measure` compresses it under each candidate
setting (`CANDIDATES`: sparsity 0/30/50/70% x raw/INT8/INT4, and without pruning the GGUF
32-element block types q8_0/q4_0/q4_1/q5_0/q5_1: q4_0..q5_1 by GPTQ on the block grid
(`endor_ray.compress.gptq_blocks`), as the store will then hold them, q8_0 by importance-weighted
rounding (`endor_ray.compress.rounding`); and the super-block types q2_k/q3_k/q4_k/q5_k/q6_k and
iq4_nl by the fast importance-weighted search of `endor_ray.compress.rounding_k`, their blocks over
the flattened tensor, so they fit SmolLM2's 576-wide rows too) and records the bytes it would move
(exactly the bytes the store writes) and its error on the calibration inputs (``dW = W_stored - W``,
``H = sum_t x_t x_t^T``)::

    loss ~ sum_i g_i dW_i H dW_i^T        with g the loss's sensitivity to each output channel
    error = tr(dW H dW^T) / tr(W H W^T)   without it (a model too large to hold for a backward pass)

The first is what the model's loss rises by to second order (`endor_ray.compress.sensitivity`),
so the errors of every tensor of every layer are on one scale; the second is scale-free per
tensor, but equal relative errors do not cost the model equally (on SmolLM2 it pruned layer 0's
attention to 70% to buy q4_1 elsewhere). `choose_global` then picks one setting per tensor so
that all decoder layers together (norms and all) stay within ``--bytes-per-weight`` with the
least summed error: bytes go where they buy the most. `choose` is the exact small knapsack
(Pareto sets), the reference `choose_global` is tested against.

The bitmap and INT8/INT4 candidates are measured with Wanda pruning and round-to-nearest codes
(cheap), dense INT4 by GPTQ (`GPTQ_SETTINGS`); a store converted with ``--method sparsegpt`` then
applies SparseGPT with the chosen settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from endor_ray.errors import ConfigError
from endor_ray.compress.rounding import WEIGHTED_ENCODINGS
from endor_ray.compress.rounding_k import K_WEIGHTED
from endor_ray.format.gguf_blocks import BLOCK_TYPES, blocks_fit
from endor_ray.format.quant import QUANTIZED_ENCODINGS
from endor_ray.format.tensor import decode, encode
from endor_ray.compress.gptq_blocks import gptq_blocks
from endor_ray.compress.setting import GPTQ_ENCODINGS, CalibrationStats, Setting, block_tensor, compress_weight, prune

SPARSITIES = (0.0, 0.3, 0.5, 0.7)
GROUP_ENCODINGS = ("raw", *QUANTIZED_ENCODINGS)  # with the bitmap: any sparsity
# The predicted loss is a second-order estimate: it holds for small changes and underestimates
# large ones (SmolLM2's layer 0 attention pruned 70%, a 20% output error, looked cheap to it). So
# where errors are predicted losses, settings that change a tensor's outputs by more than this
# (relative squared error) are not offered; the raw setting (error ~0) always is.
MAX_PREDICTED_RELATIVE_ERROR = 0.05
# Settings the budget applies by GPTQ whatever --method says (measured so, stored so): dense INT4
# (SmolLM2 layer 15, group 128: relative output error 0.0466 -> 0.0163 on v_proj, 0.0167 -> 0.0131
# on down_proj); the dense GGUF types are GPTQ'd wherever the Hessian is (`compress_weight`)
GPTQ_SETTINGS = (Setting(0.0, "int4"),)
CANDIDATES = (tuple(Setting(sparsity, values) for sparsity in SPARSITIES for values in GROUP_ENCODINGS)
              + tuple(Setting(0.0, values) for values in (*WEIGHTED_ENCODINGS, *K_WEIGHTED)))


@dataclass(frozen=True)
class Option:
    setting: Setting
    nbytes: int
    error: float


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor,
                 row_weights: torch.Tensor | None = None) -> float:
    """tr(dW H dW^T) / tr(W H W^T), the relative squared error of the Linear's outputs; with
    `row_weights` g ([out]) the loss it predicts instead, sum_i g_i dW_i H dW_i^T
    (`endor_ray.compress.sensitivity`)."""
    weight = weight.float()
    delta = approx.float() - weight
    per_row = ((delta @ hessian) * delta).sum(dim=1)  # [out]
    if row_weights is not None:
        return float((row_weights.float() * per_row).sum())
    energy = float(((weight @ hessian) * weight).sum())
    return float(per_row.sum()) / energy if energy > 0 else 0.0


def measure(weight: torch.Tensor, stats: CalibrationStats, dtype: torch.dtype, block_size: int,
            group_size: int, row_weights: torch.Tensor | None = None) -> list[Option]:
    """Bytes and output error (`output_error`, relative or, with `row_weights`, the predicted
    loss) of `weight` under every candidate setting; with `row_weights`, only the settings whose
    relative output error is at most `MAX_PREDICTED_RELATIVE_ERROR` (see there)."""
    options = _measure_all(weight, stats, dtype, block_size, group_size, row_weights)
    return [option for option, relative in options if row_weights is None or relative <= MAX_PREDICTED_RELATIVE_ERROR]


def _measure_all(weight: torch.Tensor, stats: CalibrationStats, dtype: torch.dtype, block_size: int,
                 group_size: int, row_weights: torch.Tensor | None) -> list:
    """[(Option, relative output error)] for every candidate setting."""
    if stats.hessian is None:
        raise ConfigError("mixed precision needs the calibration Hessians (internal: collect with hessians=True)")
    held = []  # (setting, bytes, the weight it decodes to)
    for sparsity in SPARSITIES:
        pruned = prune(weight, sparsity, "wanda", stats).to(dtype)  # once for the three encodings
        for values in GROUP_ENCODINGS:
            if Setting(sparsity, values) in GPTQ_SETTINGS:  # as the store will hold it (`GPTQ_SETTINGS`)
                encoded, approx = compress_weight(weight, Setting(sparsity, values), "sparsegpt", dtype, block_size,
                                                  group_size, stats)
            else:
                encoded = encode(pruned, block_size, encoding=values, group_size=group_size)
                approx = decode(encoded)
            held.append((Setting(sparsity, values), encoded.nbytes, approx))
    fitting = [values for values in WEIGHTED_ENCODINGS if weight.shape[-1] % BLOCK_TYPES[values].block_elems == 0]
    if weight.dim() == 2:  # the super-block types and iq4_nl over the flattened tensor (`gguf_blocks`)
        fitting += [values for values in K_WEIGHTED if blocks_fit(values, *weight.shape)]
    by_gptq = [values for values in fitting if values in GPTQ_ENCODINGS] if weight.dim() == 2 else []
    # GPTQ's encodings share one factorization and column loop (as `compress_weight` would make each)
    gptq = gptq_blocks(weight, stats.hessian, by_gptq, stats.input_sq_sum) if by_gptq else {}
    for values in fitting:
        if values in gptq:
            encoded, approx = block_tensor(weight, values, gptq[values], dtype, block_size)
        else:
            encoded, approx = compress_weight(weight, Setting(0.0, values), "wanda", dtype, block_size, group_size,
                                              stats)
        held.append((Setting(0.0, values), encoded.nbytes, approx))
    options = []
    weight32 = weight.float()
    energy = float(((weight32 @ stats.hessian) * weight32).sum())  # once per tensor, not per setting
    for setting, nbytes, approx in held:
        delta = approx.float() - weight32
        per_row = ((delta @ stats.hessian) * delta).sum(dim=1)  # [out]: as `output_error`, one product for both
        relative = float(per_row.sum()) / energy if energy > 0 else 0.0
        error = relative if row_weights is None else float((row_weights.float() * per_row).sum())
        options.append((Option(setting, nbytes, error), relative))
    return options


def choose(options: dict[str, list[Option]], budget_bytes: float) -> dict[str, Setting]:
    """One setting per tensor: the least summed error within `budget_bytes`, exactly.

    A multiple-choice knapsack, solved by extending the Pareto set of (bytes, error) partial sums
    one tensor at a time: a partial choice that costs more bytes for no less error can never
    become part of the best one, so dropping it loses nothing. A layer's 7 tensors x 12 settings
    keep a few hundred states. ConfigError when even the cheapest settings exceed the budget.
    """
    states: list[tuple[int, float, tuple[Setting, ...]]] = [(0, 0.0, ())]
    for candidates in options.values():
        extended = sorted((nbytes + option.nbytes, error + option.error, chosen + (option.setting,))
                          for nbytes, error, chosen in states for option in candidates
                          if nbytes + option.nbytes <= budget_bytes)
        states = []
        for state in extended:  # bytes ascending; keep each that lowers the error
            if not states or state[1] < states[-1][1]:
                states.append(state)
        if not states:
            least = sum(min(option.nbytes for option in candidates) for candidates in options.values())
            raise ConfigError(f"the cheapest settings need {least} bytes where the budget leaves "
                              f"{budget_bytes:.0f}: raise --bytes-per-weight")
    return dict(zip(options, states[-1][2]))


def check_budget(bytes_per_weight: float) -> None:
    if not (math.isfinite(bytes_per_weight) and 0 < bytes_per_weight):
        raise ConfigError(f"--bytes-per-weight must be a positive number, got {bytes_per_weight}")


def choose_global(options: dict[str, list[Option]], budget_bytes: float) -> dict[str, Setting]:
    """One setting per tensor for a budget over many tensors (a whole model): Lagrangian choice.

    The exact Pareto search of `choose` grows with the number of tensors; for hundreds of them
    each tensor takes, for a price ``lam`` per byte, the option of least ``error + lam * bytes``
    (the total bytes fall as ``lam`` grows), ``lam`` is bisected to the cheapest price whose
    choice fits, and the bytes left are then spent greedily on the upgrades that remove the most
    error per byte. Every choice it can return fits the budget; ConfigError when none can.
    """
    names = list(options)
    least = sum(min(option.nbytes for option in options[name]) for name in names)
    if least > budget_bytes:
        raise ConfigError(f"the cheapest settings need {least} bytes where the budget leaves "
                          f"{budget_bytes:.0f}: raise --bytes-per-weight")

    def pick(lam: float) -> dict[str, Option]:
        return {name: min(options[name], key=lambda option: (option.error + lam * option.nbytes, option.nbytes))
                for name in names}

    def total(chosen: dict[str, Option]) -> int:
        return sum(option.nbytes for option in chosen.values())

    chosen = pick(0.0)
    if total(chosen) > budget_bytes:
        high = 1.0
        while total(pick(high)) > budget_bytes:
            high *= 4
        low = 0.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if total(pick(middle)) > budget_bytes else (low, middle)
        chosen = pick(high)
    left = budget_bytes - total(chosen)
    while True:  # spend what is left on the best error removed per byte that still fits
        best = None
        for name in names:
            current = chosen[name]
            for option in options[name]:
                extra = option.nbytes - current.nbytes
                gain = current.error - option.error
                if gain > 0 and extra <= left and (extra <= 0 or best is None or gain / extra > best[0]):
                    best = (float("inf") if extra <= 0 else gain / extra, name, option)
        if best is None:
            break
        _, name, option = best
        left -= option.nbytes - chosen[name].nbytes
        chosen[name] = option
    return {name: option.setting for name, option in chosen.items()}
