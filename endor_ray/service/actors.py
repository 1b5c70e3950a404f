"""The Ray layer: thin actors over the shard server and the engine, and the reader that joins them.

- `ShardActor` wraps `ShardServer`: each memory-tier layer is put into the object store once,
  as a numpy buffer, so a worker on the same node reads it zero-copy (torch tensors never go
  through Ray: they are always copied). Disk-tier layers are put on demand.
- `RayShardReader` is the GPU worker's layer reader: `request` asks the owning shard server for
  the layer's object reference (non-blocking, so several fetches are in flight), `resolve` gets
  the bytes. A fetch that fails because a shard server died is retried until the server has
  restarted (it reloads its layers from the store), within a deadline.
- `WorkerActor` wraps the engine, with a `RayShardReader` as its layer source, and serves many
  requests at once through the engine's loop thread (continuous batching).

Actors are made remote where they are created (`endor_ray.service.driver`).
"""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, GetTimeoutError, ObjectLostError, OwnerDiedError, RayActorError

from endor_ray.engine.engine import Engine, EngineConfig
from endor_ray.engine.loop import EngineLoop
from endor_ray.engine.scheduler import SchedulerConfig
from endor_ray.errors import EndorError
from endor_ray.engine.sampling import SamplingParams
from endor_ray.service.shard_server import ShardServer
from endor_ray.store.store import Store

RETRYABLE = (RayActorError, ObjectLostError, OwnerDiedError)


class ShardActor:
    """Serves a ShardServer's layers as object references."""

    def __init__(self, store_location: str, memory_layers: list[int], disk_layers: list[int]):
        self.server = ShardServer(store_location, memory_layers, disk_layers)
        # Put once: the object store holds the memory tier's bytes, the server keeps the refs.
        self.server.memory = {idx: ray.put(data) for idx, data in self.server.memory.items()}
        self.server.expert_memory = {key: ray.put(data) for key, data in self.server.expert_memory.items()}

    def ready(self) -> list[int]:
        return self.server.layers

    def layer_ref(self, layer_idx: int) -> list[ray.ObjectRef]:
        """[ref to the layer's verified bytes] (wrapped in a list so Ray hands over the ref itself)."""
        data, tier = self.server.layer(layer_idx)
        return [data if tier == "memory" else ray.put(data)]

    def expert_ref(self, layer_idx: int, expert_idx: int) -> list[ray.ObjectRef]:
        """[ref to one expert's verified bytes] (an MoE layer's expert, served alone)."""
        data, tier = self.server.expert(layer_idx, expert_idx)
        return [data if tier == "memory" else ray.put(data)]

    def stats(self) -> dict[str, Any]:
        stats = self.server.stats
        return {"layers": self.server.layers, "memory_layers": sorted(self.server.memory),
                "bytes_served": stats.bytes_served, "hits": dict(stats.hits), "expert_hits": stats.expert_hits,
                "disk_read_s": stats.disk_read_s, "load_s": stats.load_s}


class RayShardReader:
    """Layer bytes from shard servers, several requests in flight, retried across restarts."""

    def __init__(self, store: Store, shard_of_layer: dict[int, Any], timeout_s: float = 120.0):
        self.store, self.shard_of_layer, self.timeout_s = store, shard_of_layer, timeout_s
        self.retries = 0

    def entry(self, layer_idx: int) -> dict:
        return self.store.layer_entry(layer_idx)

    def buffer_nbytes(self, layer_idx: int) -> int:
        return self.entry(layer_idx)["nbytes"]

    def request(self, layer_idx: int) -> tuple[int, ray.ObjectRef]:
        return layer_idx, self.shard_of_layer[layer_idx].layer_ref.remote(layer_idx)

    def resolve(self, request: tuple[int, ray.ObjectRef], buffer: torch.Tensor | None) -> tuple[torch.Tensor, str]:
        """(bytes, "remote"): a read-only view of the object store's copy (zero-copy on this node);
        `buffer` is not needed: the layer source stages the bytes itself where CUDA wants pinned memory.

        A shard server that died is asked again until it has restarted, within the deadline; one
        that fails a request made after its death as well has used up its restarts: that fails at
        once (no point waiting for the deadline)."""
        layer_idx, pending = request
        deadline = time.monotonic() + self.timeout_s
        deaths = 0
        while True:
            try:
                [ref] = ray.get(pending, timeout=max(deadline - time.monotonic(), 0.001))
                data = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.001))
                break
            except RETRYABLE as exc:
                deaths = deaths + 1 if isinstance(exc, ActorDiedError) else 0
                if deaths >= 3:
                    raise EndorError(f"layer {layer_idx}: its shard server is dead and will not restart (its "
                                     "restarts are used up); restart the service") from None
                if time.monotonic() >= deadline:
                    raise EndorError(f"layer {layer_idx}: its shard server did not come back within "
                                     f"{self.timeout_s:.0f} s ({type(exc).__name__})") from None
                self.retries += 1
                time.sleep(0.5)
                pending = self.shard_of_layer[layer_idx].layer_ref.remote(layer_idx)
            except GetTimeoutError:
                raise EndorError(f"layer {layer_idx} did not arrive from its shard server within "
                                 f"{self.timeout_s:.0f} s; check the shard node") from None
        with warnings.catch_warnings():  # object-store buffers are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(data), "remote"

    def expert_bytes(self, layer_idx: int, expert_idx: int) -> torch.Tensor:
        """One expert's verified bytes from the shard server owning its layer (an expert cache miss)."""
        try:
            [ref] = ray.get(self.shard_of_layer[layer_idx].expert_ref.remote(layer_idx, expert_idx),
                            timeout=self.timeout_s)
            data = ray.get(ref, timeout=self.timeout_s)
        except GetTimeoutError:
            raise EndorError(f"layer {layer_idx} expert {expert_idx} did not arrive from its shard server within "
                             f"{self.timeout_s:.0f} s; check the shard node") from None
        except RETRYABLE as exc:
            raise EndorError(f"layer {layer_idx} expert {expert_idx}: its shard server failed ({type(exc).__name__}); "
                             "the request can be retried once it has restarted") from None
        with warnings.catch_warnings():  # object-store buffers are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(data)

    def close(self) -> None:
        pass


