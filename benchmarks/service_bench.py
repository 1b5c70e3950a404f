"""The Ray service against its baselines: layer-fetch throughput and seconds per token.

On a loopback ``ray.cluster_utils.Cluster`` (the head holds shard servers and the worker, a second
node stands for another machine), with a random fp16 Llama store (hidden 1024, intermediate 2816,
50% magnitude sparsity, built once in --workdir) or ``--store``; fixed seeds, a warm-up, medians:

1. Layer fetch, shard server -> worker: probe actors (``num_cpus=0``, as the worker) on the shard
   node and on the other node read every layer in turn with ``RayShardReader.resolve(request(i), None)``,
   against a raw Ray transfer of the same bytes (numpy arrays ``ray.put`` on the shard node). Each
   repeat uses a fresh shard server and arrays, so a "cold" read across nodes moves the bytes; a
   "warm" second read may find the copy Ray keeps on the reader's node. GB/s and layer / raw.
2. Generation on one node: ``connect(store, EngineConfig(gpu_memory=0)).generate`` against
   ``Engine(store, same config).generate`` in this process (calls alternated, never at once; the
   engine gets the worker actor's torch thread count unless --engine-threads): medians of
   ``decode_s_per_step`` and driver wall time; target service / engine <= 1.10; ``tokens_agree``.

Run: ``python benchmarks/service_bench.py [--store PATH] [--batches 1 8] [--repeats 3]`` -> table and
benchmarks/results/service_bench-<device>.json (``--out`` overrides). With CUDA the engine runs on the
GPU ("mode": "cuda"; gpu_memory=0 keeps every layer streaming), else on the CPU ("mode": "cpu").
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

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported; else Cluster hangs
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; real clusters keep token auth on

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from kernel_bench import CUDA, machine_info  # noqa: E402  (this folder)
from offload_bench import prompt_ids, random_checkpoint  # noqa: E402

from endor_ray.utils.atomic import staged_directory  # noqa: E402
from endor_ray.compress.convert import ConvertConfig, convert  # noqa: E402
from endor_ray.service.driver import ClusterConfig, connect  # noqa: E402
from endor_ray.engine.engine import Engine, EngineConfig  # noqa: E402
from endor_ray.engine.sampling import SamplingParams  # noqa: E402
from endor_ray.service.actors import RayShardReader, ShardActor  # noqa: E402
from endor_ray.store.store import Store  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8, vocab_size=4096)
SPARSITY = 0.5
SEED = 0
WARMUP = 1
TIMEOUT_S = 300.0  # every wait on Ray
TARGET = 1.10  # service / engine seconds per decode step, everything on one node
Run = tuple[float, float, dict[str, Any]]  # (decode s per step, driver wall s, result dict)


class FetchProbe:
    """Reads layers (or raw objects) from inside an actor, as the GPU worker does; or puts raw objects."""

    def __init__(self, store_location: str):
        self.store = Store(store_location)

    def read_layers(self, shard: Any, num_layers: int) -> float:
        reader = RayShardReader(self.store, dict.fromkeys(range(num_layers), shard), TIMEOUT_S)
        started = time.perf_counter()
        for layer_idx in range(num_layers):
            reader.resolve(reader.request(layer_idx), None)  # [nbytes] uint8 view of the object store
        return time.perf_counter() - started

    def read_refs(self, refs: list[ray.ObjectRef]) -> float:
        started = time.perf_counter()
        for ref in refs:
            ray.get(ref, timeout=TIMEOUT_S)
        return time.perf_counter() - started

    def torch_threads(self) -> int:
        return torch.get_num_threads()  # Ray sets OMP_NUM_THREADS=1 in num_cpus=0 actors

    def put_arrays(self, nbytes: list[int], seed: int) -> list[ray.ObjectRef]:
        """Fresh random [size] uint8 arrays in this node's object store: the raw-transfer baseline."""
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
        **node, "num_cpus": os.cpu_count(), "num_gpus": int(CUDA), "include_dashboard": False,
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
    putter = actor_on(FetchProbe, head_id, str(store_path))  # owns the raw arrays, as a shard server its layers
    samples: dict[tuple[str, str, str], list[float]] = {}
    for repeat in range(WARMUP + repeats):
        shard = actor_on(ShardActor, head_id, str(store_path), list(range(num_layers)), [])
        get(shard.ready.remote())
        refs = get(putter.put_arrays.remote(layer_nbytes, SEED + repeat))
        for placement, probe in probes.items():
            for fetch in ("cold", "warm"):  # an actor runs its calls in order: layers, then raw
                timed = get([probe.read_layers.remote(shard, num_layers), probe.read_refs.remote(refs)])
                for path, elapsed in zip(("layer", "raw"), timed):
                    samples.setdefault((path, placement, fetch), []).append(elapsed)
        ray.kill(shard, no_restart=True)  # frees its objects and their copies before the next repeat
        del refs
    for actor in [putter, *probes.values()]:
        ray.kill(actor, no_restart=True)
    medians = {key: statistics.median(seconds[WARMUP:]) for key, seconds in samples.items()}
    return [{"path": path, "placement": placement, "fetch": fetch, "s_all_layers": median_s,
             "ms_per_layer": median_s / num_layers * 1e3, "GBps": total / median_s / 1e9, "bytes": total,
             "vs_raw": medians[("raw", placement, fetch)] / median_s}  # GB/s ratio layer / raw
            for (path, placement, fetch), median_s in medians.items()]


