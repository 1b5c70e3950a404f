"""MoE streaming: each pass, an MoE layer's experts module holds only the experts its tokens picked.

The layer's own unit (attention, norms, router, shared experts) arrives like any layer's (the
layer source). The experts module (transformers' own, e.g. ``MixtralExperts``) is called with
the hidden states and the router's picks, ``top_k_index`` [tokens, top_k]; a forward pre-hook
then takes the union of the picks over the whole batch (sorted, so the experts run in the order
transformers runs them), gets each picked expert from the device-memory `ExpertCache` or, on a
miss, reads it from the store (or its shard server) and decompresses it onto the device
(`ExpertReader`), and stacks
them into the module's fused parameters ([picked, ...] instead of [experts, ...]), with the
picks renumbered to positions in that stack and the module's ``num_experts`` set to the count
picked. The module's own forward (eager or grouped_mm) then runs unchanged; a forward hook puts
the parameters back to the meta device. Each expert is copied into the stack as soon as it is
had, so a cache smaller than one layer's picks still works (it only misses more).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable

import torch
from torch import nn

from endor_ray.engine.device import CudaOps, aligned_empty
from endor_ray.engine.expert_cache import ExpertCache
from endor_ray.engine.source_stats import SourceStats
from endor_ray.format.cpu_decode import decode_into
from endor_ray.models.moe import ExpertLayout
from endor_ray.store.store import Store, tensors_from_buffer


class ExpertReader:
    """One expert's dense weights on the compute device, read from the store now (a cache miss)."""

    def __init__(self, store: Store, device: torch.device, ops: CudaOps | None, compute_dtype: torch.dtype | None,
                 verify: bool = True, decode_threads: int = 1,
                 remote: Callable[[int, int], torch.Tensor] | None = None):
        """`remote(layer, expert)`: the expert's verified bytes from elsewhere (a shard server);
        None: read from the store here, checksummed if `verify`."""
        self.store, self.device, self.ops, self.remote = store, device, ops, remote
        self.compute_dtype, self.verify, self.decode_threads = compute_dtype, verify, decode_threads
        max_nbytes = max((expert["nbytes"] for layer in store.manifest["layers"] for expert in layer.get("experts", [])),
                         default=0)
        # One host buffer (pinned on CUDA) and one device buffer, reused: misses are read one at a time
        self._host = ops.pinned_empty(max_nbytes) if ops is not None else aligned_empty(max_nbytes)
        self._compressed = torch.empty(max_nbytes, dtype=torch.uint8, device=device) if ops is not None else None

    def read(self, layer_idx: int, expert_idx: int) -> tuple[dict[str, torch.Tensor], int]:
        """(dense weights by name inside the experts module, compressed bytes read)."""
        entry = {**self.store.expert_entry(layer_idx, expert_idx), "index": layer_idx}  # its checksums name the layer
        nbytes = entry["nbytes"]
        if self.remote is not None:
            data = self.remote(layer_idx, expert_idx)  # [nbytes] uint8, verified by the shard server
        else:
            self.store.read_into(entry["file"], self._host, nbytes)
            data = self._host[:nbytes]
            if self.verify:
                tensors_from_buffer(data, entry, verify=True, version=self.store.version)
        if self.ops is not None:  # synchronous: the host buffer is reused by the next miss
            self._compressed[:nbytes].copy_(data)
            data = self._compressed[:nbytes]
        weights = {}
        for name, enc in tensors_from_buffer(data, entry, verify=False).items():
            stored = torch.empty(enc.shape, dtype=enc.dtype, device=self.device)
            if self.ops is None:
                decode_into(enc, stored, threads=self.decode_threads)
            else:
                self.ops.decompress(enc, stored)
            dtype = self.compute_dtype or enc.dtype
            weights[name] = stored if dtype == enc.dtype else stored.to(dtype)  # widening is exact
        return weights, nbytes


class ExpertStreamer:
    """Hooks that fill each MoE layer's experts module with the experts its pass picked."""

    def __init__(self, layout: ExpertLayout, reader: ExpertReader, cache: ExpertCache,
                 stats: Callable[[], SourceStats]):
        """`stats` returns the layer source's current stats (they are replaced when reset)."""
        self.layout, self.reader, self.cache, self._stats = layout, reader, cache, stats

    def install(self, layers: nn.ModuleList, moe_layers: dict[int, int]) -> contextlib.ExitStack:
        """Hooks on the experts module of each layer in `moe_layers` (layer -> its expert count)."""
        hooks = contextlib.ExitStack()
        for layer_idx, num_experts in moe_layers.items():
            module = operator.attrgetter(self.layout.experts_path)(layers[layer_idx])

            def before(module: nn.Module, args: tuple, layer_idx: int = layer_idx, num_experts: int = num_experts):
                return self._fill(layer_idx, num_experts, module, args)

            def after(module: nn.Module, args: tuple, output, num_experts: int = num_experts):
                self._empty(module, num_experts)
                return output

            hooks.callback(module.register_forward_pre_hook(before).remove)
            hooks.callback(module.register_forward_hook(after).remove)
        return hooks

    def _fill(self, layer_idx: int, num_experts: int, module: nn.Module, args: tuple) -> tuple:
        hidden, top_k_index, top_k_weights = args  # [tokens, hidden], [tokens, top_k] int64, [tokens, top_k]
        picked = torch.unique(top_k_index).tolist()  # sorted: the order transformers' own loop runs them in
        stacks: dict[str, torch.Tensor] = {}
        stats = self._stats()
        for position, expert_idx in enumerate(picked):
            weights = self.cache.get((layer_idx, expert_idx))
            if weights is None:
                weights, nbytes = self.reader.read(layer_idx, expert_idx)
                self.cache.put((layer_idx, expert_idx), weights)
                stats.expert_misses += 1
                stats.expert_bytes += nbytes
            else:
                stats.expert_hits += 1
            for name, tensor in weights.items():
                if name not in stacks:
                    stacks[name] = torch.empty((len(picked), *tensor.shape), dtype=tensor.dtype, device=tensor.device)
                stacks[name][position].copy_(tensor)
        for name, stack in stacks.items():
            module._parameters[name] = nn.Parameter(stack, requires_grad=False)
        module.num_experts = len(picked)
        positions = torch.full((num_experts,), -1, dtype=top_k_index.dtype, device=top_k_index.device)
        positions[picked] = torch.arange(len(picked), dtype=top_k_index.dtype, device=top_k_index.device)
        return hidden, positions[top_k_index], top_k_weights

    def _empty(self, module: nn.Module, num_experts: int) -> None:
        """Back to meta (the stacks are freed); the module's expert count as transformers made it."""
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and not parameter.is_meta:
                shape = (num_experts, *parameter.shape[1:])
                module._parameters[name] = nn.Parameter(torch.empty(shape, dtype=parameter.dtype, device="meta"),
                                                        requires_grad=False)
        module.num_experts = num_experts

    def placeholders(self, layers: nn.ModuleList, layer_idx: int) -> dict[str, torch.Tensor]:
        """Meta tensors for the layer's fused expert parameters, so that loading the layer's own
        unit (strict) leaves them as they are: on the meta device until a pass fills them."""
        module = operator.attrgetter(self.layout.experts_path)(layers[layer_idx])
        return {f"{self.layout.experts_path}.{name}": torch.empty(parameter.shape, dtype=parameter.dtype, device="meta")
                for name, parameter in module.named_parameters(recurse=False)}
