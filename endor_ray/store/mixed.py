"""Mixed precision per tensor: each tensor's sparsity and value encoding, chosen for a byte budget.

M2Cache keeps neurons at FP16/INT8/INT4 by importance; a store can vary the setting per tensor.
For every prunable tensor of a decoder layer, `measure` compresses it under each candidate
setting (`CANDIDATES`: sparsity 0/30/50/70% x raw/INT8/INT4) and records the bytes it would move
and its *relative output error* on the calibration inputs::

    error = tr(dW H dW^T) / tr(W H W^T),   dW = W_stored - W,   H = sum_t x_t x_t^T

(the squared error the Linear's outputs would carry over the calibration tokens, relative to
their energy, so tensors of different scale compare). `choose` then picks one setting per tensor
so that the layer's bytes per weight (norms and all) stay within the budget with the least
summed error: start every tensor at its cheapest setting and repeatedly take the upgrade with
the largest error drop per extra byte that still fits (the greedy solution of this
multiple-choice knapsack, optimal on the convex hull of each tensor's options). The budget holds
per layer, so a model converts streaming, one layer in memory.

Candidates are measured with Wanda pruning and round-to-nearest codes (cheap); a store converted
with ``--method sparsegpt`` then applies SparseGPT with the chosen settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from endor_ray.errors import ConfigError
from endor_ray.store.compress import CalibrationStats, Setting, compress_weight

CANDIDATES = tuple(Setting(sparsity, values) for sparsity in (0.0, 0.3, 0.5, 0.7) for values in ("raw", "int8", "int4"))


@dataclass(frozen=True)
class Option:
    setting: Setting
    nbytes: int
    error: float


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T): the relative squared error of the Linear's outputs."""
    weight = weight.float()
    delta = approx.float() - weight
    energy = float(((weight @ hessian) * weight).sum())
    return float(((delta @ hessian) * delta).sum()) / energy if energy > 0 else 0.0


def measure(weight: torch.Tensor, stats: CalibrationStats, dtype: torch.dtype, block_size: int,
            group_size: int) -> list[Option]:
    """Bytes and relative output error of `weight` under every candidate setting."""
    if stats.hessian is None:
        raise ConfigError("mixed precision needs the calibration Hessians (internal: collect with hessians=True)")
    options = []
    for setting in CANDIDATES:
        encoded, stored = compress_weight(weight, setting, "wanda", dtype, block_size, group_size, stats)
        options.append(Option(setting, encoded.nbytes, output_error(weight, stored, stats.hessian)))
    return options


def choose(options: dict[str, list[Option]], budget_bytes: float) -> dict[str, Setting]:
    """One setting per tensor: least summed error within `budget_bytes` (see the module docstring).

    When even the cheapest settings exceed the budget, those are returned (the caller reports it).
    """
    frontiers = {}
    for name, candidates in options.items():
        frontier = []  # cheapest first, each strictly better than every cheaper one
        for option in sorted(candidates, key=lambda o: (o.nbytes, o.error)):
            if not frontier or option.error < frontier[-1].error:
                frontier.append(option)
        frontiers[name] = frontier
    position = {name: 0 for name in frontiers}
    used = sum(frontier[0].nbytes for frontier in frontiers.values())
    while True:
        best, best_gain = None, 0.0
        for name, frontier in frontiers.items():
            here = frontier[position[name]]
            for step in frontier[position[name] + 1:]:  # the best slope from here (hull step)
                extra = step.nbytes - here.nbytes
                if used + extra > budget_bytes:
                    break
                gain = (here.error - step.error) / max(extra, 1)
                if gain > best_gain:
                    best, best_gain = (name, step), gain
        if best is None:
            break
        name, step = best
        used += step.nbytes - frontiers[name][position[name]].nbytes
        position[name] = frontiers[name].index(step)
    return {name: frontiers[name][position[name]].setting for name in frontiers}


def check_budget(bytes_per_weight: float) -> None:
    if not (math.isfinite(bytes_per_weight) and 0 < bytes_per_weight):
        raise ConfigError(f"--bytes-per-weight must be a positive number, got {bytes_per_weight}")
