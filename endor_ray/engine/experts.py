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

On the CPU with products from the blocks (`EngineConfig.cpu_matvec`), an expert tensor that has one
(`has_matvec`: dense int8/int4, q8_0, ...) is never decoded: the reader gives each expert its own
bytes and hands out `BlockWeight`s over them, the cache holds those (at their stored bytes), and
the fused parameter becomes an `ExpertStack`, a stand-in whose integer index is that expert's
BlockWeight. The model runs transformers' eager experts loop there (`self.gate_up_proj[expert_idx]`,
then `F.linear`), so each picked expert's tokens are multiplied straight from its blocks (a prefill
with more than MAX_MATVEC_ROWS tokens for an expert decodes it, as any BlockWeight). Not for
modules that multiply ``x @ W`` (`ExpertLayout.transposed`, gpt-oss): the product is
``x @ W^T`` over row blocks, so those experts are decoded as before.

With an `ExpertPrefetcher` (`engine.expert_prefetch`), once a layer's experts are stacked the next
MoE layer's router is applied to this layer's hidden state and the experts it picks are read in the
background; the next layer takes its picked experts from there first (waiting for a read in
progress), then from the cache, then reads them. `whole_layers` makes every pass fetch all of a
layer's experts (the naive offload, kept for the benchmark's comparison; the module still computes
only the picked ones).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils._pytree import tree_map

from endor_ray.engine.block_weight import BlockWeight
from endor_ray.engine.device import CudaOps, aligned_empty
from endor_ray.engine.expert_cache import ExpertCache
from endor_ray.engine.source_stats import SourceStats
from endor_ray.format.cpu_decode import decode_into
from endor_ray.format.cpu_matvec import has_matvec, stored_for_matvec
from endor_ray.models.moe import ExpertLayout
from endor_ray.store.files import direct_capacity
from endor_ray.store.store import Store, tensors_from_buffer

if TYPE_CHECKING:
    from endor_ray.engine.expert_prefetch import ExpertPrefetcher


