"""Next-layer expert prefetch: the next MoE layer's router applied to this layer's hidden state.

As in Mixtral-offloading (arXiv 2312.17238): the residual stream changes little from one layer to
the next, so the router (gate) of MoE layer L+1, applied to the hidden state that layer L's own
router saw, picks mostly the experts L+1's router will pick when it runs. While layer L computes,
those guessed experts are read and decoded on this prefetcher's own thread (its own
`ExpertReader` and buffers; on the CPU the decode splits over the decode threads, and experts that
keep their blocks are only read and checked) and held until layer L+1 runs. Then the real picks
are used, so the guess never changes a token:

- a picked expert that was guessed is taken from the prefetch (waiting for it if it is still
  being read): a hit, and a *useful* prefetch;
- a picked expert that was not guessed comes from the expert cache or is read on demand (a miss);
- a guessed expert that was not picked (a wrong guess) is cancelled if its read has not begun;
  one already read goes into the expert cache only where the cache has room for it without
  evicting anything (a wrong guess never displaces an expert a layer used); otherwise it is
  dropped.

The routers: layer L+1's router lives in L+1's own unit, which the layer source may not have
loaded yet when layer L runs (it is streamed, possibly still being read). So each MoE layer's
router tensors are copied out of its unit the first time the layer runs (and kept resident:
they are tiny, [experts, hidden] plus a bias or score correction, e.g. 128 KiB a layer for
Mixtral-8x7B in fp32) and applied with `torch.func.functional_call` on the layer's own router
module, so each family's routing (softmax top-k, DeepSeek's grouped sigmoid routing, gpt-oss's
biased top-k) is its own. The first pass, before the routers are known, prefetches nothing; the
first MoE layer of a pass is never guessed (its input is the new token's, not a previous layer's).

Memory: at most one layer's guessed experts are held outside the expert cache (the model runner
keeps room for them in the device budget). On CUDA the prefetch's copy and decompression are
issued on the stream that was current where the guess was made, so they are ordered before the
compute that uses them. Statistics: `SourceStats.expert_prefetched` (experts read by the
prefetcher) and `expert_prefetch_useful` (of those, picked when their layer ran); their bytes count
in `expert_bytes` like the misses'.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from endor_ray.engine.block_weight import BlockWeight
from endor_ray.engine.device import CudaOps
from endor_ray.engine.expert_cache import ExpertCache, ExpertKey
from endor_ray.engine.experts import ExpertReader
from endor_ray.errors import EndorError

log = logging.getLogger(__name__)


def _resident_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy that owns its memory (a streamed layer's tensors live in a slot that is reused); a
    BlockWeight stays one, over copies of its blocks."""
    if isinstance(tensor, BlockWeight):
        blocks = tensor.blocks
        return BlockWeight(dataclasses.replace(blocks, **{name: part.clone() for name, part in blocks.parts().items()}),
                           tensor.dtype, tensor.threads)
    return tensor.detach().clone()


class ExpertPrefetcher:
    """Guesses the next MoE layer's experts from the current hidden state and reads them ahead."""

    def __init__(self, reader: ExpertReader, router_path: str, moe_layers: list[int], ops: CudaOps | None,
                 timeout_s: float):
        """`reader`: this prefetcher's own (its buffers are used on its thread only); `router_path`:
        the router inside a decoder layer ('mlp.gate'); `moe_layers`: the MoE layers, in order."""
        self.reader, self.router_path, self.ops, self.timeout_s = reader, router_path, ops, timeout_s
        ordered = sorted(moe_layers)
        self.next_layer = dict(zip(ordered, ordered[1:]))  # MoE layer -> the MoE layer after it in a pass
        self._routers: dict[int, dict[str, torch.Tensor]] = {}  # layer -> its router's parameters and buffers
        self._pending: dict[ExpertKey, Future] = {}  # guessed experts being read, or read and not yet used
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endor-experts")

    def remember_router(self, layers: nn.ModuleList, layer_idx: int) -> None:
        """Copy the layer's router tensors the first time it runs (its unit is loaded now)."""
        if layer_idx in self._routers:
            return
        router = operator.attrgetter(self.router_path)(layers[layer_idx])
        tensors = {name: _resident_copy(tensor) for name, tensor in
                   [*router.named_parameters(recurse=True), *router.named_buffers(recurse=True)]}
        if any(tensor.is_meta for tensor in tensors.values()):
            raise EndorError(f"layer {layer_idx}'s router {self.router_path} holds no weights while the layer runs; "
                             "the store's layer unit should hold it (re-run endor convert)")
        self._routers[layer_idx] = tensors

    def guess(self, layers: nn.ModuleList, layer_idx: int, hidden: torch.Tensor) -> list[int]:
        """The experts the MoE layer after `layer_idx` would pick for `hidden` ([tokens, hidden],
        the input of layer_idx's router), sorted; [] where there is no next layer or its router is unknown."""
        next_idx = self.next_layer.get(layer_idx)
        if next_idx is None or next_idx not in self._routers:
            return []
        router = operator.attrgetter(self.router_path)(layers[next_idx])  # on meta while streamed: only its code runs
        with torch.no_grad():
            # every family's router returns (logits, scores, indices [tokens, top_k])
            indices = torch.func.functional_call(router, self._routers[next_idx], (hidden,))[2]
        return torch.unique(indices).tolist()

    def start(self, layer_idx: int, experts: list[int], cache: ExpertCache) -> list[int]:
        """Begin reading the layer's guessed experts that are neither cached nor already pending;
        returns those it began."""
        stream = self.ops.current_stream() if self.ops is not None else None
        started = []
        for expert_idx in experts:
            key = (layer_idx, expert_idx)
            if key in cache or key in self._pending:
                continue
            self._pending[key] = self._pool.submit(self._read, layer_idx, expert_idx, stream)
            started.append(expert_idx)
        return started

    def _read(self, layer_idx: int, expert_idx: int, stream) -> dict[str, torch.Tensor]:
        if self.ops is None:
            return self.reader.read(layer_idx, expert_idx)[0]
        with self.ops.use(stream):  # ordered before the compute that will use the weights
            return self.reader.read(layer_idx, expert_idx)[0]

    def take(self, key: ExpertKey) -> dict[str, torch.Tensor] | None:
        """The guessed expert's weights (waiting for its read), or None where it was not guessed."""
        future = self._pending.pop(key, None)
        if future is None:
            return None
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError:
            raise EndorError(f"layer {key[0]} expert {key[1]} was not read within {self.timeout_s:.0f} s; check the "
                             "store's storage (a slow or hung disk, object store or shard server)") from None

    def settle(self, cache: ExpertCache) -> None:
        """The guesses left after their layer ran (wrong ones): cancelled if not begun, kept where the
        cache has room for them once read, else dropped."""
        for key, future in list(self._pending.items()):
            if future.cancel():
                del self._pending[key]
            elif future.done():
                del self._pending[key]
                if future.exception() is not None:  # never picked, so nothing failed; the next read reports it
                    log.warning("prefetching layer %d expert %d failed: %s", *key, future.exception())
                else:
                    cache.put_if_room(key, future.result())

    def close(self) -> None:
        """Stop the thread (waiting for the read it runs) and drop what was guessed."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self._routers.clear()
