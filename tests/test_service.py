"""The Ray service on a real multi-node cluster on 127.0.0.1: a head node for the GPU worker and two
nodes for shard servers (one cluster for this module, shut down at the end, nothing left behind).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from endor_ray.service.driver import ClusterConfig, connect
from endor_ray.engine import Engine, EngineConfig
from endor_ray.errors import ChecksumError, EndorError
from endor_ray.service.placement import PlacementError
from endor_ray.engine.sampling import SamplingParams

from conftest import read_manifest

PROMPTS = ["The capital of France is", "Once upon a time there was a", "Hi"]
PARAMS = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"endor_worker": 1}, "node_ip_address": "127.0.0.1",
        "object_store_memory": 150 * 2**20, "include_dashboard": False,
    })
    nodes = [cluster.add_node(num_cpus=1, resources={"endor_shard": 1}, node_ip_address="127.0.0.1",
                              object_store_memory=150 * 2**20) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_stores) -> list[list[int]]:
    with Engine(str(tiny_stores["llama-gqa"]), EngineConfig(gpu_memory=0), progress=False) as engine:
        return [c.token_ids for c in engine.generate(PROMPTS, PARAMS).completions]


def layer_nbytes(store) -> int:
    return sum(layer["nbytes"] for layer in read_manifest(store)["layers"])


def named_actors() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("endor-")]


def test_shards_on_two_nodes_worker_on_the_third(cluster, tiny_stores, expected):
    store = tiny_stores["llama-gqa"]
    half = layer_nbytes(store) // 2 + 1  # forces the three layers over both shard nodes
    with connect(str(store), EngineConfig(gpu_memory=0), ClusterConfig(shard_memory=f"{half}B")) as service:
        shard_nodes = {node.node_id for node in cluster[1]}
        assert set(service.placement.nodes) == shard_nodes
        worker_info = __import__("ray").get(service.workers[0].ready.remote())
        assert worker_info["node_id"] not in shard_nodes
        result = service.generate(PROMPTS, PARAMS)
        assert [c["token_ids"] for c in result["completions"]] == expected
        assert result["stats"]["tier_hits"]["remote"] == result["stats"]["passes"] * 3

        events = list(service.stream(PROMPTS, PARAMS))
        final = events[-1]
        assert [c["token_ids"] for c in final["completions"]] == expected
        for index, completion in enumerate(final["completions"]):
            assert "".join(e.get("text", "") for e in events[:-1] if e["index"] == index) == completion["text"]
        stats = service.shard_stats()
        assert sum(s["bytes_served"] for s in stats.values()) > 0
        assert sorted(idx for s in stats.values() for idx in s["layers"]) == [0, 1, 2]
    assert named_actors() == []


def test_killed_shard_server_restarts_and_output_is_unchanged(cluster, tiny_stores, expected):
    import ray

    store = tiny_stores["llama-gqa"]
    half = layer_nbytes(store) // 2 + 1
    with connect(str(store), EngineConfig(gpu_memory=0, prefetch_depth=1), ClusterConfig(shard_memory=f"{half}B")) as service:
        victim = service.shards[service.placement.node_of(1)]
        events = service.stream(PROMPTS, SamplingParams(max_new_tokens=12))
        first = next(events)
        ray.kill(victim, no_restart=False)  # dies mid-generation; Ray restarts it, it reloads its layers
        final = [first, *events][-1]
        long_expected = Engine(str(store), EngineConfig(gpu_memory=0), progress=False)
        try:
            reference = [c.token_ids for c in long_expected.generate(PROMPTS, SamplingParams(max_new_tokens=12)).completions]
        finally:
            long_expected.close()
        assert [c["token_ids"] for c in final["completions"]] == reference
        assert final["stats"]["fetch_retries"] > 0  # the failure really happened and was retried
        assert service.generate(PROMPTS, PARAMS)["completions"][0]["token_ids"] == expected[0]


def test_a_shard_server_beyond_its_restarts_fails_fast(cluster, tiny_stores):
    import time

    import ray

    store = tiny_stores["llama-gqa"]
    half = layer_nbytes(store) // 2 + 1
    with connect(str(store), EngineConfig(gpu_memory=0, prefetch_depth=1),
                 ClusterConfig(shard_memory=f"{half}B", max_restarts=0, timeout_s=300)) as service:
        ray.kill(service.shards[service.placement.node_of(1)], no_restart=False)  # no restarts left
        started = time.monotonic()
        with pytest.raises(EndorError, match="will not restart"):
            service.generate(PROMPTS, PARAMS)
        assert time.monotonic() - started < 30  # not the 300 s deadline


def test_two_workers_share_the_shards(cluster, tiny_stores, expected):
    with connect(str(tiny_stores["llama-gqa"]), EngineConfig(gpu_memory=1), ClusterConfig(num_workers=2)) as service:
        results = [service.generate(PROMPTS, PARAMS) for _ in range(2)]  # round-robin over both workers
        assert len(service.workers) == 2 and len(service.shards) >= 1
    for result in results:
        assert [c["token_ids"] for c in result["completions"]] == expected


def test_bad_store_and_budgets_leave_no_actors(cluster, tiny_stores, tmp_path):
    store = shutil.copytree(tiny_stores["llama-gqa"], tmp_path / "store")
    layer_file = store / read_manifest(store)["layers"][2]["file"]
    data = bytearray(layer_file.read_bytes())
    data[-10] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="shard server start failed: checksum mismatch"):
        connect(str(store), EngineConfig(gpu_memory=0), ClusterConfig(timeout_s=120))
    assert named_actors() == []

    with pytest.raises(PlacementError, match=r"missing; add nodes"):
        connect(str(tiny_stores["llama-gqa"]), EngineConfig(gpu_memory=0),
                ClusterConfig(shard_memory="1KB", spill_to_disk=False))
    assert named_actors() == []

    with pytest.raises(EndorError, match="exceeds the model's context"):
        with connect(str(tiny_stores["llama-gqa"]), EngineConfig(gpu_memory=0)) as service:
            service.generate(["word " * 300], PARAMS)
    assert named_actors() == []


def test_cli_on_the_cluster_and_unreachable_address(cluster, tiny_stores, capsys):
    from endor_ray.cli import main

    assert main(["generate", str(tiny_stores["opt"]), "--prompt", "Hello", "--max-new-tokens", "3",
                 "--gpu-memory", "0", "--json"]) == 0  # uses this process's Ray connection
    result = json.loads(capsys.readouterr().out)
    assert result["stats"]["tier_hits"]["remote"] > 0

    endor = Path(sys.executable).with_name("endor")
    unreachable = subprocess.run([endor, "generate", str(tiny_stores["opt"]), "--prompt", "x", "--address", "127.0.0.1:1"],
                                 capture_output=True, text=True, timeout=120)
    assert unreachable.returncode == 1
    assert "no Ray cluster answers at 127.0.0.1:1" in unreachable.stderr and "Traceback" not in unreachable.stderr


def test_a_stream_whose_consumer_stops_cancels_its_request(cluster, tiny_stores):
    import asyncio
    import threading
    import time

    with connect(str(tiny_stores["llama-gqa"]), EngineConfig(gpu_memory=0)) as service:
        events = service.stream(PROMPTS, SamplingParams(max_new_tokens=100))
        assert "token_id" in next(events)
        events.close()  # the consumer went away: the worker lets the request go
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            [stats] = asyncio.run(service.worker_stats())
            if stats["running"] + stats["waiting"] == 0:
                break
            time.sleep(0.2)
        assert stats["running"] + stats["waiting"] == 0 and stats["finished"].get("cancelled") == len(PROMPTS)
        assert not [thread for thread in threading.enumerate() if thread.name == "endor-stream"]
