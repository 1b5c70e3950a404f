"""The Ray service against its baselines: layer-fetch throughput and seconds per token.

What it measures, on a loopback ``ray.cluster_utils.Cluster`` of two nodes (the head holds the
shard servers and the GPU worker, a second node stands for a remote machine), with a real store
(a random fp16 Llama, hidden 1024, intermediate 2816, 50% magnitude sparsity; or ``--store``):

1. Layer fetch, shard server -> worker. A probe actor (``num_cpus=0``, as the GPU worker) on the
   shard server's node and one on the other node read every layer through ``RayShardReader``
   (``resolve(request(layer))``, one layer after another); the baseline is a raw Ray transfer of
   the same bytes: numpy arrays of the layers' sizes ``ray.put`` by an actor on the shard node,
   ``ray.get`` by the probe. Each repeat starts a fresh shard server and fresh arrays, so the
   first ("cold") read across nodes really moves the bytes; a second ("warm") read may find the
   copy Ray left in the reader's node. GB/s = layer bytes / median seconds; ratio layer / raw.
2. Generation, everything on one node: ``connect(store, EngineConfig(gpu_memory=0))`` and
   ``service.generate`` against ``Engine(store, same config).generate`` in this process (one after
   the other, never at once), greedy, at each ``--batches`` size: median over ``--repeats`` (after
   a warm-up) of the engine's ``decode_s_per_step`` and of the driver's wall time. Target: the
   service at most 10% slower. Token ids of both must agree (``tokens_agree``).

Run: ``python benchmarks/service_bench.py [--store PATH] [--batches 1 8] [--repeats 3]`` ->
benchmarks/results/service_bench-<device>.json (``--out`` overrides). With CUDA the engine runs on
the GPU (``"mode": "cuda"``; gpu_memory=0 keeps every layer streaming), without it on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # without it a loopback cluster hangs
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; real clusters keep token auth on

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from kernel_bench import CUDA, machine_info  # noqa: E402  (this folder)
from offload_bench import prompt_ids, random_checkpoint  # noqa: E402

from endor_ray.atomic import staged_directory  # noqa: E402
from endor_ray.convert import ConvertConfig, convert  # noqa: E402
from endor_ray.driver import ClusterConfig, connect  # noqa: E402
from endor_ray.engine import Engine, EngineConfig  # noqa: E402
from endor_ray.sampling import SamplingParams  # noqa: E402
from endor_ray.service import RayShardReader, ShardActor  # noqa: E402
from endor_ray.store import Store  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8, vocab_size=4096)
SPARSITY = 0.5
SEED = 0
WARMUP = 1
TIMEOUT_S = 300.0  # every wait on Ray
TARGET_SERVICE_VS_ENGINE = 1.10


class FetchProbe:
    """Reads layers (or raw objects) from inside an actor, as the GPU worker does; returns seconds."""

    def __init__(self, store_location: str):
        self.store = Store(store_location)

    def read_layers(self, shard: Any, num_layers: int) -> float:
        reader = RayShardReader(self.store, dict.fromkeys(range(num_layers), shard), TIMEOUT_S)
        started = time.perf_counter()
        for layer_idx in range(num_layers):
            reader.resolve(reader.request(layer_idx))  # [nbytes] uint8 view of the object store
        return time.perf_counter() - started

    def read_refs(self, refs: list[ray.ObjectRef]) -> float:
        started = time.perf_counter()
        for ref in refs:
            ray.get(ref, timeout=TIMEOUT_S)
        return time.perf_counter() - started

    def torch_threads(self) -> int:
        return torch.get_num_threads()  # Ray sets OMP_NUM_THREADS=1 in num_cpus=0 actors


class ArrayPutter:
    """Puts fresh numpy arrays into its node's object store: the raw-transfer baseline."""

    def put(self, nbytes: list[int], seed: int) -> list[ray.ObjectRef]:
        rng = np.random.default_rng(seed)
        return [ray.put(rng.integers(0, 256, size, dtype=np.uint8)) for size in nbytes]


def get(ref: Any) -> Any:
    return ray.get(ref, timeout=TIMEOUT_S)


def actor_on(cls: type, node_id: str, *args: Any) -> Any:
    """`cls` as an actor pinned to `node_id` (num_cpus=0, as the service's actors)."""
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.remote(cls).options(num_cpus=0, scheduling_strategy=strategy).remote(*args)


def prepare_store(root: Path, num_layers: int) -> Path:
    """A 50%-magnitude-pruned fp16 random Llama store under `root`, built when missing."""
    store = root / f"llama-h{SHAPE['hidden_size']}-i{SHAPE['intermediate_size']}-{num_layers}L-magnitude50"
    if (store / "manifest.json").is_file():
        return store
    model, tokenizer = random_checkpoint(SHAPE, num_layers)
    checkpoint = root / "hf-random"
    with staged_directory(checkpoint, force=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    convert(str(checkpoint), store, ConvertConfig(SPARSITY, "magnitude", "endor", dtype="float16", force=True), False)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return store


def start_cluster(object_store_bytes: int):
    """Head (shard servers, worker, the GPU if any) + one more node on 127.0.0.1; (cluster, head id, other id)."""
    from ray.cluster_utils import Cluster

    node = dict(node_ip_address="127.0.0.1", object_store_memory=object_store_bytes)
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "num_cpus": os.cpu_count(), "num_gpus": 1 if CUDA else 0, "include_dashboard": False,
        "resources": {"endor_shard": 1, "endor_worker": 1}})
    try:
        other = cluster.add_node(**node, num_cpus=1, num_gpus=0, resources={"bench_other": 1})
        ray.init(address=cluster.address, log_to_driver=False)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, cluster.head_node.node_id, other.node_id


