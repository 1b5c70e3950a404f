"""The CPU mode of the offload benchmark: the links this machine really has, arms interleaved.

Same 50%-pruned weights in every arm (a random Llama with 7B-shaped layers: hidden 4096,
intermediate 11008, 32 heads; bf16; magnitude-pruned per row), batch 1, greedy. Arms:

  accelerate-disk   Hugging Face Accelerate's disk offload of the pruned dense checkpoint
                    (from_pretrained(device_map=... "disk"), weights read from the safetensors file)
  dense-disk        this engine on a `--format dense` store, every layer read from disk each step
  endor-disk        this engine on the Endor store, every layer read from disk each step
  dense-host        the dense store's layers held in host memory, copied into the slots each step
  endor-host        the Endor store's layers in host memory, decoded into the slots each step

Every disk arm starts cold and stays cold: all files are evicted from the page cache
(posix_fadvise DONTNEED, checked with fincore) before each run, and each layer's bytes are
evicted again right after they were read (Accelerate: a hook after each decoder layer evicts
that layer's byte range; the engine: its reader evicts each layer file after reading it), so
every decode step reads every layer from the disk, as it must for a model larger than memory.

Rounds run the arms in turn (A B C D E A B C D E ...); each arm's figure is the median over
rounds of seconds per decode step (prefill excluded), with min and max. Each round also reads a
1 GiB probe file cold (the disk's sequential bandwidth); the engine's disk arms report the read
bandwidth they achieved themselves (bytes over the time their I/O thread spent reading). The
ideal of a disk arm is its bytes per step over the dense arm's achieved read bandwidth: what the
arm would take if it were purely bound by the disk as the dense arm saw it. (On the development
machine's virtual disk, files the host has cached recently read at about 3 GB/s and others at
about 0.6 GB/s, so the probe and the arms vary; interleaving gives every arm the same mix.)
All arms must produce the same tokens.

On the CPU the "device" is host memory: a slot's dense weights are filled by a copy (dense
store) or by the fast decoder (Endor store), the stand-ins for the GPU's host-to-device copy and
decompression kernel.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from offload_models import model_decode, prune_layers, random_checkpoint  # this folder

from endor_ray.engine.engine import Engine, EngineConfig, GenerationStats
from endor_ray.engine.readers import StoreReader
from endor_ray.engine.sampling import SamplingParams
from endor_ray.format.cpu_decode import backend
from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.store.files import evict, read_local
from endor_ray.store.store import Store
from endor_ray.utils.atomic import staged_directory

SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000)
SPARSITY = 0.5
Run = tuple[float, list[int], dict[str, Any] | None]  # (s per decode step, greedy tokens, engine stats)


# -- the stores -----------------------------------------------------------------------------------

def prepare(root: Path, shape: dict[str, int], num_layers: int, dtype: torch.dtype) -> dict[str, Path]:
    """A pruned random checkpoint and its dense and Endor stores under `root` (built once, reused)."""
    paths = {"checkpoint": root / "hf-pruned", "dense": root / "store-dense", "endor": root / "store-endor"}
    if all((paths[name] / marker).is_file() for name, marker in
           (("checkpoint", "config.json"), ("dense", "manifest.json"), ("endor", "manifest.json"))):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    print(f"building the stores under {root} (once)")
    model, tokenizer = random_checkpoint(shape, num_layers, dtype)
    prune_layers(model, SPARSITY, torch.device("cpu"))
    with staged_directory(paths["checkpoint"]) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    del model
    for name in ("dense", "endor"):  # already pruned: sparsity 0 keeps every weight as it is
        convert(str(paths["checkpoint"]), paths[name], ConvertConfig(0.0, "magnitude", name, force=True), progress=True)
    return paths


def store_files(store: Store) -> list[str]:
    return [store.local_path(entry["file"]) for entry in store.manifest["layers"]]


def cached_bytes(paths: list[str]) -> int:
    """Bytes of these files in the page cache (fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *paths],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line) for line in out.split())


RESIDUE_BYTES = 1 << 20  # per file: pages a process keeps mapped (Accelerate maps the checkpoint's header)