class WorkerActor:
    """The engine on a GPU (or CPU) worker, its streamed layers coming from shard servers.

    An async actor: many requests are in flight at once, and the engine's loop thread
    (`endor_ray.engine.loop.EngineLoop`) batches them continuously. Cancelling a `stream` call
    (`ray.cancel`), or its caller going away, lets the request's sequences go at the next pass.
    """

    def __init__(self, store_location: str, engine_config: EngineConfig, shard_of_layer: dict[int, str],
                 timeout_s: float, scheduler: SchedulerConfig | None = None):
        if engine_config.resolve_device().type == "cpu":
            # Ray gives a num_cpus=0 actor one OpenMP thread; a CPU worker computes with the node's
            # cores, one left for its layer-fetch thread.
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        store = Store(store_location)
        handles = {name: ray.get_actor(name) for name in set(shard_of_layer.values())}  # shard servers, by name
        self.reader = RayShardReader(store, {idx: handles[name] for idx, name in shard_of_layer.items()}, timeout_s)
        self.engine = Engine(store, engine_config, progress=False, reader=self.reader, scheduler=scheduler)
        self.loop = EngineLoop(self.engine)

    def ready(self) -> dict[str, Any]:
        plan = self.engine.plan
        return {"device": str(self.engine.device), "resident_layers": list(plan.device),
                "streamed_layers": list(plan.streamed), "node_id": ray.get_runtime_context().get_node_id()}

    async def stream(self, prompts: list, params: list[SamplingParams]) -> AsyncIterator[list[dict[str, Any]]]:
        """The request's events (see `endor_ray.engine.loop`) as the passes produce them, in lists:
        each item is every event there is when it is sent (a pass's tokens of all the request's
        sequences), so a request of 128 sequences costs Ray one object per pass, not per token."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = self.loop.submit(prompts, params, sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while True:
                batch = [await events.get()]
                while not events.empty() and not _last(batch[-1]):
                    batch.append(events.get_nowait())
                if "completions" in batch[-1]:
                    batch[-1] = self._with_retries(batch[-1])
                yield batch
                if _last(batch[-1]):
                    return
        finally:
            if not request.done:  # cancelled, or the caller stopped reading
                self.loop.cancel(request)

    async def generate(self, prompts: list, params: list[SamplingParams]) -> dict[str, Any]:
        async for batch in self.stream(prompts, params):
            for event in batch:
                if "error" in event:
                    raise EndorError(event["error"])
                if "completions" in event:
                    return event
        raise EndorError("the request ended without a result")

    def _with_retries(self, result: dict[str, Any]) -> dict[str, Any]:
        result["stats"]["fetch_retries"] = self.reader.retries  # how often a shard server failed a fetch
        return result

    def stats(self) -> dict[str, Any]:
        return {**self.loop.stats(), "fetch_retries": self.reader.retries}

    def tokenizer_info(self) -> dict[str, Any]:
        return {"max_context": self.engine.max_context}


def _last(event: dict[str, Any]) -> bool:
    """Whether a request's event is its last (its result, or its error)."""
    return "completions" in event or "error" in event