def bench_fetch(store_path: Path, head_id: str, other_id: str, repeats: int) -> list[dict[str, Any]]:
    """Layer path and raw baseline, same node and across nodes, cold and warm: one row each."""
    layer_nbytes = [entry["nbytes"] for entry in Store(str(store_path)).manifest["layers"]]
    num_layers, total = len(layer_nbytes), sum(layer_nbytes)
    probes = {"same-node": actor_on(FetchProbe, head_id, str(store_path)),
              "cross-node": actor_on(FetchProbe, other_id, str(store_path))}
    putter = actor_on(ArrayPutter, head_id)
    samples: dict[tuple[str, str, str], list[float]] = {}
    for repeat in range(WARMUP + repeats):
        shard = actor_on(ShardActor, head_id, str(store_path), list(range(num_layers)), [])
        get(shard.ready.remote())
        refs = get(putter.put.remote(layer_nbytes, SEED + repeat))
        for placement, probe in probes.items():
            for fetch in ("cold", "warm"):  # warm: a copy from the cold read may still be local
                layer_s = get(probe.read_layers.remote(shard, num_layers))
                raw_s = get(probe.read_refs.remote(refs))
                if repeat >= WARMUP:
                    samples.setdefault(("layer", placement, fetch), []).append(layer_s)
                    samples.setdefault(("raw", placement, fetch), []).append(raw_s)
        ray.kill(shard, no_restart=True)  # frees its objects (and their copies) before the next repeat
        del refs
    for actor in [putter, *probes.values()]:
        ray.kill(actor, no_restart=True)
    rows = []
    for (path, placement, fetch), seconds in samples.items():
        median_s = statistics.median(seconds)
        rows.append({"path": path, "placement": placement, "fetch": fetch, "s_all_layers": median_s,
                     "ms_per_layer": median_s / num_layers * 1e3, "GBps": total / median_s / 1e9,
                     "bytes": total, "num_layers": num_layers})
    return rows