def evict_all(paths: list[str]) -> None:
    for path in paths:
        evict(path)
    left = cached_bytes(paths)
    if left > RESIDUE_BYTES * len(paths):
        raise RuntimeError(f"{left} bytes of the benchmark's files stay in the page cache after eviction")


PROBE_BYTES = 1 << 30


def disk_GBps(probe: Path) -> float:
    """Cold sequential read bandwidth of the probe file (made once, read into a touched buffer)."""
    if not probe.is_file() or probe.stat().st_size != PROBE_BYTES:
        with open(probe, "wb") as f:
            for _ in range(PROBE_BYTES // (64 << 20)):
                f.write(os.urandom(64 << 20))
    evict_all([str(probe)])
    buffer = torch.empty(PROBE_BYTES, dtype=torch.uint8).fill_(1)  # touched: no page faults in the timing
    started = time.perf_counter()
    read_local(str(probe), buffer, PROBE_BYTES)
    elapsed = time.perf_counter() - started
    evict_all([str(probe)])
    return PROBE_BYTES / elapsed / 1e9


# -- the arms -------------------------------------------------------------------------------------

class EvictingReader(StoreReader):
    """The engine's store reader, evicting each disk-tier file after reading it (cold every step)."""

    def resolve(self, layer_idx: int, buffer: torch.Tensor):
        data, tier = super().resolve(layer_idx, buffer)
        if tier == "disk":
            evict(self.store.local_path(self.entry(layer_idx)["file"]))
        return data, tier


def engine_arm(store: Store, host: bool, threads: int) -> tuple[Engine, Callable[[list[int], int], Run]]:
    config = EngineConfig(device="cpu", gpu_memory=0, host_memory=None if host else "0", prefetch_depth=2)
    plan_host = tuple(range(store.num_layers)) if host else ()
    engine = Engine(store, config, progress=False, reader=EvictingReader(store, plan_host, progress=False))
    if host:
        assert engine.plan.host == plan_host

    def run(ids: list[int], new_tokens: int) -> Run:
        torch.set_num_threads(threads)
        prompt = " ".join(f"t{token}" for token in ids)
        sequences = engine.new_sequences([prompt], SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        engine.add(sequences)
        engine.step()  # prefill
        engine.source.wait_idle()
        engine.source.reset_stats()
        started = time.perf_counter()
        while engine.has_work:
            engine.step()
        engine.source.wait_idle()
        wall, steps = time.perf_counter() - started, new_tokens - 1
        stats = GenerationStats(1, steps, steps, wall, 0.0, engine.source.reset_stats()).to_dict()
        return stats["s_per_pass"], sequences[0].output_ids, stats

    return engine, run


def accelerate_arm(checkpoint: Path, num_layers: int, dtype: torch.dtype, offload_dir: Path, threads: int):
    """Accelerate's disk offload; a hook after each decoder layer evicts that layer's byte range, and
    the layer's files in `offload_dir` (the tensors transformers converts on loading, such as
    Mixtral's experts fused into one tensor, are offloaded there rather than read from the checkpoint)."""
    from transformers import AutoModelForCausalLM

    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
    device_map |= {f"model.layers.{idx}": "disk" for idx in range(num_layers)}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device_map, offload_folder=str(offload_dir),
                                                 dtype=dtype).eval()
    with torch.no_grad():  # the non-layer weights are views of the mapped checkpoint: own them, so
        for tensor in [*model.parameters(), *model.buffers()]:  # the file's pages can all be evicted
            if not tensor.is_meta:
                tensor.data = tensor.data.clone()
    gc.collect()
    ranges: dict[int, list[tuple[str, int, int]]] = {idx: [] for idx in range(num_layers)}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name.startswith("model.layers."):
                begin, end = info["data_offsets"]
                ranges[int(name.split(".")[2])].append((str(path), 8 + header_len + begin, end - begin))

    for path in sorted(offload_dir.glob("model.layers.*")):
        ranges[int(path.name.split(".")[2])].append((str(path), 0, 0))  # 0 length: the whole file

    def evict_layer(layer_idx: int) -> None:
        for path, offset, length in ranges[layer_idx]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    for layer_idx, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda module, args, output, layer_idx=layer_idx: evict_layer(layer_idx))

    def run(ids: list[int], new_tokens: int) -> Run:
        torch.set_num_threads(threads)
        s_per_step, tokens, _ = model_decode(model, [ids], new_tokens, torch.device("cpu"))
        return s_per_step, tokens[0], None

    return model, run