def generation_row(system: str, batch: int, runs: list[Run]) -> dict[str, Any]:
    """Medians over the runs, the median run's engine stats, and its Ray/store read time per fetched layer."""
    decode_s = statistics.median(run[0] for run in runs)
    stats = sorted(runs, key=lambda run: run[0])[len(runs) // 2][2]["stats"]
    fetched = sum(hits for tier, hits in stats["tier_hits"].items() if tier != "device")
    return {"system": system, "batch": batch, "decode_s_per_step": decode_s, "tokens_per_s": batch / decode_s,
            "wall_s": statistics.median(run[1] for run in runs),
            "read_ms_per_layer": stats["time_s"]["read"] / max(fetched, 1) * 1e3, "stats": stats}


def bench_generation(store_path: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    """Service (worker and shard server on the head) vs the in-process engine: rows and token agreement."""
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    config = EngineConfig(gpu_memory=0, prefetch_depth=args.prefetch)
    vocab_size = int(Store(str(store_path)).config["vocab_size"])
    rows, tokens = [], {}
    with connect(str(store_path), config, ClusterConfig(timeout_s=TIMEOUT_S)) as service, \
            Engine(str(store_path), config, progress=False) as engine:
        systems: dict[str, Callable[[list[str]], dict[str, Any]]] = {
            "service": lambda prompts: service.generate(prompts, params),
            "engine": lambda prompts: engine.generate(prompts, params).to_dict()}
        for batch in args.batches:
            prompts = [" ".join(f"t{token}" for token in row) for row in prompt_ids(batch, args.prompt_len, vocab_size)]
            runs: dict[str, list[Run]] = {system: [] for system in systems}
            for repeat in range(WARMUP + args.repeats):
                for system, generate in systems.items():  # alternated: a change of load hits both alike
                    started = time.perf_counter()
                    result = generate(prompts)
                    if repeat >= WARMUP:
                        runs[system].append((result["stats"]["decode_s_per_pass"], time.perf_counter() - started, result))
            for system, timed in runs.items():
                rows.append(generation_row(system, batch, timed))
                tokens[system, batch] = [completion["token_ids"] for completion in timed[0][2]["completions"]]
    return rows, {str(batch): tokens["service", batch] == tokens["engine", batch] for batch in args.batches}


def generation_ratios(rows: list[dict[str, Any]], batches: list[int]) -> list[dict[str, Any]]:
    by_key = {(row["system"], row["batch"]): row for row in rows}
    pairs = [(by_key["service", batch], by_key["engine", batch]) for batch in batches]
    return [{"batch": service["batch"], "service_vs_engine_decode": service["decode_s_per_step"] / engine["decode_s_per_step"],
             "service_vs_engine_wall": service["wall_s"] / engine["wall_s"],
             "meets_target": service["decode_s_per_step"] / engine["decode_s_per_step"] <= TARGET} for service, engine in pairs]


def print_tables(fetch_rows: list[dict[str, Any]], gen_rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    header = f"{'path':>6} {'placement':>10} {'fetch':>5} {'s/all layers':>12} {'ms/layer':>9} {'GB/s':>8} {'vs raw':>7}"
    print(header + "\n" + "-" * len(header))
    for row in fetch_rows:
        print(f"{row['path']:>6} {row['placement']:>10} {row['fetch']:>5} {row['s_all_layers']:>12.4f} "
              f"{row['ms_per_layer']:>9.2f} {row['GBps']:>8.2f} {row['vs_raw']:>7.3f}")
    header = (f"{'system':>8} {'batch':>5} {'decode s/step':>13} {'tok/s':>7} {'wall s':>7} "
              f"{'read ms/layer':>13} {'decomp s':>8} {'stall s':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    for row in gen_rows:
        spent = row["stats"]["time_s"]
        print(f"{row['system']:>8} {row['batch']:>5} {row['decode_s_per_step']:>13.4f} {row['tokens_per_s']:>7.1f} "
              f"{row['wall_s']:>7.3f} {row['read_ms_per_layer']:>13.2f} {spent['decompress']:>8.3f} {spent['stall']:>7.3f}")
    for entry in ratios:
        print(f"batch {entry['batch']}: service / engine decode s/step {entry['service_vs_engine_decode']:.3f} "
              f"(wall {entry['service_vs_engine_wall']:.3f}); target <= {TARGET}: {entry['meets_target']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/service_bench-<device>.json)")
    parser.add_argument("--store", type=Path, help="an existing store (default: a random Llama built in --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "endor-service-bench")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the built store")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens per sequence (the first is the prefill)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--engine-threads", type=int, help="torch threads of the in-process engine (default: the worker's)")
    parser.add_argument("--prefetch", type=int, default=2, help="engine prefetch depth (layers)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, after one warm-up")
    args = parser.parse_args()
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("need --new-tokens >= 2 and --repeats >= 1")
    mode, device_name = ("cuda", torch.cuda.get_device_name()) if CUDA else ("cpu", "cpu")
    out_path = args.out or (Path(__file__).parent / "results" /
                            f"service_bench-{re.sub(r'[^a-z0-9]+', '-', device_name.lower()).strip('-')}.json")

    torch.manual_seed(SEED)
    store_path = args.store or prepare_store(args.workdir, args.layers)
    store_nbytes = sum(entry["nbytes"] for entry in Store(str(store_path)).manifest["layers"])
    cluster, load_before = None, os.getloadavg()[0]  # other processes' load skews CPU timings
    try:  # object store: the service's layers (at 70% of it), a bench shard server, the raw arrays
        cluster, head_id, other_id = start_cluster(max(256 * 2**20, 4 * store_nbytes))
        probe = actor_on(FetchProbe, head_id, str(store_path))
        threads = {"driver default": torch.get_num_threads(), "worker": get(probe.torch_threads.remote())}
        ray.kill(probe, no_restart=True)
        fetch_rows = bench_fetch(store_path, head_id, other_id, args.repeats)
        # Ray gives num_cpus=0 actors (the worker) OMP_NUM_THREADS=1: the engine gets the same, or the
        # ratio measures thread counts (on 2 cores, 2 intra-op threads starve the decode thread).
        threads["engine"] = args.engine_threads or threads["worker"]
        torch.set_num_threads(threads["engine"])
        gen_rows, agree = bench_generation(store_path, args)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    ratios = generation_ratios(gen_rows, args.batches)

    print(f"mode: {mode}   device: {device_name}   layers: {store_nbytes / 1e6:.1f} MB   torch threads: {threads}   "
          f"1-min load before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    print_tables(fetch_rows, gen_rows, ratios)
    print(f"service and engine greedy tokens agree: {all(agree.values())}")
    result = {
        "benchmark": "service_bench", "mode": mode, "machine": {**machine_info(), "ray": ray.__version__},
        "settings": {**{key: value for key, value in vars(args).items() if key not in ("out", "store", "workdir")},
                     "store": str(store_path), "layer_bytes": store_nbytes, "warmup": WARMUP, "seed": SEED,
                     "statistic": "median", "GB": 1e9,
                     "model": None if args.store else {**SHAPE, "dtype": "float16", "sparsity": SPARSITY}},
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}, "torch_threads": threads,
        "fetch_rows": fetch_rows, "generation_rows": gen_rows, "generation_ratios": ratios,
        "target": {"service_vs_engine_decode": TARGET, "at": "everything on one node"},
        "tokens_agree": all(agree.values()), "tokens_agree_detail": agree,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
