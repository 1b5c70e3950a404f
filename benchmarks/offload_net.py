"""The network arm of the offload benchmark: shard servers behind a rate-limited link.

On one machine, a Ray cluster of two nodes joined by a link this script builds and limits:
a network namespace holds the shard node (its own address, `endor_shard` resource), the root
namespace the head with the GPU worker (`endor_worker`), and a veth pair between them carries a
`tc` token-bucket limit (1 Gbit/s by default) in both directions. The same 50%-pruned random
Llama (7B-shaped heads, smaller layers so a step takes seconds, bf16) is served twice, from a
`--format dense` store and from the Endor store; rounds alternate the two services and time
decode steps (batch 1, prefill excluded). The worker node's object store is smaller than either
store, as for a model larger than the worker's memory: every layer crosses the link every step.

Needs root (ip netns, tc); uses only the addresses 10.213.0.1/2 and the namespace it creates,
and tears both down, and stops the Ray nodes it started, even on failure.

    sudo python benchmarks/offload_net.py [--rate 1gbit] [--layers 8] [--rounds 3]
      -> benchmarks/results/offload_net-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAMESPACE = "endor-bench-net"
HEAD_IP, SHARD_IP = "10.213.0.1", "10.213.0.2"
HEAD_PORT = 6390
SHAPE = dict(hidden_size=2048, intermediate_size=5504, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def make_link(rate: str) -> None:
    """veth pair root <-> namespace, addresses, and a tbf rate limit on each side's egress."""
    sh("ip", "netns", "add", NAMESPACE)
    sh("ip", "link", "add", "veth-endor-h", "type", "veth", "peer", "name", "veth-endor-n")
    sh("ip", "link", "set", "veth-endor-n", "netns", NAMESPACE)
    sh("ip", "addr", "add", f"{HEAD_IP}/24", "dev", "veth-endor-h")
    sh("ip", "link", "set", "veth-endor-h", "up")
    ns = ("ip", "netns", "exec", NAMESPACE)
    sh(*ns, "ip", "addr", "add", f"{SHARD_IP}/24", "dev", "veth-endor-n")
    sh(*ns, "ip", "link", "set", "veth-endor-n", "up")
    sh(*ns, "ip", "link", "set", "lo", "up")
    limit = ("root", "tbf", "rate", rate, "burst", "1mb", "latency", "200ms")
    sh("tc", "qdisc", "add", "dev", "veth-endor-h", *limit)
    sh(*ns, "tc", "qdisc", "add", "dev", "veth-endor-n", *limit)


def remove_link() -> None:
    sh("ip", "link", "del", "veth-endor-h", check=False)
    sh("ip", "netns", "del", NAMESPACE, check=False)


def start_nodes(temp_dir: str, worker_object_store: int, shard_object_store: int) -> None:
    ray = str(Path(sys.executable).parent / "ray")
    common = ("--disable-usage-stats", "--num-cpus=2")
    sh(ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={HEAD_PORT}", f"--temp-dir={temp_dir}",
       '--resources={"endor_worker": 1}', f"--object-store-memory={worker_object_store}", "--include-dashboard=false",
       *common)
    sh("ip", "netns", "exec", NAMESPACE, ray, "start", f"--address={HEAD_IP}:{HEAD_PORT}",
       f"--node-ip-address={SHARD_IP}", '--resources={"endor_shard": 1}',
       f"--object-store-memory={shard_object_store}", *common)


def stop_nodes() -> None:
    ray = str(Path(sys.executable).parent / "ray")
    sh("ip", "netns", "exec", NAMESPACE, ray, "stop", "--force", check=False)
    sh(ray, "stop", "--force", check=False)


