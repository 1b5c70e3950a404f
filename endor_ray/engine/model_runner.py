"""The model runner: transformers' own model, with decoder layers streamed from a store.

The model skeleton is built from the store's config on the meta device; the non-layer weights
(embeddings, final norm, LM head) live on the compute device; decoder layers come from a
`LayerSource` (resident, host or disk tier, prefetched and decompressed ahead of use) through
forward hooks. Attention, masks and the KV cache are transformers' own. `forward` runs one pass
for a batch and applies the LM head only to the positions whose logits are needed. The runner
also holds what reads or writes token ids: the tokenizer, the end-of-sequence and padding ids,
and the context a sequence may fill. The engine (`engine.engine`) schedules; this runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import operator
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from endor_ray.engine.block_weight import block_weight_or_none, rows_of_whole_blocks
from endor_ray.engine.config import EngineConfig
from endor_ray.engine.device import CudaOps
from endor_ray.engine.layer_source import LayerSource
from endor_ray.engine.memory_plan import size_for_memory
from endor_ray.engine.prompts import context_limit
from endor_ray.engine.readers import StoreReader
from endor_ray.engine.sequence import Sequence
from endor_ray.engine.tiers import TierPlan, plan_tiers
from endor_ray.errors import ConfigError, StoreError
from endor_ray.format.cpu_matvec import stored_for_matvec
from endor_ray.format.tensor import decode
from endor_ray.store.store import Store
from endor_ray.utils.memory import memory_limit

log = logging.getLogger(__name__)
MAX_BYTES_PER_WEIGHT = 8  # above any layer file: float32 values (4) + bitmap and scales, headers aside


class ModelRunner:
    """The store's model on the compute device, its decoder layers streamed through hooks."""

    def __init__(self, store: Store | str, config: EngineConfig, progress: bool = True, reader=None, tokenizer=None):
        """`reader` supplies streamed layers' bytes (default: a StoreReader over `store`); `tokenizer`: the
        store's, already loaded (`load_tokenizer`; default: loaded here)."""
        self.store = store if isinstance(store, Store) else Store(store)
        self.config = config
        self.device = config.resolve_device()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.store)
        from endor_ray.models.skeleton import build_skeleton, check_tensors_match, decoder_layers, materialize_layer

        self.dtype = getattr(torch, config.compute_dtype) if config.compute_dtype else self.store.dtype
        dense = {name: self._dense_weight(enc) for name, enc in self.store.dense_tensors().items()}
        self.model = build_skeleton(self.store.config, dense, dtype=self.dtype, device=self.device)
        check_tensors_match(self.model, self.store.architecture,  # a store's layers must fit its model
                            self.store.layer_shapes(), self.store.location)
        self.plan = self._plan()
        self.source: LayerSource | None = None
        self.experts = None  # an MoE model's ExpertStreamer
        self._hooks: contextlib.ExitStack | None = None
        ops = CudaOps(self.device) if self.device.type == "cuda" else None
        if reader is None:
            reader = StoreReader(self.store, self.plan.host, ops, verify_disk_reads=config.verify_disk_reads,
                                 direct_io=config.disk_io == "direct", progress=progress,
                                 keep_cache=config.disk_io == "cached")
        try:
            self.source = LayerSource(reader, self.plan, self.device, self.config, ops=ops, progress=progress)
            layers = decoder_layers(self.model, self.store.architecture)
            self.experts = self._expert_streamer(ops)
            for layer_idx, weights in self.source.resident.items():
                materialize_layer(layers[layer_idx], {**weights, **self._expert_placeholders(layer_idx)})
            self._hooks = self._install_hooks()
            self.eos_ids = eos_token_ids(self.store.config, self.tokenizer)
            self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                           else min(self.eos_ids, default=0))
            self.max_context = context_limit(self.store.config)
            # The module that returns the final hidden states: the LM head runs on the positions needed
            self._body = operator.attrgetter(self.store.architecture.body_path)(self.model)
            from endor_ray.models.masks import has_sliding_layers

            self._sliding = has_sliding_layers(self.model.config)
            # transformers 5 names the KV-cache argument `cache`; 4.x called it `past_key_values`
            self._cache_arg = "cache" if "cache" in inspect.signature(self._body.forward).parameters else "past_key_values"
        except BaseException:
            self.close()  # the prefetch threads, pinned pages and slots of what was built so far
            if self.source is None:
                reader.close()
            raise

    def _dense_weight(self, enc):
        """A non-layer tensor: decoded, or on the CPU a GGUF embedding or LM head with a product from its
        blocks kept as them (`BlockWeight`: multiplied and row-gathered from the blocks, never decoded whole)."""
        if self.device.type == "cpu" and self.config.cpu_matvec and rows_of_whole_blocks(enc):
            threads = self.config.decode_threads or os.cpu_count() or 1
            kept = block_weight_or_none(enc, self.dtype, threads)
            if kept is not None:
                return kept
        return decode(enc)

    def _plan(self) -> TierPlan:
        entries = self.store.manifest["layers"]
        numel = [sum(torch.Size(t["shape"]).numel() for t in entry["tensors"]) for entry in entries]
        compressed = [entry["nbytes"] for entry in entries]
        for layer_idx, (nbytes, count) in enumerate(zip(compressed, numel)):
            # Sizes are planned from the manifest before any file is read (the files may be on shard
            # servers): one no encoding could have written is refused here, not sized into an error
            if nbytes > MAX_BYTES_PER_WEIGHT * count + (1 << 20):
                raise StoreError(f"layer {layer_idx}: the manifest says {nbytes} bytes for {count} weights, more than "
                                 "any encoding writes: the manifest is corrupt or was edited; re-run endor convert")
        dense, held = self._decoded_nbytes(entries)
        # Slots and tiers from the memory this process may really use (its cgroup's limit or MemAvailable)
        sizing = size_for_memory(compressed, dense, self.config, self.device.type, memory_limit(), held)
        self.config = sizing.config  # the prefetch depth the memory holds
        budget_bytes, budget_layers = self.config.gpu_budget
        if budget_bytes is None and budget_layers is None:
            if self.device.type == "cpu":  # the "device" is host memory: keep resident what half of it holds
                budget_bytes = sizing.device_budget_bytes
            else:
                free_bytes, _ = torch.cuda.mem_get_info(self.device)
                budget_bytes = int(0.9 * free_bytes)
        plan = plan_tiers(compressed, dense, self.config.prefetch_depth, budget_bytes, budget_layers,
                          sizing.host_budget_bytes, held)
        self.memory_note = sizing.describe(plan, sum(compressed[layer_idx] for layer_idx in plan.host))
        print(self.memory_note, file=sys.stderr)  # said always (also --json and Ray actors, whose stderr is shown)
        log.info("%s", self.memory_note)
        self._expert_cache_bytes = self.config.expert_cache_bytes
        if self._expert_cache_bytes is None and budget_bytes is not None:  # what the tiers leave of the budget
            used = sum(held[layer_idx] for layer_idx in plan.device)
            if plan.streamed:
                used += (self.config.prefetch_depth + 1) * (max(compressed) + max(dense))
            # and one layer's picked experts, stacked for its pass (at most all of them), and as much again
            # for the next layer's guessed experts the prefetch holds before they enter the cache; experts
            # kept as their blocks (CPU) are never stacked and hold their file bytes
            layer_experts = max((sum(self._expert_nbytes(expert) for expert in entry.get("experts", []))
                                 for entry in entries), default=0)
            used += layer_experts * (2 if self.config.expert_prefetch else 1)
            self._expert_cache_bytes = max(budget_bytes - used, 0)
        return plan

    @functools.cached_property
    def _experts_keep_blocks(self) -> bool:
        """CPU experts with a product from their blocks are multiplied from them (`engine.experts`); not
        where the family's experts multiply x @ W (`ExpertLayout.transposed`, gpt-oss: [in, out] slices),
        as the product from W's row blocks is x @ W^T."""
        from endor_ray.models.moe import expert_layout

        layout = expert_layout(self.store.config)
        if self.device.type != "cpu" or not self.config.cpu_matvec or layout is None or not self._moe_layers():
            return False
        return not layout.transposed

    def _expert_nbytes(self, expert: dict) -> int:
        """What one expert (its manifest entry) holds on the device: its file bytes where its blocks
        are kept, else its dense weights in the compute dtype."""
        from endor_ray.engine.experts import ExpertReader

        if self._experts_keep_blocks and ExpertReader.keeps_blocks(expert):
            return expert["nbytes"]
        return sum(torch.Size(tensor["shape"]).numel() for tensor in expert["tensors"]) * self.dtype.itemsize

    def _decoded_nbytes(self, entries: list[dict]) -> tuple[list[int], list[int]]:
        """Per layer: the dense weights decoded for it (what a slot holds beyond its read buffer), and
        what it holds resident. On the CPU with products from the blocks (`EngineConfig.cpu_matvec`)
        a tensor that has one is not decoded: it stays in the layer's file bytes, which a resident
        layer then keeps (a 7B layer of Q4_0 holds 0.11 GiB, not its 0.38 GiB of bf16)."""
        keep_blocks = self.device.type == "cpu" and self.config.cpu_matvec
        dense, held = [], []
        for entry in entries:
            decoded, kept = 0, False
            for tensor in entry["tensors"]:
                if keep_blocks and stored_for_matvec(tensor.get("layout"), tensor.get("values_encoding"),
                                                     tensor["shape"]):
                    kept = True
                else:
                    decoded += torch.Size(tensor["shape"]).numel() * self.dtype.itemsize
            dense.append(decoded)
            held.append(decoded + (entry["nbytes"] if kept else 0))
        return dense, held

    def _moe_layers(self) -> dict[int, int]:
        """layer -> its expert count, for the layers whose experts the store holds apart."""
        return {layer_idx: self.store.num_experts(layer_idx) for layer_idx in range(self.store.num_layers)
                if self.store.num_experts(layer_idx)}

    def _expert_streamer(self, ops):
        """An MoE model's hooks that fetch each pass's experts (cache first); None for a dense model."""
        if not self._moe_layers():
            return None
        from endor_ray.engine.expert_cache import ExpertCache
        from endor_ray.engine.experts import ExpertReader, ExpertStreamer
        from endor_ray.models.moe import expert_layout

        reader = ExpertReader(self.store, self.device, ops, self.dtype if self.config.compute_dtype else None,
                              verify=self.config.verify_disk_reads, decode_threads=self.source.decode_threads,
                              remote=getattr(self.source.reader, "expert_bytes", None),  # shard servers
                              direct_io=self.config.disk_io == "direct", keep_cache=self.config.disk_io == "cached",
                              keep_blocks=self._experts_keep_blocks)
        layout = expert_layout(self.store.config)
        if reader.keep_blocks and any(reader.keeps_blocks(expert) for entry in self.store.manifest["layers"]
                                      for expert in entry.get("experts", [])):
            # transformers' eager loop indexes one expert and calls F.linear on it, which a BlockWeight
            # multiplies from its blocks; grouped_mm would take the whole stack (decoded)
            self.model.set_experts_implementation("eager")
        prefetcher = None
        if self.config.expert_prefetch:  # its own reader: its buffers are used on the prefetch thread
            from endor_ray.engine.expert_prefetch import ExpertPrefetcher

            prefetch_reader = ExpertReader(self.store, self.device, ops, reader.compute_dtype, verify=reader.verify,
                                           decode_threads=reader.decode_threads, remote=reader.remote,
                                           direct_io=reader.direct_io, keep_cache=reader.keep_cache,
                                           keep_blocks=reader.keep_blocks)
            prefetcher = ExpertPrefetcher(prefetch_reader, layout.router_path, list(self._moe_layers()), ops,
                                          self.config.fetch_timeout_s)
        return ExpertStreamer(layout, reader, ExpertCache(self._expert_cache_bytes), lambda: self.source.stats,
                              prefetcher)

    def _expert_placeholders(self, layer_idx: int) -> dict:
        """Meta tensors standing for an MoE layer's experts while its own unit is loaded ({}: none)."""
        if self.experts is None or not self.store.num_experts(layer_idx):
            return {}
        from endor_ray.models.skeleton import decoder_layers

        return self.experts.placeholders(decoder_layers(self.model, self.store.architecture), layer_idx)

    def _install_hooks(self) -> contextlib.ExitStack:
        from endor_ray.models.skeleton import stream_layers

        def release(layer_idx: int, module, args, kwargs, output):
            self.source.release(layer_idx)
            return output

        def acquire(layer_idx: int) -> dict[str, torch.Tensor]:
            return {**self.source.acquire(layer_idx), **self._expert_placeholders(layer_idx)}

        hooks = contextlib.ExitStack()  # closed by close(): removes the hooks
        hooks.enter_context(stream_layers(self.model, self.store.architecture, acquire, release,
                                          layer_indices=list(self.plan.streamed)))
        if self.experts is not None:
            from endor_ray.models.skeleton import decoder_layers

            hooks.enter_context(self.experts.install(decoder_layers(self.model, self.store.architecture),
                                                     self._moe_layers()))
        return hooks

    def new_cache(self):
        """An empty KV cache for a running batch (transformers' own; full layers only where the
        model has sliding ones, whose windows `forward` masks by token position)."""
        from transformers import DynamicCache

        if self._sliding:
            from endor_ray.models.masks import full_cache

            return full_cache()
        return DynamicCache(config=self.model.config)

    def forward(self, inputs: dict[str, torch.Tensor], cache, newcomers: list[Sequence]
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One pass over the weights: [rows, vocab] logits of every row's last position, and for each
        newcomer (the batch's last rows) that asks for its prompt's log-probabilities, keyed by
        id(sequence), [prompt length - 1, vocab] logits predicting its prompt tokens 1.. (the LM head
        runs on those positions only)."""
        from endor_ray.models.skeleton import head_logits

        if self._sliding:  # the running batch's cache holds padding between tokens: windows count tokens
            from endor_ray.models.masks import sliding_masks

            inputs = {**inputs, "attention_mask": sliding_masks(self.model.config, inputs["attention_mask"], cache,
                                                                inputs["position_ids"], self.dtype)}
        hidden = self._body(**inputs, use_cache=True, **{self._cache_arg: cache}).last_hidden_state
        last = head_logits(self.model, hidden[:, -1, :])  # [rows, vocab]
        prompt_logits = {}
        rows, block = hidden.shape[0], hidden.shape[1]
        first_newcomer = rows - len(newcomers)
        for offset, seq in enumerate(newcomers):
            if seq.params.prompt_logprobs is not None and not seq.output_ids:  # not again after a preemption
                length = len(seq.prompt_ids)
                row = first_newcomer + offset
                prompt_logits[id(seq)] = head_logits(self.model, hidden[row, block - length:block - 1])
        return last, prompt_logits

    def close(self) -> None:
        """Remove the hooks, stop the prefetch threads and free the buffers (safe to call twice)."""
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None
        if self.experts is not None and self.experts.prefetcher is not None:
            self.experts.prefetcher.close()
        if self.source is not None:
            self.source.close()


def load_tokenizer(store: Store):
    """The store's tokenizer (left padding, for batched generation)."""
    from transformers import AutoTokenizer

    files = store.tokenizer_files()
    if not any(name.startswith("tokenizer") or name in ("vocab.json", "merges.txt") for name in files):
        raise ConfigError(f"{store.location} holds no tokenizer files; convert from a checkpoint that has them")
    with tempfile.TemporaryDirectory() as directory:
        for name, contents in files.items():
            (Path(directory) / name).write_bytes(contents)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    return tokenizer


def eos_token_ids(config: dict[str, Any], tokenizer) -> set[int]:
    """The ids that end a sequence: the model config's eos_token_id(s) and the tokenizer's."""
    eos = config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