def time_system(label: str, generate: Callable[[list[str]], dict[str, Any]], args: argparse.Namespace,
                vocab_size: int) -> tuple[list[dict[str, Any]], dict[int, list[list[int]]]]:
    """Median decode seconds per step and driver wall time per batch size, and the first timed run's tokens."""
    rows, tokens = [], {}
    for batch in args.batches:
        prompts = [" ".join(f"t{token}" for token in row) for row in prompt_ids(batch, args.prompt_len, vocab_size)]
        runs = []
        for _ in range(WARMUP + args.repeats):
            started = time.perf_counter()
            result = generate(prompts)
            runs.append((result["stats"]["decode_s_per_step"], time.perf_counter() - started, result))
        timed = runs[WARMUP:]
        decode_s = statistics.median(run[0] for run in timed)
        tokens[batch] = [completion["token_ids"] for completion in timed[0][2]["completions"]]
        rows.append({"system": label, "batch": batch, "decode_s_per_step": decode_s, "tokens_per_s": batch / decode_s,
                     "wall_s": statistics.median(run[1] for run in timed),
                     "stats": sorted(timed, key=lambda run: run[0])[len(timed) // 2][2]["stats"]})
    return rows, tokens


def bench_generation(store_path: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    """Service (worker and shard server on the head) vs the in-process engine: rows and token agreement."""
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    config = EngineConfig(gpu_memory=0, prefetch_depth=args.prefetch)
    vocab_size = int(Store(str(store_path)).config["vocab_size"])
    with connect(str(store_path), config, ClusterConfig(timeout_s=TIMEOUT_S)) as service:
        rows, service_tokens = time_system("service", lambda prompts: service.generate(prompts, params), args, vocab_size)
    with Engine(str(store_path), config, progress=False) as engine:
        engine_rows, engine_tokens = time_system(
            "engine", lambda prompts: engine.generate(prompts, params).to_dict(), args, vocab_size)
    agree = {str(batch): service_tokens[batch] == engine_tokens[batch] for batch in args.batches}
    return rows + engine_rows, agree


def generation_ratios(rows: list[dict[str, Any]], batches: list[int]) -> list[dict[str, Any]]:
    by_key = {(row["system"], row["batch"]): row for row in rows}
    out = []
    for batch in batches:
        service, engine = by_key[("service", batch)], by_key[("engine", batch)]
        ratio = service["decode_s_per_step"] / engine["decode_s_per_step"]
        out.append({"batch": batch, "service_vs_engine_decode": ratio, "service_vs_engine_wall":
                    service["wall_s"] / engine["wall_s"], "meets_target": ratio <= TARGET_SERVICE_VS_ENGINE})
    return out


def fetch_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(row["path"], row["placement"], row["fetch"]): row for row in rows}
    return [{"placement": placement, "fetch": fetch,
             "layer_vs_raw_GBps": by_key[("layer", placement, fetch)]["GBps"] / by_key[("raw", placement, fetch)]["GBps"]}
            for (path, placement, fetch) in by_key if path == "layer"]


def print_tables(fetch_rows: list[dict[str, Any]], gen_rows: list[dict[str, Any]], gen_ratios: list[dict[str, Any]]) -> None:
    header = f"{'path':>6} {'placement':>10} {'fetch':>5} {'s/all layers':>12} {'ms/layer':>9} {'GB/s':>8}"
    print(header + "\n" + "-" * len(header))
    for row in fetch_rows:
        print(f"{row['path']:>6} {row['placement']:>10} {row['fetch']:>5} {row['s_all_layers']:>12.4f} "
              f"{row['ms_per_layer']:>9.2f} {row['GBps']:>8.2f}")
    for entry in fetch_ratios(fetch_rows):
        print(f"layer / raw GB/s, {entry['placement']} {entry['fetch']}: {entry['layer_vs_raw_GBps']:.3f}")
    header = f"{'system':>8} {'batch':>5} {'decode s/step':>13} {'tok/s':>8} {'wall s':>8} {'read s':>7} {'decomp s':>8} {'stall s':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in gen_rows:
        spent = row["stats"]["time_s"]
        print(f"{row['system']:>8} {row['batch']:>5} {row['decode_s_per_step']:>13.4f} {row['tokens_per_s']:>8.1f} "
              f"{row['wall_s']:>8.3f} {spent['read']:>7.3f} {spent['decompress']:>8.3f} {spent['stall']:>7.3f}")
    for entry in gen_ratios:
        print(f"batch {entry['batch']}: service / engine decode s/step {entry['service_vs_engine_decode']:.3f} "
              f"(wall {entry['service_vs_engine_wall']:.3f}); target <= {TARGET_SERVICE_VS_ENGINE}: {entry['meets_target']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/service_bench-<device>.json)")
    parser.add_argument("--store", type=Path, help="an existing store (default: a random Llama built in --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "endor-service-bench")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the built store")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens per sequence (the first is the prefill)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=2, help="engine prefetch depth (layers)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, after one warm-up")
    args = parser.parse_args()
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("need --new-tokens >= 2 and --repeats >= 1")
    device_name = torch.cuda.get_device_name() if CUDA else "cpu"
    out_path = args.out or (Path(__file__).parent / "results" /
                            f"service_bench-{re.sub(r'[^a-z0-9]+', '-', device_name.lower()).strip('-')}.json")

    torch.manual_seed(SEED)
    store_path = args.store or prepare_store(args.workdir, args.layers)
    store_nbytes = sum(entry["nbytes"] for entry in Store(str(store_path)).manifest["layers"])
    cluster = None
    try:
        # room for the service's layers (at 70% of the store), a bench shard server and the raw arrays
        cluster, head_id, other_id = start_cluster(max(256 * 2**20, 4 * store_nbytes))
        probe = actor_on(FetchProbe, head_id, str(store_path))
        threads = {"driver": torch.get_num_threads(), "num_cpus=0 actor": get(probe.torch_threads.remote())}
        ray.kill(probe, no_restart=True)
        fetch_rows = bench_fetch(store_path, head_id, other_id, args.repeats)
        gen_rows, agree = bench_generation(store_path, args)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    gen_ratios = generation_ratios(gen_rows, args.batches)

    print(f"mode: {'cuda' if CUDA else 'cpu'}   device: {device_name}   store: {store_path} "
          f"({store_nbytes / 1e6:.1f} MB of layers)   torch threads: {threads}")
    print_tables(fetch_rows, gen_rows, gen_ratios)
    print(f"service and engine greedy tokens agree: {all(agree.values())}")
    result = {
        "benchmark": "service_bench", "mode": "cuda" if CUDA else "cpu", "machine": {**machine_info(), "ray": ray.__version__},
        "settings": {**{key: value for key, value in vars(args).items() if key not in ("out", "store", "workdir")},
                     "store": str(store_path), "layer_bytes": store_nbytes, "warmup": WARMUP, "seed": SEED,
                     "statistic": "median", "GB": 1e9, "engine_config": "EngineConfig(gpu_memory=0)",
                     "model": {**SHAPE, "dtype": "float16", "sparsity": SPARSITY, "method": "magnitude"}
                     if args.store is None else None,
                     "cluster": "loopback ray.cluster_utils.Cluster: head (shard servers + worker) and one more node"},
        "torch_threads": threads, "fetch_rows": fetch_rows, "fetch_ratios": fetch_ratios(fetch_rows),
        "generation_rows": gen_rows, "generation_ratios": gen_ratios,
        "target": {"service_vs_engine_decode": TARGET_SERVICE_VS_ENGINE, "at": "everything on one node"},
        "tokens_agree": all(agree.values()), "tokens_agree_detail": agree,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