def link_GBps(probe_nbytes: int = 200 << 20) -> float:
    """Bytes per second of one object pulled across the link (put by a task on the shard node)."""
    import numpy as np
    import ray

    @ray.remote(num_cpus=0, resources={"endor_shard": 0.01})
    def make(nbytes: int):
        return np.ones(nbytes, dtype=np.uint8)

    ref = make.remote(probe_nbytes)
    ray.wait([ref], fetch_local=False)
    started = time.perf_counter()
    ray.get(ref)
    return probe_nbytes / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", default="1gbit", help="tc rate of the link (tbf), e.g. 1gbit, 500mbit")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "endor-offload-bench")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "offload_net-cpu.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it creates a network namespace and a tc rate limit")
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    from kernel_bench import machine_info
    from offload_cpu import prepare

    root = args.workdir / f"net-llama-h{SHAPE['hidden_size']}-{args.layers}L-bf16"
    paths = prepare(root, SHAPE, args.layers, torch.bfloat16)
    from endor_ray.store import Store

    sizes = {name: sum(e["nbytes"] for e in Store(str(paths[name])).manifest["layers"]) for name in ("dense", "endor")}
    # The worker node holds about three dense layers: fewer than either store, so every layer
    # is pulled across the link each step (the object store keeps pulled copies otherwise).
    largest_layer = max(e["nbytes"] for e in Store(str(paths["dense"])).manifest["layers"])
    worker_store = max(4 * largest_layer, 80 << 20)
    if worker_store >= sizes["endor"]:
        parser.error("the model is too small for this arm: raise --layers")
    temp_dir = tempfile.mkdtemp(prefix="ray-net-")
    remove_link()
    stop_nodes()
    try:
        make_link(args.rate)
        start_nodes(temp_dir, worker_store, 2 * (sizes["dense"] + sizes["endor"]))
        result = run(args, paths, sizes, worker_store)
        result["machine"] = machine_info()
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stop_nodes()
        remove_link()
        shutil.rmtree(temp_dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def run(args, paths: dict[str, Path], sizes: dict[str, int], worker_store: int) -> dict[str, Any]:
    import ray

    import endor_ray
    from endor_ray.engine.engine import EngineConfig
    from endor_ray.engine.sampling import SamplingParams
    from endor_ray.service.driver import ClusterConfig

    ray.init(address=f"{HEAD_IP}:{HEAD_PORT}", log_to_driver=False)
    link = link_GBps()
    print(f"link: {args.rate} limit, {link:.3f} GB/s measured through Ray")
    engine_config = EngineConfig(device="cpu", gpu_memory=0, prefetch_depth=2)
    services = {name: endor_ray.connect(str(paths[name]), engine_config, ClusterConfig(address="auto", timeout_s=600))
                for name in ("dense", "endor")}
    prompt = " ".join(f"t{token}" for token in range(100, 116))
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    timings: dict[str, list[float]] = {name: [] for name in services}
    results: dict[str, dict] = {}
    try:
        for round_idx in range(args.rounds + 1):
            for name, service in services.items():
                result = service.generate([prompt], params)
                step = result["stats"]["decode_s_per_pass"]
                print(f"round {round_idx} {name:>6}: {step:.2f} s/step (load {os.getloadavg()[0]:.2f})", flush=True)
                if round_idx:
                    timings[name].append(step)
                    results[name] = result
    finally:
        for service in services.values():
            service.close()
    medians = {name: statistics.median(values) for name, values in timings.items()}
    speedup = medians["dense"] / medians["endor"]
    print(f"Endor over dense across the link: {speedup:.2f}x (bytes-only ideal {sizes['dense'] / sizes['endor']:.2f}x)")
    return {
        "benchmark": "offload_net", "mode": "cpu",
        "settings": {"model": {**SHAPE, "num_hidden_layers": args.layers, "dtype": "bfloat16"}, "sparsity": 0.5,
                     "rate_limit": args.rate, "batch": 1, "new_tokens": args.new_tokens, "rounds": args.rounds,
                     "worker_object_store_bytes": worker_store, "prefetch_depth": 2,
                     "topology": "head (GPU worker, CPU) in the root namespace; shard node in a network namespace; "
                                 "veth pair with tc tbf on both ends"},
        "link_GBps_through_ray": link, "bytes_per_step": sizes,
        "ideal_s_per_step": {name: nbytes / (link * 1e9) for name, nbytes in sizes.items()},
        "s_per_step": {name: {"median": medians[name], "min": min(v), "max": max(v), "all": v}
                       for name, v in timings.items()},
        "speedup_endor_vs_dense": speedup, "target": ">= 1.5", "target_met": speedup >= 1.5,
        "tokens_agree": results["dense"]["completions"][0]["token_ids"] == results["endor"]["completions"][0]["token_ids"],
        "engine_stats": {name: result["stats"] for name, result in results.items()},
        "load_average_end": os.getloadavg()[0],
    }


if __name__ == "__main__":
    main()