# -- the benchmark ------------------------------------------------------------------------------------

def run_rounds(arms: dict[str, Callable], args, stores: dict[str, Store], checkpoint_files: list[str],
               all_files: list[str], probe: Path):
    """Round 0 warms up (first touch of buffers, the decoder's ISA choice); then the timed rounds."""
    ids = torch.randint(3, SHAPE_7B["vocab_size"], (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    results: dict[str, list[Run]] = {name: [] for name in arms}
    cached_after: dict[str, list[int]] = {name: [] for name in arms}
    disk_rounds, loads = [], []
    for round_idx in range(args.repeats + 1):
        loads.append(os.getloadavg()[0])
        disk_rounds.append(disk_GBps(probe))
        for name, run in arms.items():
            evict_all(all_files)
            result = run(ids, args.new_tokens)
            if name.endswith("-disk"):  # stayed cold: each layer was evicted after it was read
                files = checkpoint_files if name.startswith("accelerate") else store_files(stores[name.split("-")[0]])
                cached_after[name].append(cached_bytes(files))
            if round_idx:
                results[name].append(result)
            print(f"round {round_idx} {name:>16}: {result[0]:.3f} s/step  (load {os.getloadavg()[0]:.2f})", flush=True)
    return results, cached_after, disk_rounds, loads


def run_cpu(args, out_path: Path, machine: dict[str, Any]) -> dict[str, Any]:
    dtype = torch.bfloat16
    threads = torch.get_num_threads()
    root = args.workdir / f"cpu-llama-h{SHAPE_7B['hidden_size']}-{args.layers}L-bf16"
    started = time.perf_counter()
    paths = prepare(root, SHAPE_7B, args.layers, dtype)
    setup_s = time.perf_counter() - started
    stores = {name: Store(str(paths[name])) for name in ("dense", "endor")}
    checkpoint_files = [str(path) for path in sorted(paths["checkpoint"].glob("*.safetensors"))]
    all_files = checkpoint_files + store_files(stores["dense"]) + store_files(stores["endor"])
    bytes_per_step = {name: sum(entry["nbytes"] for entry in store.manifest["layers"]) for name, store in stores.items()}
    bytes_per_step["accelerate"] = sum(layer["dense_nbytes"] for layer in stores["dense"].summary()["layers"])

    arms: dict[str, Callable[[list[int], int], Run]] = {}
    engines = []
    try:
        if "accelerate-disk" in args.arms:
            _, arms["accelerate-disk"] = accelerate_arm(paths["checkpoint"], args.layers, dtype, root / "offload", threads)
        for name in ("dense", "endor"):
            for tier in ("disk", "host"):
                if f"{name}-{tier}" in args.arms:
                    engine, arms[f"{name}-{tier}"] = engine_arm(stores[name], tier == "host", threads)
                    engines.append(engine)
        arms = {name: arms[name] for name in args.arms}
        results, cached_after, disk_rounds, loads = run_rounds(arms, args, stores, checkpoint_files, all_files,
                                                               root / "disk-probe.bin")
    finally:
        for engine in engines:
            engine.close()


    disk = statistics.median(disk_rounds[1:])

    def read_GBps(run: Run) -> float | None:
        stats = run[2]
        if not stats or not stats["time_s"]["read"]:
            return None
        return stats["bytes_to_device_per_pass"] * stats["passes"] / stats["time_s"]["read"] / 1e9

    dense_read = statistics.median(read_GBps(run) for run in results["dense-disk"]) if "dense-disk" in results else None
    rows = []
    for name, runs in results.items():
        times = [run[0] for run in runs]
        median_run = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
        kind = "accelerate" if name.startswith("accelerate") else name.split("-")[0]
        tier = name.split("-")[1]
        step_bytes = bytes_per_step[kind]
        rows.append({
            "arm": name, "s_per_step_median": statistics.median(times), "s_per_step_min": min(times),
            "s_per_step_max": max(times), "s_per_step_all": times, "bytes_per_step": step_bytes,
            "read_GBps_median": (statistics.median(r for r in map(read_GBps, runs) if r) if tier == "disk"
                                 and kind != "accelerate" else None),
            "ideal_s_per_step": step_bytes / (dense_read * 1e9) if tier == "disk" and dense_read else None,
            "tokens": median_run[1], "engine_stats": median_run[2],
            "page_cache_bytes_after_each_run": cached_after[name] or None,
        })
    by_arm = {row["arm"]: row for row in rows}

    def ratio(slow: str, fast: str) -> float | None:
        if slow in by_arm and fast in by_arm:
            return by_arm[slow]["s_per_step_median"] / by_arm[fast]["s_per_step_median"]
        return None

    ratios = {
        "endor_disk_speedup_vs_accelerate_disk": ratio("accelerate-disk", "endor-disk"),
        "endor_disk_speedup_vs_dense_disk": ratio("dense-disk", "endor-disk"),
        "endor_host_slowdown_vs_dense_host": ratio("endor-host", "dense-host"),
        "bytes_only_ideal_speedup": bytes_per_step["dense"] / bytes_per_step["endor"],
    }
    targets = {"endor_disk_speedup_vs_accelerate_disk": (">=", 1.5), "endor_disk_speedup_vs_dense_disk": (">=", 1.4),
               "endor_host_slowdown_vs_dense_host": ("<=", 1.3)}
    met = {key: (ratios[key] >= bound if op == ">=" else ratios[key] <= bound) for key, (op, bound) in targets.items()
           if ratios[key] is not None}
    tokens = {row["arm"]: row["tokens"] for row in rows}
    result = {
        "benchmark": "offload_bench", "mode": "cpu", "machine": machine,
        "settings": {"model": {**SHAPE_7B, "num_hidden_layers": args.layers, "dtype": "bfloat16"},
                     "sparsity": SPARSITY, "pruning": "magnitude per row", "batch": 1, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "timed_steps_per_run": args.new_tokens - 1,
                     "rounds": args.repeats, "warmup_rounds": 1, "statistic": "median over rounds",
                     "torch_threads": threads, "cpu_decoder": backend(2), "prefetch_depth": 2,
                     "order": "interleaved: " + " ".join(arms), "workdir": str(root)},
        "setup_s": setup_s, "load_average_per_round": loads, "disk_probe_GBps_per_round": disk_rounds,
        "disk_GBps": disk, "dense_arm_read_GBps": dense_read,
        "rows": rows, "ratios": ratios, "targets": {key: f"{op} {bound}" for key, (op, bound) in targets.items()},
        "targets_met": met, "tokens_agree": len({tuple(t) for t in tokens.values()}) == 1,
    }
    return result


def print_cpu(result: dict[str, Any]) -> None:
    loads = " ".join(f"{load:.2f}" for load in result["load_average_per_round"])
    print(f"disk probe (1 GiB cold, sequential): {result['disk_GBps']:.2f} GB/s; dense arm read "
          f"{result['dense_arm_read_GBps'] or 0:.2f} GB/s; load average per round {loads}")
    print(f"{'arm':>16} {'s/step':>8} {'min':>7} {'max':>7} {'MB/step':>8} {'read GB/s':>9} {'ideal s':>8}")
    for row in result["rows"]:
        ideal = f"{row['ideal_s_per_step']:>8.3f}" if row["ideal_s_per_step"] else f"{'-':>8}"
        read = f"{row['read_GBps_median']:>9.2f}" if row["read_GBps_median"] else f"{'-':>9}"
        print(f"{row['arm']:>16} {row['s_per_step_median']:>8.3f} {row['s_per_step_min']:>7.3f} "
              f"{row['s_per_step_max']:>7.3f} {row['bytes_per_step'] / 1e6:>8.0f} {read} {ideal}")
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.2f}" if value is not None else f"{key}: n/a")
    print(f"targets met: {result['targets_met']}; tokens agree: {result['tokens_agree']}")