class ExpertReader:
    """One expert's weights on the compute device (dense, or on the CPU its blocks), read from the store now."""

    def __init__(self, store: Store, device: torch.device, ops: CudaOps | None, compute_dtype: torch.dtype | None,
                 verify: bool = True, decode_threads: int = 1,
                 remote: Callable[[int, int], torch.Tensor] | None = None, direct_io: bool = False,
                 keep_cache: bool = True, keep_blocks: bool = False):
        """`remote(layer, expert)`: the expert's verified bytes from elsewhere (a shard server);
        None: read from the store here, checksummed if `verify`, with O_DIRECT if `direct_io`, else
        buffered, its pages dropped from the page cache once read unless `keep_cache` (as the layer reads).
        `keep_blocks` (CPU only): tensors with a CPU product stay BlockWeights over the expert's own bytes."""
        if keep_blocks and ops is not None:
            raise ValueError("experts keep their blocks on the CPU only")
        self.store, self.device, self.ops, self.remote = store, device, ops, remote
        self.compute_dtype, self.verify, self.decode_threads = compute_dtype, verify, decode_threads
        self.direct_io, self.keep_cache, self.keep_blocks = direct_io, keep_cache, keep_blocks
        max_nbytes = max((expert["nbytes"] for layer in store.manifest["layers"] for expert in layer.get("experts", [])),
                         default=0)
        # One host buffer (pinned on CUDA) and one device buffer, reused: misses are read one at a time
        capacity = direct_capacity(max_nbytes)  # a direct read rounds the size up
        self._host = ops.pinned_empty(capacity) if ops is not None else aligned_empty(capacity)
        self._compressed = torch.empty(max_nbytes, dtype=torch.uint8, device=device) if ops is not None else None

    def read(self, layer_idx: int, expert_idx: int) -> tuple[dict[str, torch.Tensor], int]:
        """(weights by name inside the experts module: dense, or BlockWeights where blocks are kept;
        compressed bytes read)."""
        entry = {**self.store.expert_entry(layer_idx, expert_idx), "index": layer_idx}  # its checksums name the layer
        nbytes = entry["nbytes"]
        # BlockWeights are views of the bytes read: those then live as long as the expert (in the cache)
        own = self.keep_blocks and self.keeps_blocks(entry)
        if self.remote is not None:
            data = self.remote(layer_idx, expert_idx)  # [nbytes] uint8, verified by the shard server
            data = data.clone() if own else data  # not a view of the server's (or Ray's) memory
        else:
            host = aligned_empty(direct_capacity(nbytes)) if own else self._host
            self.store.read_into(entry["file"], host, nbytes, direct=self.direct_io, drop_cache=not self.keep_cache)
            data = host[:nbytes]
            if self.verify:
                tensors_from_buffer(data, entry, verify=True, version=self.store.version)
        if self.ops is not None:  # synchronous: the host buffer is reused by the next miss
            self._compressed[:nbytes].copy_(data)
            data = self._compressed[:nbytes]
        weights = {}
        for name, enc in tensors_from_buffer(data, entry, verify=False).items():
            if own and has_matvec(enc):  # nothing decoded: its tokens are multiplied from the blocks
                weights[name] = BlockWeight(enc, self.compute_dtype or enc.dtype, self.decode_threads)
                continue
            stored = torch.empty(enc.shape, dtype=enc.dtype, device=self.device)
            if self.ops is None:
                decode_into(enc, stored, threads=self.decode_threads)
            else:
                self.ops.decompress(enc, stored)
            dtype = self.compute_dtype or enc.dtype
            weights[name] = stored if dtype == enc.dtype else stored.to(dtype)  # widening is exact
        return weights, nbytes

    @staticmethod
    def keeps_blocks(entry: dict) -> bool:
        """Whether an expert's manifest entry has a tensor with a CPU product (kept as its blocks)."""
        return any(stored_for_matvec(tensor.get("layout"), tensor.get("values_encoding"), tensor["shape"])
                   for tensor in entry["tensors"])


class ExpertStack(torch.Tensor):
    """A fused experts parameter [picked, ...] held as each picked expert's own tensor (BlockWeights):
    ``stack[position]`` with an integer (a 0-d index tensor, as the eager loop has) is that expert's
    tensor, so its ``F.linear`` multiplies from the blocks; any other use sees the dense stack."""

    experts: list[torch.Tensor]

    @staticmethod
    def __new__(cls, experts: list[torch.Tensor]) -> ExpertStack:
        first = experts[0]
        with torch.inference_mode(False):  # a normal tensor wherever it is made, as BlockWeight
            stack = torch.Tensor._make_wrapper_subclass(cls, (len(experts), *first.shape), dtype=first.dtype,
                                                        device=first.device, requires_grad=False)
        stack.experts = experts
        return stack

    def __repr__(self) -> str:
        return f"ExpertStack({len(self.experts)} x {list(self.shape[1:])}, {self.dtype})"

    def dense(self) -> torch.Tensor:
        """[picked, ...] the experts decoded and stacked (a code path other than the eager loop)."""
        return torch.stack([tensor.dense() if isinstance(tensor, BlockWeight) else tensor for tensor in self.experts])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and isinstance(args[0], ExpertStack):
            index = args[1]
            if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0
                                          and not index.is_floating_point() and index.dtype != torch.bool):
                return args[0].experts[int(index)]
        if getattr(func, "__name__", None) == "__get__":  # .shape, .dtype, .is_meta: the wrapper's own
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        # decoded here, not in __torch_dispatch__: a view op (stack[1:]) must return a view of real memory
        args, kwargs = tree_map(lambda value: value.dense() if isinstance(value, ExpertStack) else value,
                                (args, kwargs or {}))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        dense = tree_map(lambda value: value.dense() if isinstance(value, ExpertStack) else value, (args, kwargs or {}))
        return func(*dense[0], **dense[1])


