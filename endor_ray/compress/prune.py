"""Unstructured pruning of Linear weights, exact per output row.

Every row of a weight ``W[out_features, in_features]`` loses exactly
``floor(in_features * sparsity)`` entries: those with the smallest score (ties broken by position,
stably). Kept entries are never altered, bit for bit. Two scores:

- magnitude: ``|W[i, j]|``;
- Wanda (Sun et al., 2023): ``|W[i, j]| * ||X[:, j]||_2``, where X are the inputs the Linear saw
  over the calibration tokens. `InputNormCollector` gathers ``sum_t X[t, j]^2`` per Linear while
  calibration text runs through the model layer by layer.

Embeddings, norms and the LM head are never pruned (`architecture.is_prunable` decides).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from endor_ray.errors import ConfigError

METHODS = ("magnitude", "wanda", "sparsegpt")  # sparsegpt: endor_ray.compress.sparsegpt


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")


def lowest_in_rows(score: torch.Tensor, count: int) -> torch.Tensor:
    """[out, in] bool: the `count` lowest scores of each row, ties broken by position (as a stable
    ascending sort would), in linear time: everything below each row's count-th smallest score,
    then the leftmost of the entries tied with it until `count` are taken."""
    kth = torch.kthvalue(score, count, dim=1, keepdim=True).values  # [out, 1]
    below = score < kth
    tied = score == kth
    still_needed = count - below.sum(dim=1, keepdim=True)
    return below | (tied & (torch.cumsum(tied, dim=1) <= still_needed))


def prune_rows(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A copy of `weight` with the lowest-`score` floor(in_features*sparsity) entries of each row zeroed."""
    check_sparsity(sparsity)
    if weight.dim() != 2 or score.shape != weight.shape:
        raise ConfigError(f"need a 2-D weight and a score of its shape, got {weight.shape} and {score.shape}")
    num_pruned = int(weight.shape[1] * sparsity)
    pruned = weight.clone()
    if num_pruned == 0:
        return pruned
    return pruned.masked_fill_(lowest_in_rows(score, num_pruned), 0)


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 |W|."""
    return weight.float().abs()


def wanda_score(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 |W| * ||X_j||_2 from `input_sq_sum` ([in] sum over tokens of X_j^2)."""
    if input_sq_sum.shape != (weight.shape[1],):
        raise ConfigError(f"input norms have shape {tuple(input_sq_sum.shape)}, expected ({weight.shape[1]},)")
    return weight.float().abs() * input_sq_sum.float().sqrt()[None, :]


