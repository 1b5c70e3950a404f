"""Continuous batching under load: 32 OpenAI clients arriving staggered against `endor serve`.

A Serve app on 127.0.0.1 over a store (default: the embedded SmolLM2-135M, magnitude-pruned to
50%, made once under --workdir); client k (of --clients) starts at k * --stagger seconds and streams
one completion of a length drawn from [8, 48] tokens (fixed seed), greedy. Reported: each client's
time to first token and total time, the server's mean live sequences per pass over the weights
during the run (from /health), and two ratios in the same run: a 1-token request sent while a
60-token one streams (its time over the long one's), and the passes a 20-prompt request takes
against its longest completion.

    python benchmarks/serve_load.py [--store STORE] [--clients 32]  ->  benchmarks/results/serve_load-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")

PORT = 8311
BASE = f"http://127.0.0.1:{PORT}"


def health() -> dict:
    with urllib.request.urlopen(f"{BASE}/health", timeout=60) as answer:
        return json.load(answer)["batching"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "endor-serve-load")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--stagger", type=float, default=0.25, help="seconds between client arrivals")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load-cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import ray
    from openai import OpenAI
    from ray import serve

    from endor_ray.serve import build_app
    from endor_ray.compress.convert import ConvertConfig, convert
    from kernel_bench import machine_info

    store = args.store
    if store is None:
        store = args.workdir / "smollm2-mag50"
        if not (store / "manifest.json").is_file():
            convert("smollm2-135m", store, ConvertConfig(method="magnitude", dtype="bfloat16", force=True))
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app({"store": str(store), "model_name": "load", "scheduler.max_num_seqs": 32}), name="endor",
                  route_prefix="/")
        client = OpenAI(base_url=f"{BASE}/v1", api_key="unused", timeout=600, max_retries=0)
        client.completions.create(model="load", prompt="warm up", max_tokens=2, temperature=0)
        result = run(client, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    result["machine"] = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def run(client, args) -> dict:
    rng = random.Random(0)
    lengths = [rng.randint(8, 48) for _ in range(args.clients)]
    topics = ["The capital of France is", "Once upon a time", "The best way to learn is", "In the morning I",
              "def add(a, b):", "The sea is"]
    records: list[dict] = [{} for _ in range(args.clients)]
    before = health()
    started = time.perf_counter()

    def one(index: int) -> None:
        time.sleep(index * args.stagger)
        begin = time.perf_counter()
        first, tokens = None, 0
        for chunk in client.completions.create(model="load", prompt=f"{topics[index % len(topics)]} ({index})",
                                               max_tokens=lengths[index], temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].text:
                tokens += 1
                first = first if first is not None else time.perf_counter() - begin
        records[index] = {"arrival_s": begin - started, "ttft_s": first, "total_s": time.perf_counter() - begin,
                          "chunks": tokens, "max_tokens": lengths[index]}

    threads = [threading.Thread(target=one, args=(index,)) for index in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = health()
    passes = after["passes"] - before["passes"]
    served = after["mean_sequences_per_pass"] * after["passes"] - before["mean_sequences_per_pass"] * before["passes"]

    # A 1-token request while a 60-token one streams.
    stream = iter(client.completions.create(model="load", prompt=topics[1], max_tokens=60, temperature=0, stream=True))
    next(stream)
    begin = time.perf_counter()
    client.completions.create(model="load", prompt=topics[0], max_tokens=1, temperature=0)
    short_s = time.perf_counter() - begin
    for _ in stream:
        pass
    long_s = time.perf_counter() - begin

    # 20 prompts in one request.
    before_passes = health()["passes"]
    response = client.completions.create(model="load", prompt=[f"{topics[i % 6]} [{i}]" for i in range(20)],
                                         max_tokens=16, temperature=0)
    twenty_passes = health()["passes"] - before_passes
    reasons = [choice.finish_reason for choice in response.choices]

    ttfts = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    result = {
        "benchmark": "serve_load", "clients": args.clients, "stagger_s": args.stagger, "wall_s": wall,
        "passes": passes, "mean_sequences_per_pass": served / passes if passes else 0.0,
        "ttft_s": {"median": statistics.median(ttfts), "max": max(ttfts)},
        "total_s": {"median": statistics.median(r["total_s"] for r in records), "max": max(r["total_s"] for r in records)},
        "short_while_long": {"short_s": short_s, "long_remaining_s": long_s, "ratio": short_s / long_s},
        "twenty_prompts": {"passes": twenty_passes, "max_tokens": 16, "choices": len(response.choices),
                           "ran_to_max_tokens": reasons.count("length")},
        "load_average": os.getloadavg(), "clients_detail": records,
    }
    print(json.dumps({key: value for key, value in result.items() if key != "clients_detail"}, indent=1))
    return result


if __name__ == "__main__":
    main()
