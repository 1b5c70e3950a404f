"""Offloaded decoding of Llama-2-70B-shaped layers: Accelerate vs this engine, dense vs Endor weights.

Random fp16 layers of Llama-2-70B's shape (hidden 8192, intermediate 28672, 64 heads, 8 KV heads),
magnitude-pruned per row; greedy decoding at each --batches size with every layer past the first
--gpu-layers streamed from host memory each step. One process, the same 50%-pruned weights in
(a) Hugging Face Accelerate offloading (``dispatch_model`` with decoder layers on "cpu", as
``from_pretrained(device_map=...)`` does), (b) this engine with dense weights, (c) this engine with
Endor weights at each --sparsities value. Per row: median over --repeats (after a warm-up) of
seconds per decode step = per token of each sequence (prefill excluded), tokens/s, per-layer time,
bytes streamed per step, achieved GB/s, and the ideal time: streamed bytes / pinned host-to-GPU
GB/s measured in the run. Ratios (targets at 50%, fp16, H100): (a)/(c) >= 2.0, (b)/(c) >= 1.7,
(c)/ideal <= 1.15. Greedy tokens of (a), (b), (c)-50% must agree ("tokens_agree").

GPU: ``python benchmarks/offload_bench.py [--layers 8] [--gpu-layers 0] [--batches 1 16]`` ->
benchmarks/results/offload_bench-<gpu>.json and .png (with matplotlib). Stores are built once per
--workdir (8 layers: ~33 GB) and reused.

Without CUDA (or with ``--mode cpu``) it runs the CPU mode of `offload_cpu.py`: the links this
machine has (a cold disk, host memory), Accelerate's disk offload against the engine on dense
and Endor stores, arms interleaved over rounds -> benchmarks/results/offload_bench-cpu.json/.png.
The network arm is `offload_net.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kernel_bench import CUDA, H2D_NBYTES, machine_info, pinned_h2d_gbps  # this folder
from offload_models import SEED, Run, model_decode, prune_layers, random_checkpoint, synchronize  # this folder

from endor_ray.utils.atomic import staged_directory
from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.engine.engine import Engine, EngineConfig, GenerationStats
from endor_ray.engine.reference import load_dense_model
from endor_ray.engine.sampling import SamplingParams
from endor_ray.store.store import Store

GPU_SHAPE = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                 vocab_size=32000)  # Llama-2-70B
BASE_SPARSITY = 0.5  # (a), (b) and the first Endor store hold these weights
WARMUP = 1
TARGETS = {"speedup_vs_accelerate": 2.0, "speedup_vs_dense_engine": 1.7, "vs_ideal": 1.15}
Rows = tuple[list[dict[str, Any]], dict[int, list[list[int]]]]  # (table rows, greedy tokens per batch size)


def store_name(sparsity: float) -> str:
    return f"endor-{round(sparsity * 100)}"


def prepare(root: Path, shape: dict[str, int], num_layers: int, sparsities: list[float], device: torch.device,
            progress: bool) -> dict[str, Path]:
    """The stores under `root`, built when missing: 'dense' (50% pruned, stored dense), 'endor-<pct>'."""
    paths = {"dense": root / "store-dense-50", **{store_name(s): root / f"store-{store_name(s)}" for s in sparsities}}
    missing = {name for name, path in paths.items() if not (path / "manifest.json").is_file()}
    if not missing:
        return paths
    (model, tokenizer), checkpoint = random_checkpoint(shape, num_layers), root / "hf-pruned"
    for sparsity in sparsities:  # ascending: pruning pruned weights further = pruning the originals
        prune_layers(model, sparsity, device)
        names = (["dense"] if sparsity == BASE_SPARSITY else []) + [store_name(sparsity)]
        if missing.isdisjoint(names):
            continue
        shutil.rmtree(checkpoint, ignore_errors=True)  # one checkpoint on disk at a time
        with staged_directory(checkpoint) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        for name in missing.intersection(names):
            # Already pruned, so sparsity 0: convert's CPU sort (~30 s per 8192x28672 weight) is skipped,
            # every weight is kept, and "endor" stores each Linear as a bitmap where "dense" stores it dense.
            config = ConvertConfig(0.0, "magnitude", "dense" if name == "dense" else "endor", dtype="float16", force=True)
            convert(str(checkpoint), paths[name], config, progress)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return paths


def prompt_ids(batch: int, prompt_len: int, vocab_size: int) -> list[list[int]]:
    """[batch][prompt_len] random token ids (fixed seed, no specials, so no padding)."""
    generator = torch.Generator().manual_seed(SEED + batch)
    return torch.randint(3, vocab_size, (batch, prompt_len), generator=generator).tolist()


def settle(engine: Engine) -> None:
    """Wait for the prefetches in flight, then the device, so a timing window closes cleanly."""
    engine.source.wait_idle()
    synchronize()


def engine_decode(engine: Engine, ids: list[list[int]], new_tokens: int) -> Run:
    """Greedy generation through the engine, timing the decode steps only.

    The window opens with the first layers of the next step prefetched and closes after the prefetch
    for the step after the last (steady-state cyclic prefetch): one pass over the layers per step."""
    prompts = [" ".join(f"t{token}" for token in row) for row in ids]
    sequences = engine.new_sequences(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    if [seq.prompt_ids for seq in sequences] != ids:
        raise RuntimeError("the store's tokenizer does not map 't<id>' to <id>: delete the --workdir")
    engine.add(sequences)
    engine.step()  # prefill
    settle(engine)
    engine.source.reset_stats()
    started = time.perf_counter()
    while engine.has_work:
        engine.step()
    settle(engine)
    wall, steps = time.perf_counter() - started, new_tokens - 1
    stats = GenerationStats(len(ids), steps, len(ids) * steps, wall, 0.0, engine.source.reset_stats()).to_dict()
    return stats["s_per_pass"], [seq.output_ids for seq in sequences], stats


def bench(label: str, decode: Callable[[list[list[int]]], Run], streamed_nbytes: int, args: argparse.Namespace,
          h2d_gbps: float | None, **extra: Any) -> Rows:
    """One system at every batch size: median of the timed runs after the warm-up, and its tokens."""
    rows, tokens = [], {}
    for batch in args.batches:
        runs = [decode(prompt_ids(batch, args.prompt_len, args.vocab)) for _ in range(WARMUP + args.repeats)][WARMUP:]
        s_per_token = statistics.median(run[0] for run in runs)
        median_run = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
        ideal = streamed_nbytes / (h2d_gbps * 1e9) if h2d_gbps else None
        tokens[batch] = runs[0][1]
        rows.append({"system": label, "batch": batch, "s_per_token": s_per_token, "tokens_per_s": batch / s_per_token,
                     "s_per_layer": s_per_token / args.layers, "streamed_bytes_per_token": streamed_nbytes,
                     "achieved_GBps": streamed_nbytes / s_per_token / 1e9, "ideal_s_per_token": ideal,
                     "vs_ideal": s_per_token / ideal if ideal else None, **extra, "engine_stats": median_run[2]})
    return rows, tokens


def bench_accelerate(store: Store, args: argparse.Namespace, device: torch.device, h2d_gbps: float | None) -> Rows:
    """(a): the dense store's weights in a transformers model, decoder layers offloaded by Accelerate."""
    from accelerate import dispatch_model

    model, streamed = load_dense_model(store, device="cpu").eval(), 0
    if device.type == "cuda":  # without a GPU nothing offloads: (a) is plain transformers on the CPU
        device_map = {name: str(device) for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
        device_map |= {f"model.layers.{idx}": str(device) if idx < args.gpu_layers else "cpu" for idx in range(args.layers)}
        model = dispatch_model(model, device_map=device_map, main_device=device)
        streamed = sum(layer["dense_nbytes"] for layer in store.summary()["layers"][args.gpu_layers:])
    return bench("accelerate", lambda ids: model_decode(model, ids, args.new_tokens, device), streamed, args, h2d_gbps,
                 format="dense", sparsity=BASE_SPARSITY)


def bench_engine(name: str, store: Store, args: argparse.Namespace, device: torch.device,
                 h2d_gbps: float | None) -> Rows:
    """(b) or (c): this engine streaming one store."""
    summary = store.summary()
    config = EngineConfig(device=str(device), gpu_memory=args.gpu_layers, prefetch_depth=args.prefetch)
    with Engine(store, config, progress=False) as engine:
        streamed = sum(store.layer_entry(idx)["nbytes"] for idx in engine.plan.streamed)
        return bench(f"engine-{name}", lambda ids: engine_decode(engine, ids, args.new_tokens), streamed, args,
                     h2d_gbps, format=summary["compression"]["format"], sparsity=round(summary["layers_sparsity"], 4),
                     size_ratio=summary["layers_ratio"])


def ratios(rows: list[dict[str, Any]], sparsities: list[float], batches: list[int]) -> list[dict[str, Any]]:
    """(c) against (a), (b) and the ideal, per batch and sparsity; targets are checked at 50% on CUDA."""
    by_key = {(row["system"], row["batch"]): row for row in rows}
    out = []
    for batch, sparsity in ((b, s) for b in batches for s in sparsities):
        endor = by_key[(f"engine-{store_name(sparsity)}", batch)]
        entry = {"batch": batch, "sparsity": sparsity, "vs_ideal": endor["vs_ideal"],
                 "speedup_vs_accelerate": by_key[("accelerate", batch)]["s_per_token"] / endor["s_per_token"],
                 "speedup_vs_dense_engine": by_key[("engine-dense", batch)]["s_per_token"] / endor["s_per_token"]}
        if CUDA and sparsity == BASE_SPARSITY:
            entry["meets_targets"] = {
                "speedup_vs_accelerate": entry["speedup_vs_accelerate"] >= TARGETS["speedup_vs_accelerate"],
                "speedup_vs_dense_engine": entry["speedup_vs_dense_engine"] >= TARGETS["speedup_vs_dense_engine"],
                "vs_ideal": entry["vs_ideal"] is not None and entry["vs_ideal"] <= TARGETS["vs_ideal"],
            }
        out.append(entry)
    return out


def print_table(rows: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> None:
    header = (f"{'system':>16} {'batch':>5} {'s/token':>9} {'tok/s':>8} {'ms/layer':>9} {'MB/token':>9} "
              f"{'GB/s':>6} {'ideal s':>9} {'vs ideal':>8}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        ideal = f"{row['ideal_s_per_token']:>9.4f} {row['vs_ideal']:>8.2f}" if row["ideal_s_per_token"] else f"{'n/a':>18}"
        print(f"{row['system']:>16} {row['batch']:>5} {row['s_per_token']:>9.4f} {row['tokens_per_s']:>8.1f} "
              f"{row['s_per_layer'] * 1e3:>9.2f} {row['streamed_bytes_per_token'] / 1e6:>9.1f} "
              f"{row['achieved_GBps']:>6.1f} {ideal}")
    for entry in ratio_rows:
        vs_ideal = f"{entry['vs_ideal']:.2f}x" if entry["vs_ideal"] else "n/a"
        print(f"batch {entry['batch']:>3}, Endor {entry['sparsity']:.0%}: speedup {entry['speedup_vs_accelerate']:.2f}x "
              f"vs accelerate, {entry['speedup_vs_dense_engine']:.2f}x vs engine-dense; time {vs_ideal} the ideal"
              + (f"; targets met: {entry['meets_targets']}" if "meets_targets" in entry else ""))


def save_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Seconds per token per system and batch, the ideal marked; skipped without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for batch in sorted({row["batch"] for row in rows}):
        chosen = [row for row in rows if row["batch"] == batch]
        ax.plot([row["system"] for row in chosen], [row["s_per_token"] for row in chosen], "o-", label=f"batch {batch}")
    if all(row["ideal_s_per_token"] for row in chosen):  # bytes / bandwidth: the same for every batch size
        ax.plot([row["system"] for row in chosen], [row["ideal_s_per_token"] for row in chosen], "k_--",
                label="ideal: streamed bytes / pinned H2D")
    ax.set(ylabel="seconds per decode step (per token)", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def save_cpu_plot(result: dict[str, Any], path: Path) -> None:
    """Seconds per decode step per arm (median, min-max bars), the disk arms' ideal marked."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [row["arm"] for row in rows]
    medians = [row["s_per_step_median"] for row in rows]
    errors = [[m - row["s_per_step_min"] for m, row in zip(medians, rows)],
              [row["s_per_step_max"] - m for m, row in zip(medians, rows)]]
    ax.bar(names, medians, yerr=errors, capsize=4, color=["#999" if "accelerate" in n else "#4c72b0" if "dense" in n
                                                          else "#dd8452" for n in names])
    for index, row in enumerate(rows):
        if row["ideal_s_per_step"]:
            ax.plot([index - 0.4, index + 0.4], [row["ideal_s_per_step"]] * 2, "k--")
    settings = result["settings"]["model"]
    ax.set(ylabel="seconds per decode step (batch 1)", title=f"{settings['num_hidden_layers']} layers of Llama-7B shape, "
           f"bf16, 50% pruned; CPU (dashed: bytes / the dense arm's read bandwidth)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/offload_bench-<device>.json)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "endor-offload-bench",
                        help="where the stores are built and reused")
    parser.add_argument("--mode", choices=["cuda", "cpu"], default="cuda" if CUDA else "cpu")
    parser.add_argument("--arms", nargs="+", default=["accelerate-disk", "dense-disk", "endor-disk", "dense-host", "endor-host"],
                        help="CPU mode: which arms, in the order each round runs them")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers resident on the GPU; the rest stream")
    parser.add_argument("--prefetch", type=int, default=2, help="engine prefetch depth (layers)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7], help="Endor stores (0.5 always)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens per sequence; the first (prefill) is not timed (default 8 on CUDA, 5 on CPU)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (rounds on CPU) after one warm-up "
                        "(default 3 on CUDA, 5 on CPU)")
    args = parser.parse_args()
    cpu = args.mode == "cpu"
    args.new_tokens = args.new_tokens or (5 if cpu else 8)
    args.repeats = args.repeats or (5 if cpu else 3)
    if args.new_tokens < 2 or args.repeats < 1 or not 0 <= args.gpu_layers <= args.layers:
        parser.error("need --new-tokens >= 2, --repeats >= 1 and 0 <= --gpu-layers <= --layers")
    sparsities = sorted({BASE_SPARSITY, *args.sparsities})
    if cpu:
        from offload_cpu import print_cpu, run_cpu

        out_path = args.out or Path(__file__).parent / "results" / "offload_bench-cpu.json"
        result = run_cpu(args, out_path, machine_info())
        print_cpu(result)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out_path}")
        save_cpu_plot(result, out_path.with_suffix(".png"))
        return
    if not CUDA:
        parser.error("--mode cuda needs a CUDA device")

    mode, shape = "cuda", GPU_SHAPE
    device = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    device_name = torch.cuda.get_device_name() if CUDA else "cpu"
    out_path = args.out or (Path(__file__).parent / "results" /
                            f"offload_bench-{re.sub(r'[^a-z0-9]+', '-', device_name.lower()).strip('-')}.json")
    args.vocab = shape["vocab_size"]
    started = time.perf_counter()
    root = args.workdir / f"llama-h{shape['hidden_size']}-i{shape['intermediate_size']}-v{args.vocab}-{args.layers}L"
    paths = prepare(root, shape, args.layers, sparsities, device, progress=CUDA)
    setup_s = time.perf_counter() - started
    h2d_gbps = pinned_h2d_gbps(reps=20)

    rows, accelerate_tokens = bench_accelerate(Store(str(paths["dense"])), args, device, h2d_gbps)
    tokens = {"accelerate": accelerate_tokens}
    for name, path in paths.items():
        gc.collect()  # the previous system's buffers
        if CUDA:
            torch.cuda.empty_cache()
        engine_rows, tokens[f"engine-{name}"] = bench_engine(name, Store(str(path)), args, device, h2d_gbps)
        rows += engine_rows
    base = f"engine-{store_name(BASE_SPARSITY)}"
    agree = {str(batch): {"accelerate_vs_engine_dense": tokens["accelerate"][batch] == tokens["engine-dense"][batch],
                          f"engine_dense_vs_{base}": tokens["engine-dense"][batch] == tokens[base][batch]}
             for batch in args.batches}
    tokens_agree = all(all(pair.values()) for pair in agree.values())
    ratio_rows = ratios(rows, sparsities, args.batches)

    print(f"mode: {mode}   device: {device_name}   layers: {args.layers} ({args.gpu_layers} resident)   pinned H2D: "
          + (f"{h2d_gbps:.1f} GB/s" if h2d_gbps is not None else "n/a"))
    print_table(rows, ratio_rows)
    print(f"greedy tokens of accelerate, engine-dense and {base} agree: {tokens_agree}")

    result = {
        "benchmark": "offload_bench", "mode": mode, "machine": machine_info(),
        "settings": {**{key: value for key, value in vars(args).items() if key not in ("out", "workdir", "vocab")},
                     "model": {**shape, "num_hidden_layers": args.layers, "dtype": "float16"}, "sparsities": sparsities,
                     "warmup": WARMUP, "seed": SEED, "statistic": "median", "GB": 1e9,
                     "timing": "decode steps only (prefill excluded); s_per_token = s per step of the whole batch",
                     "pruning": "magnitude per row (prune_weight on the compute device), nested 50 -> 60 -> 70%; "
                                "stores converted from the pruned checkpoints with sparsity 0", "workdir": str(root)},
        "accelerate": {"api": "accelerate.dispatch_model(model, device_map) with decoder layers on 'cpu' "
                              "(the hooks from_pretrained(device_map=...) installs)",
                       "offloaded": CUDA, "note": None if CUDA else "no GPU: plain transformers on the CPU"},
        "pinned_h2d_GBps": h2d_gbps, "pinned_h2d_nbytes": H2D_NBYTES if CUDA else None, "setup_s": setup_s,
        "rows": rows, "ratios": ratio_rows, "targets": {**TARGETS, "at": "50% sparsity, fp16, H100"},
        "tokens_agree": tokens_agree, "tokens_agree_detail": agree,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")
    save_plot(rows, out_path.with_suffix(".png"), f"{args.layers} layers of hidden {shape['hidden_size']}, "
              f"{args.gpu_layers} resident, {device_name} ({mode})")


if __name__ == "__main__":
    main()
