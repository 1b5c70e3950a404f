"""The driver: connect to (or start) Ray, place the layers, create the actors, run generation.

    service = endor_ray.connect("stores/model", address="auto")
    completions, stats = service.generate(["Hello"], SamplingParams(max_new_tokens=16))
    for event in service.stream(["Hello"]): ...
    service.close()

Shard servers are created on the nodes the placement chooses (`NodeAffinitySchedulingStrategy`,
hard), GPU workers on a node with the worker resource, else one with a GPU, else the driver's
node. Several workers share one set of shard servers; requests go round-robin. Every wait on Ray
has a timeout; a failed start kills what it created.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from endor_ray import errors
from endor_ray.engine.engine import EngineConfig
from endor_ray.engine.scheduler import SchedulerConfig
from endor_ray.utils.units import parse_budget
from endor_ray.errors import ConfigError, EndorError
from endor_ray.service.ray_session import init_ray
from endor_ray.service.placement import NodeInfo, Placement, plan_placement
from endor_ray.engine.sampling import SamplingParams
from endor_ray.store.store import Store

SHARD_RESOURCE = "endor_shard"  # nodes with this custom resource host shard servers (if any has it)
WORKER_RESOURCE = "endor_worker"  # nodes with this custom resource host GPU workers (if any has it)


@dataclass
class ClusterConfig:
    """Where the service runs and how it places layers."""

    address: str | None = None  # None: start a local Ray; "auto", "ray://host:port" or "host:port"
    shard_memory: str | None = None  # per-node budget for shard servers; None: 70% of its object store
    spill_to_disk: bool = True  # layers beyond the budgets are read from the store on demand
    num_workers: int = 1  # GPU worker replicas sharing the shard servers
    max_restarts: int = 3  # restarts of a shard server (it reloads its layers) or GPU worker (it rebuilds its engine)
    timeout_s: float = 300.0  # start-up and per-request limit; a fetch retry window
    node_budgets: dict[str, int] = field(default_factory=dict)  # node id -> bytes, overrides the above

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.shard_memory is not None and parse_budget(self.shard_memory, "shard memory")[0] is None:
            raise ConfigError(f"shard memory must be a size such as 8GiB, got {self.shard_memory!r}")

    @property
    def shard_memory_bytes(self) -> int | None:
        return None if self.shard_memory is None else parse_budget(self.shard_memory, "shard memory")[0]


def cluster_nodes(config: ClusterConfig) -> tuple[list[NodeInfo], list[tuple[str, bool]]]:
    """(shard nodes with budgets, [(worker node id, it has a GPU)]) from the live cluster.

    Workers go to the nodes with the worker resource, else to the nodes with GPUs, else to the
    driver's node; several workers are spread over those nodes in turn.
    """
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    has_shard_resource = any(SHARD_RESOURCE in node["Resources"] for node in alive)
    shard_nodes = []
    for node in alive:
        if has_shard_resource and SHARD_RESOURCE not in node["Resources"]:
            continue
        budget = config.node_budgets.get(node["NodeID"])
        if budget is None:
            object_store = int(node["Resources"].get("object_store_memory", 0))
            budget = config.shard_memory_bytes if config.shard_memory_bytes is not None else int(0.7 * object_store)
        shard_nodes.append(NodeInfo(node["NodeID"], budget))
    for wanted in (WORKER_RESOURCE, "GPU"):
        candidates = [(node["NodeID"], node["Resources"].get("GPU", 0) > 0)
                      for node in alive if node["Resources"].get(wanted, 0) > 0]
        if candidates:
            return shard_nodes, candidates
    own = ray.get_runtime_context().get_node_id()
    own_gpus = next(node["Resources"].get("GPU", 0) for node in alive if node["NodeID"] == own)
    return shard_nodes, [(own, own_gpus > 0)]


class Service:
    """A running endor-ray service: shard servers plus GPU workers. Use `connect()` to make one."""

    def __init__(self, store: Store, placement: Placement, shards: dict[str, Any], workers: list[Any],
                 timeout_s: float, started_ray: bool):
        self.store, self.placement, self.timeout_s = store, placement, timeout_s
        self.shards, self.workers, self._started_ray = shards, workers, started_ray
        self._next_worker = itertools.cycle(range(len(workers)))

    def _params(self, prompts: list[str], params) -> list[SamplingParams]:
        if not prompts:
            raise ConfigError("no prompts given")
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * len(prompts)
        return list(params)

    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None) -> dict[str, Any]:
        """{"completions": [...], "stats": {...}} for a batch of prompts (the end of `stream`)."""
        for event in self.stream(prompts, params):
            if "completions" in event:
                return event
        raise EndorError("the GPU worker's stream ended without a result")

    def stream(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[dict]:
        """A request's events as they come (`endor_ray.engine.loop`: token events, a completion
        per sequence, then the result dict). A consumer that stops early cancels the request."""
        return _blocking(self.astream(prompts, params))

    async def astream(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None
                      ) -> AsyncIterator[dict]:
        """`stream` for asyncio callers (the Serve app): cancelling the consumer cancels the request."""
        import asyncio

        import ray

        worker = self.workers[next(self._next_worker)]
        events = worker.stream.options(num_returns="streaming").remote(list(prompts), self._params(prompts, params))
        try:
            while True:
                try:
                    ref = await asyncio.wait_for(events.__anext__(), self.timeout_s)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise EndorError(f"no token from the GPU worker within {self.timeout_s:.0f} s; check its node") from None
                try:
                    batch = await ref  # the events there were when the worker sent (WorkerActor.stream)
                except Exception as exc:  # noqa: BLE001 - Ray's errors, made ours where they are
                    _raise_as_ours(exc, "generation")
                for event in batch:
                    if "error" in event:
                        raise EndorError(event["error"])
                    yield event
        finally:
            ray.cancel(events)

    async def worker_stats(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Each GPU worker's running figures (passes, sequences per pass, queue, TTFT, TPOT); EndorError
        if a worker or shard server does not answer within `timeout_s` (dead, or restarting)."""
        import asyncio

        async def ask(ref, what: str):
            try:
                return await asyncio.wait_for(ref, timeout_s)
            except asyncio.TimeoutError:
                raise EndorError(f"{what} does not answer (restarting?)") from None
            except Exception as exc:  # noqa: BLE001
                _raise_as_ours(exc, what)

        shard_checks = [ask(shard.ready.remote(), f"the shard server on node {node[:8]}")
                        for node, shard in self.shards.items()]
        stats = await asyncio.gather(*[ask(w.stats.remote(), f"GPU worker {i}") for i, w in enumerate(self.workers)],
                                     *shard_checks)
        return list(stats[:len(self.workers)])

    @property
    def started_ray(self) -> bool:
        """Whether connect() started the Ray it runs on (stopped again by close())."""
        return self._started_ray

    def shard_stats(self) -> dict[str, Any]:
        return {node: _get(actor.stats.remote(), self.timeout_s, "shard stats") for node, actor in self.shards.items()}

    def close(self) -> None:
        """Kill the actors (and stop Ray if connect() started it)."""
        import ray

        for actor in [*self.workers, *self.shards.values()]:
            ray.kill(actor, no_restart=True)
        self.workers, self.shards = [], {}
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _blocking(events: AsyncIterator[dict]) -> Iterator[dict]:
    """An async generator consumed from plain code, on an event loop of its own thread (so it works
    whether or not the caller's thread runs an event loop: a script, a notebook). A consumer that
    stops, fails or is interrupted cancels the step in flight and closes the generator."""
    import asyncio
    import threading

    async def step():
        return await events.__anext__()

    async def cancel_and_close():
        running = asyncio.all_tasks() - {asyncio.current_task()}
        for task in running:  # a step the consumer stopped waiting for (Ctrl-C)
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await events.aclose()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="endor-stream", daemon=True)
    thread.start()
    try:
        while True:
            try:
                event = asyncio.run_coroutine_threadsafe(step(), loop).result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        asyncio.run_coroutine_threadsafe(cancel_and_close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _get(ref, timeout_s: float, what: str):
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        raise EndorError(f"{what} did not finish within {timeout_s:.0f} s; check the cluster's nodes") from None
    except Exception as exc:  # noqa: BLE001 - Ray's errors, made ours where they are
        _raise_as_ours(exc, what)


def _raise_as_ours(exc: BaseException, what: str):
    """Re-raise a Ray error as the endor-ray error inside it (a ConfigError stays one), once."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(exc, RayActorError):
        # An actor whose constructor raised one of our errors (e.g. a store it cannot read) dies
        # with that error's text in the message: surface it as itself.
        found = re.findall(r"endor_ray\.errors\.(\w+): (.+)", str(exc))
        if found:
            name, message = found[-1]
            raise getattr(errors, name, EndorError)(f"{what} failed: {message}") from None
        raise EndorError(f"{what} failed: an endor-ray actor died ({str(exc).splitlines()[0]})") from None
    if isinstance(exc, RayTaskError):
        cause = exc.cause if isinstance(exc.cause, EndorError) else None
        if cause is not None:
            raise type(cause)(str(cause)) from None
    raise exc


def connect(store_location: str, engine_config: EngineConfig | None = None,
            cluster: ClusterConfig | None = None, address: str | None = None,
            scheduler: SchedulerConfig | None = None) -> Service:
    """Start the service for a store: place layers, create shard servers and workers, wait until ready.

    `address` is a shorthand for `ClusterConfig(address=...)` (give one or the other).
    """
    if address is not None:
        if cluster is not None:
            raise ConfigError("give the address in the ClusterConfig or as address=, not both")
        cluster = ClusterConfig(address=address)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from endor_ray.service.actors import ShardActor, WorkerActor

    cluster = cluster or ClusterConfig()
    engine_config = engine_config or EngineConfig()
    store = Store(store_location)  # the driver reads the manifest: fail early on a bad store
    # an MoE layer's experts are served by its layer's shard server: they count with it
    layer_nbytes = [entry["nbytes"] + sum(expert["nbytes"] for expert in entry.get("experts", []))
                    for entry in store.manifest["layers"]]
    started_ray = init_ray(cluster.address, cluster.timeout_s)
    service_id = uuid.uuid4().hex[:8]  # actors are named endor-<id>-...: listable, never orphaned unseen
    created: list[Any] = []
    try:
        shard_nodes, worker_nodes = cluster_nodes(cluster)
        placement = plan_placement(layer_nbytes, shard_nodes, worker_nodes[0][0], cluster.spill_to_disk)
        shards = {}
        for shard_idx, node_id in enumerate(placement.nodes):
            actor = ray.remote(ShardActor).options(
                name=f"endor-{service_id}-shard-{shard_idx}", num_cpus=0, max_restarts=cluster.max_restarts,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(store_location, list(placement.memory.get(node_id, ())), list(placement.disk.get(node_id, ())))
            shards[node_id] = actor
            created.append(actor)
        _get([actor.ready.remote() for actor in shards.values()], cluster.timeout_s, "shard server start")
        # By name, not handle: 30 pickled handles weigh over 100 KB, which would put the worker's
        # constructor arguments in the object store, where a restart cannot count on them (Ray #53727).
        shard_names = {node: f"endor-{service_id}-shard-{idx}" for idx, node in enumerate(placement.nodes)}
        shard_of_layer = {idx: shard_names[node] for node in placement.nodes for idx in placement.layers_of(node)}
        workers = []
        for worker_idx in range(cluster.num_workers):
            node_id, has_gpu = worker_nodes[worker_idx % len(worker_nodes)]
            config = engine_config
            if has_gpu and config.device == "auto":  # the driver's own machine may have no GPU
                config = dataclasses.replace(config, device="cuda")
            worker = ray.remote(WorkerActor).options(
                name=f"endor-{service_id}-worker-{worker_idx}", num_gpus=1 if has_gpu else 0, num_cpus=0,
                max_restarts=cluster.max_restarts,  # a dead worker comes back (its engine rebuilt from the store)
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(store_location, config, shard_of_layer, cluster.timeout_s, scheduler)
            workers.append(worker)
            created.append(worker)
        _get([worker.ready.remote() for worker in workers], cluster.timeout_s, "GPU worker start")
        return Service(store, placement, shards, workers, cluster.timeout_s, started_ray)
    except BaseException:
        for actor in created:
            ray.kill(actor, no_restart=True)
        if started_ray:
            ray.shutdown()
        raise