class ExpertStreamer:
    """Hooks that fill each MoE layer's experts module with the experts its pass picked."""

    def __init__(self, layout: ExpertLayout, reader: ExpertReader, cache: ExpertCache,
                 stats: Callable[[], SourceStats], prefetcher: ExpertPrefetcher | None = None):
        """`stats` returns the layer source's current stats (they are replaced when reset);
        `prefetcher`: reads the next MoE layer's guessed experts ahead (None: no prefetch)."""
        self.layout, self.reader, self.cache, self._stats = layout, reader, cache, stats
        self.prefetcher = prefetcher
        self.whole_layers = False  # fetch every expert of a layer each pass (the naive offload, for comparison)
        self._layers: nn.ModuleList | None = None
        self._num_experts: dict[int, int] = {}

    def install(self, layers: nn.ModuleList, moe_layers: dict[int, int]) -> contextlib.ExitStack:
        """Hooks on the experts module of each layer in `moe_layers` (layer -> its expert count)."""
        hooks = contextlib.ExitStack()
        self._layers, self._num_experts = layers, dict(moe_layers)
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
        fetched = list(range(num_experts)) if self.whole_layers else picked
        stacks: dict[str, torch.Tensor] = {}
        kept: dict[str, list[torch.Tensor]] = {}  # parameters whose experts stay their own tensors (BlockWeights)
        stats, prefetcher = self._stats(), self.prefetcher
        for position, expert_idx in enumerate(fetched):
            key = (layer_idx, expert_idx)
            weights = prefetcher.take(key) if prefetcher is not None else None
            if weights is not None:  # guessed right: read while the layer before computed
                self.cache.put(key, weights)
                stats.expert_hits += 1
                stats.expert_prefetch_useful += 1
            elif (weights := self.cache.get(key)) is not None:
                stats.expert_hits += 1
            else:
                weights, nbytes = self.reader.read(layer_idx, expert_idx)
                self.cache.put(key, weights)
                stats.expert_misses += 1
                stats.expert_bytes += nbytes
            for name, tensor in weights.items():
                if name not in stacks and (name in kept or isinstance(tensor, BlockWeight)):
                    kept.setdefault(name, []).append(tensor)  # no copy: the blocks are what is multiplied
                    continue
                if name not in stacks:
                    stacks[name] = torch.empty((len(fetched), *tensor.shape), dtype=tensor.dtype, device=tensor.device)
                stacks[name][position].copy_(tensor)  # a BlockWeight among dense experts: its decode
        if prefetcher is not None:
            self._prefetch_next(layer_idx, hidden, stats)
        for name, stack in stacks.items():
            module._parameters[name] = nn.Parameter(stack, requires_grad=False)
        for name, experts in kept.items():
            module._parameters[name] = ExpertStack(experts)
        module.num_experts = len(fetched)
        positions = torch.full((num_experts,), -1, dtype=top_k_index.dtype, device=top_k_index.device)
        positions[fetched] = torch.arange(len(fetched), dtype=top_k_index.dtype, device=top_k_index.device)
        return hidden, positions[top_k_index], top_k_weights

    def _prefetch_next(self, layer_idx: int, hidden: torch.Tensor, stats: SourceStats) -> None:
        """This layer's wrong guesses settled, then the next MoE layer's guessed experts started."""
        prefetcher = self.prefetcher
        prefetcher.settle(self.cache)
        prefetcher.remember_router(self._layers, layer_idx)
        next_idx = prefetcher.next_layer.get(layer_idx)
        if next_idx is None:
            return
        guessed = (list(range(self._num_experts[next_idx])) if self.whole_layers
                   else prefetcher.guess(self._layers, layer_idx, hidden))
        for expert_idx in prefetcher.start(next_idx, guessed, self.cache):
            stats.expert_prefetched += 1
            stats.expert_bytes += self.reader.store.expert_entry(next_idx, expert_idx)["nbytes"]

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