def prune_weight(
    weight: torch.Tensor,
    sparsity: float,
    method: str,
    input_sq_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune one Linear weight by `method` ('magnitude' or 'wanda', which needs input norms)."""
    if method == "magnitude":
        return prune_rows(weight, magnitude_score(weight), sparsity)
    if method == "wanda":
        if input_sq_sum is None:
            raise ConfigError("wanda pruning needs the input norms collected on calibration text")
        return prune_rows(weight, wanda_score(weight, input_sq_sum), sparsity)
    if method == "sparsegpt":
        raise ConfigError("sparsegpt needs the Linear's Hessian: use endor_ray.compress.setting.compress_weight")
    raise ConfigError(f"unknown pruning method {method!r}; choose one of {METHODS}")


class InputNormCollector:
    """Accumulates, per Linear module, the sum over tokens of its input squared, per input feature;
    with `hessians`, the whole ``sum_t x_t x_t^T`` ([in, in], for SparseGPT and the mixed-precision
    error estimates), whose diagonal is the same sums."""

    def __init__(self, hessians: bool = False) -> None:
        self.sq_sums: dict[str, torch.Tensor] = {}  # module name -> [in_features] float32
        self.hessians: dict[str, torch.Tensor] = {}  # module name -> [in_features, in_features] float32
        self.full = hessians
        self.enabled = True

    @contextlib.contextmanager
    def watch(self, module: nn.Module) -> Iterator[InputNormCollector]:
        """Collect for every nn.Linear inside `module` while the context is open."""
        handles = []
        for name, linear in module.named_modules():
            if isinstance(linear, nn.Linear):
                handles.append(linear.register_forward_pre_hook(self._hook(name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def watch_experts(self, layers: nn.ModuleList, experts_path: str) -> Iterator[InputNormCollector]:
        """Collect per expert inside each layer's experts module at `experts_path` (MoE layers), under
        '{layer}.{experts_path}.{expert}.{param}' ('0.mlp.experts.5.gate_up_proj').

        transformers 5's experts modules hold a layer's experts fused ([experts, out, in] parameters);
        their eager loop (the caller sets it) multiplies each picked expert's tokens by
        ``F.linear(x, param[expert])`` (gpt-oss: ``x @ param[expert]``). While the module runs, a TorchFunctionMode sees those calls: a
        weight that is a view of one of the fused parameters names the parameter, and its offset along
        dim 0 the expert. Only the tokens routed to an expert reach it."""
        handles = []
        for layer_idx, layer in enumerate(layers):
            try:
                module = layer.get_submodule(experts_path)
            except AttributeError:  # a dense layer of an MoE model (DeepSeek-V3's first)
                continue
            mode = _ExpertLinears(self, module, f"{layer_idx}.{experts_path}")
            handles.append(module.register_forward_pre_hook(lambda module, args, mode=mode: mode.push()))
            handles.append(module.register_forward_hook(  # also when the forward raises: the mode is popped
                lambda module, args, out, mode=mode: mode.pop(), always_call=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            self.add(name, args[0])

        return accumulate

    def add(self, name: str, inputs: torch.Tensor) -> None:
        """Add `inputs` ([..., in]: one call's inputs of the Linear `name`) to its sums (if enabled)."""
        if not self.enabled:
            return
        inputs = inputs.detach().float().reshape(-1, inputs.shape[-1])  # [tokens, in]
        sq_sum = (inputs * inputs).sum(dim=0)
        if name in self.sq_sums:
            self.sq_sums[name] += sq_sum
        else:
            self.sq_sums[name] = sq_sum
        if self.full:
            product = inputs.T @ inputs
            if name in self.hessians:
                self.hessians[name] += product
            else:
                self.hessians[name] = product

    def input_sq_sum(self, weight_name: str) -> torch.Tensor | None:
        """The sums for a weight named like 'mlp.up_proj.weight', if its module ran."""
        return self.sq_sums.get(weight_name.removesuffix(".weight"))

    def hessian(self, weight_name: str) -> torch.Tensor | None:
        """sum_t x_t x_t^T for a weight named like 'mlp.up_proj.weight' (collected with hessians=True)."""
        return self.hessians.get(weight_name.removesuffix(".weight"))

    def clear(self) -> None:
        self.sq_sums.clear()
        self.hessians.clear()


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)  # `x @ W` arrives as Tensor.matmul


class _ExpertLinears(TorchFunctionMode):
    """While an experts module runs: each F.linear on one expert's slice of its fused parameters adds
    its inputs to the collector under '{prefix}.{expert}.{param}' (`InputNormCollector.watch_experts`)."""

    def __init__(self, collector: InputNormCollector, module: nn.Module, prefix: str):
        super().__init__()
        self.collector, self.module, self.prefix = collector, module, prefix

    def push(self) -> None:
        self.__enter__()

    def pop(self) -> None:
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func in _MATMULS:  # F.linear(x, W) [out, in]; x @ W [in, out] (gpt-oss)
            weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            found = self._expert_of(weight) if isinstance(weight, torch.Tensor) else None
            if found is not None:
                self.collector.add(f"{self.prefix}.{found[1]}.{found[0]}", args[0] if args else kwargs["input"])
        return func(*args, **kwargs)

    def _expert_of(self, weight: torch.Tensor) -> tuple[str, int] | None:
        """(parameter name, expert) where `weight` is one expert's slice of a fused parameter, else None."""
        for name, param in self.module.named_parameters(recurse=False):
            if (param.dim() == 3 and weight.shape == param.shape[1:] and not param.is_meta
                    and weight.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()):
                expert, rest = divmod(weight.storage_offset() - param.storage_offset(), param.stride(0))
                if rest == 0 and 0 <= expert < param.shape[0]:
                    return name, expert
        return None
