"""MoE streaming on this machine: whole layers vs picked experts vs the expert cache and prefetch.

The model: a random Mixtral with Mixtral-8x7B-shaped layers (hidden 4096, intermediate 14336, 32
heads, 8 KV heads, 8 experts, top-2; bf16 checkpoint, normal(0, 0.02) weights as transformers
initialises them, norms 1), a few layers only (--layers), a small word-level vocabulary ("t<id>" ->
<id>), converted with `endor convert --method magnitude --sparsity 0 --values int8` (or int4): each
expert its own file, 176M weights (~180 MB at INT8). The store's dtype is float32 (the config names
none); the engine computes in bfloat16 (`--compute-dtype`), so a decoded expert takes 352 MB. On
the CPU the engine keeps INT8/INT4 experts as their blocks and multiplies each picked expert's tokens
straight from them (`EngineConfig.cpu_matvec`, on by default; `engine/experts.py`): an expert in the
cache then holds its ~180 MB of blocks, and the cache is sized in experts (--cache-experts) at
those bytes.

Arms, each the engine on the CPU with every layer's own unit (attention, norms, router) and every
expert read from the disk (nothing resident, no host tier, buffered reads that drop their pages):

  whole           the naive offload: every pass fetches all experts of every MoE layer (the engine's
                  `ExpertStreamer.whole_layers`; no cache), the next layer's experts read and decoded
                  while this one computes (as the layer source overlaps dense layers); the experts
                  module still computes only the picked ones
  experts         only the experts the batch's tokens picked (their union), no cache, no prefetch
  cached          picked experts, an LRU expert cache of --cache-experts experts, no prefetch
  cached+prefetch the same cache, and the next layer's router on this layer's hidden state guessing
                  its experts, read ahead (issue 23's arm (c))
  cached+prefetch-decoded  the same, but every fetched expert decoded to bf16 and stacked for
                  transformers' experts module (grouped_mm), as before experts kept their blocks
                  (the dense Linears still multiply from theirs); its cache the same number of
                  experts at their bf16 bytes
  accelerate      Hugging Face Accelerate's disk offload of the bf16 checkpoint (transformers'
                  from_pretrained, every decoder layer on "disk"; the experts transformers fuses on
                  loading go to an offload folder), each layer's pages evicted after it runs: every
                  pass reads every layer's weights, at 2 bytes a weight. Its tokens are compared
                  with the engine's (bf16 against the INT8 store's values: equality not required)

Every run is a fresh engine with a cold expert cache, its files evicted from the page cache first
(posix_fadvise DONTNEED, checked with fincore): a prefill of --prompt-len tokens, then --new-tokens
greedy tokens; the figures are the decode passes' (prefill excluded). Rounds interleave the arms and
batch sizes (A B C D, A B C D, ...); each figure is the median over rounds. Seconds per token is the
seconds per pass over the batch size; bytes per token counts every byte read from the store (layer
units and experts, misses and prefetches; for Accelerate every layer's weights, what it maps), and
disk_read_bytes_per_pass what the process really read from the disk over the prefill and decode
passes (/proc/self/io: Accelerate on the CPU computes from memory-mapped weights, so only the pages
of the experts the router picks are read, not all it maps). The load average is recorded with every run. With random
weights the router's picks are close to uniform and independent from token to token, so the cache
hits about its share of the experts (a real model's routing repeats more: arXiv 2312.17238); the
prefetch's guesses work because the residual stream changes little between layers, which holds for
random weights too. All engine arms that multiply from the blocks must produce the same tokens (the
decoded arm rounds each weight to bf16 first, so its tokens may differ, as Accelerate's).

    nice -n 5 .venv/bin/python benchmarks/moe_bench.py --layers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from offload_cpu import accelerate_arm, cached_bytes, evict_all  # noqa: E402 - this folder
from offload_models import model_decode  # noqa: E402

from endor_ray.engine.engine import Engine, EngineConfig, GenerationStats  # noqa: E402
from endor_ray.engine.sampling import SamplingParams  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             num_local_experts=8, num_experts_per_tok=2, vocab_size=1024)
SEED = 0
ARMS = {  # name -> (whole_layers, cache holds experts, prefetch, experts multiplied from their blocks)
    "whole": (True, False, True, True),
    "experts": (False, False, False, True),
    "cached": (False, True, False, True),
    "cached+prefetch": (False, True, True, True),
    "cached+prefetch-decoded": (False, True, True, False),
}
RESULTS = Path(__file__).parent / "results"
COMPUTE_DTYPE = "bfloat16"  # the store is float32 (scales; the checkpoint's config names no dtype): experts cast
ACCELERATE = "accelerate"  # Accelerate's disk offload of the bf16 checkpoint (the baseline users have)
ALL_ARMS = [*ARMS, ACCELERATE]


def write_checkpoint(directory: Path, num_layers: int, shape: dict[str, int]) -> None:
    """A Mixtral checkpoint with the names real ones have, one safetensors shard per layer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MixtralConfig, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    config = MixtralConfig(**shape, num_hidden_layers=num_layers, max_position_embeddings=4096,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(SEED)
    hidden, inter, heads, kv_heads = (shape[key] for key in ("hidden_size", "intermediate_size",
                                                             "num_attention_heads", "num_key_value_heads"))
    head_dim = hidden // heads

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    weight_map = {}
    shards = {"model-dense.safetensors": {"model.embed_tokens.weight": normal(SHAPE["vocab_size"], hidden),
                                          "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                                          "lm_head.weight": normal(SHAPE["vocab_size"], hidden)}}
    for layer_idx in range(num_layers):
        prefix = f"model.layers.{layer_idx}."
        tensors = {prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   prefix + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
                   prefix + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
                   prefix + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
                   prefix + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
                   prefix + "block_sparse_moe.gate.weight": normal(SHAPE["num_local_experts"], hidden)}
        for expert_idx in range(SHAPE["num_local_experts"]):
            expert = f"{prefix}block_sparse_moe.experts.{expert_idx}."
            tensors |= {expert + "w1.weight": normal(inter, hidden), expert + "w3.weight": normal(inter, hidden),
                        expert + "w2.weight": normal(hidden, inter)}
        shards[f"model-layer-{layer_idx:03d}.safetensors"] = tensors
    for name, tensors in shards.items():
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        tensors.clear()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{token}": token for token in range(3, SHAPE["vocab_size"])}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def prepare(workdir: Path, num_layers: int, values: str, shape: dict[str, int], keep_checkpoint: bool
            ) -> tuple[Path, Path | None]:
    """(store, checkpoint): the store is made once per layer count and values, then reused; the
    checkpoint (the same weights again: a fixed seed) is kept only for the Accelerate arm."""
    import shutil

    from endor_ray.compress.convert import ConvertConfig, convert

    size = "" if shape == SHAPE else f"-h{shape['hidden_size']}-i{shape['intermediate_size']}"
    store = workdir / f"store-{num_layers}l-{values}{size}"
    checkpoint = workdir / f"hf-{num_layers}l{size}"
    if not (store / "manifest.json").is_file() or keep_checkpoint:
        if not (checkpoint / "model.safetensors.index.json").is_file():
            started = time.perf_counter()
            write_checkpoint(checkpoint, num_layers, shape)
            print(f"checkpoint written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not (store / "manifest.json").is_file():
        started = time.perf_counter()
        convert(str(checkpoint), store, ConvertConfig(method="magnitude", sparsity=0.0, values=values, force=True),
                progress=False)
        print(f"converted in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not keep_checkpoint:
        shutil.rmtree(checkpoint, ignore_errors=True)
        return store, None
    return store, checkpoint


def store_files(store: Path) -> list[str]:
    return sorted(str(path) for path in store.rglob("*.safetensors"))


def expert_dense_nbytes(engine: Engine) -> int:
    """One expert's dense weights in the compute dtype."""
    store = engine.model_runner.store
    entry = store.manifest["layers"][0]["experts"][0]
    return sum(torch.Size(tensor["shape"]).numel() for tensor in entry["tensors"]) * engine.model_runner.dtype.itemsize


def run(store: Path, arm: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh engine, cold: prefill, then the timed decode passes."""
    whole_layers, cached, prefetch, blocks = ARMS[arm]
    files = store_files(store)
    evict_all(files)
    cold_bytes = cached_bytes(files)
    expert_nbytes = args.expert_file_nbytes if blocks else args.expert_dense_nbytes  # what a cached expert holds
    cache = f"{args.cache_experts * expert_nbytes}B" if cached else "0"
    config = EngineConfig(device="cpu", gpu_memory="0", host_memory="0", expert_cache_memory=cache,
                          expert_prefetch=prefetch, disk_io="buffered", compute_dtype=COMPUTE_DTYPE)
    load_before = os.getloadavg()
    with Engine(str(store), config, progress=False) as engine:
        engine.model_runner.experts.whole_layers = whole_layers
        if not blocks:  # the expert path before they kept their blocks (dense Linears still do): decoded, stacked
            streamer = engine.model_runner.experts
            for reader in (streamer.reader, streamer.prefetcher and streamer.prefetcher.reader):
                if reader:
                    reader.keep_blocks = False
            engine.model_runner.model.set_experts_implementation("grouped_mm")  # transformers' default
        ids = prompt_ids(batch, args)
        prompts = [" ".join(f"t{token}" for token in row) for row in ids]
        sequences = engine.new_sequences(prompts, SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
        assert [seq.prompt_ids for seq in sequences] == ids, "the tokenizer must map t<id> to <id>"
        read_before = disk_read_bytes()
        engine.add(sequences)
        engine.step()  # prefill
        engine.source.wait_idle()
        prefill = engine.source.reset_stats()
        started = time.perf_counter()
        while engine.has_work:
            engine.step()
        engine.source.wait_idle()
        wall, passes = time.perf_counter() - started, args.new_tokens - 1
        disk_bytes = disk_read_bytes() - read_before
        source = engine.source.reset_stats()
        stats = GenerationStats(batch, passes, batch * passes, wall, 0.0, source).to_dict()
        tokens = [seq.output_ids for seq in sequences]
    gc.collect()
    experts = stats.get("experts", {})
    read_bytes = source.bytes_to_device + source.expert_bytes
    return {"arm": arm, "batch": batch, "s_per_pass": wall / passes, "s_per_token": wall / passes / batch,
            "bytes_per_token": read_bytes / (passes * batch), "expert_bytes_per_token": experts.get("bytes_per_token"),
            "layer_unit_bytes_per_pass": source.bytes_to_device / passes,
            "hit_rate": experts.get("hit_rate"), "misses_per_token": experts.get("misses_per_token"),
            "prefetched": experts.get("prefetched"), "prefetch_useful": experts.get("prefetch_useful"),
            "prefetch_hit_rate": experts.get("prefetch_hit_rate"),
            "disk_read_bytes_per_pass": disk_bytes / args.new_tokens,  # prefill included, as for Accelerate
            "prefill_expert_misses": prefill.expert_misses, "read_s": source.read_s, "stall_s": source.stall_s,
            "cached_bytes_at_start": cold_bytes, "load_before": load_before, "load_after": os.getloadavg(),
            "tokens": tokens}


def disk_read_bytes() -> int:
    """Bytes this process has caused to be read from the storage layer (/proc/self/io read_bytes):
    page faults on mapped files included, page-cache hits not."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def prompt_ids(batch: int, args: argparse.Namespace) -> list[list[int]]:
    generator = torch.Generator().manual_seed(SEED + batch)
    return torch.randint(3, SHAPE["vocab_size"], (batch, args.prompt_len), generator=generator).tolist()


def run_accelerate(checkpoint: Path, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Accelerate's disk offload (offload_cpu.accelerate_arm: every decoder layer on "disk", its pages
    evicted after it runs, so each pass reads every layer cold), the same prompts, bf16 throughout."""
    import shutil

    offload = args.workdir / "accelerate-offload"
    shutil.rmtree(offload, ignore_errors=True)
    model, _ = accelerate_arm(checkpoint, args.layers, torch.bfloat16, offload, threads=torch.get_num_threads())
    files = [str(path) for path in (*checkpoint.glob("*.safetensors"), *offload.glob("*"))]
    evict_all(files)
    cold_bytes = cached_bytes(files)
    layer_bytes = sum(parameter.numel() * 2 for parameter in model.model.layers.parameters())  # bf16
    load_before = os.getloadavg()
    read_before = disk_read_bytes()
    s_per_pass, tokens, _ = model_decode(model, prompt_ids(batch, args), args.new_tokens, torch.device("cpu"))
    disk_bytes = disk_read_bytes() - read_before
    del model
    gc.collect()
    shutil.rmtree(offload, ignore_errors=True)
    return {"arm": ACCELERATE, "batch": batch, "s_per_pass": s_per_pass, "s_per_token": s_per_pass / batch,
            "bytes_per_token": layer_bytes / batch, "disk_read_bytes_per_pass": disk_bytes / args.new_tokens,
            "expert_bytes_per_token": None, "layer_unit_bytes_per_pass": None,
            "hit_rate": None, "misses_per_token": None, "prefetched": None, "prefetch_useful": None,
            "prefetch_hit_rate": None, "cached_bytes_at_start": cold_bytes, "load_before": load_before,
            "load_after": os.getloadavg(), "tokens": tokens}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for arm in ALL_ARMS:
        for batch in sorted({run["batch"] for run in runs}):
            mine = [run for run in runs if run["arm"] == arm and run["batch"] == batch]
            if not mine:
                continue
            row: dict[str, Any] = {"arm": arm, "batch": batch, "rounds": len(mine)}
            for key in ("s_per_token", "s_per_pass", "bytes_per_token", "disk_read_bytes_per_pass",
                        "expert_bytes_per_token", "hit_rate",
                        "misses_per_token", "prefetch_hit_rate"):
                values = [run[key] for run in mine if run.get(key) is not None]
                row[key] = statistics.median(values) if values else None
                if key == "s_per_token" and values:
                    row["s_per_token_min_max"] = [min(values), max(values)]
            row["load_1min"] = [run["load_before"][0] for run in mine]
            rows.append(row)
    for row in rows:
        whole = next((r for r in rows if r["arm"] == "whole" and r["batch"] == row["batch"]), None)
        row["speedup_vs_whole"] = whole["s_per_token"] / row["s_per_token"] if whole else None
        accelerate = next((r for r in rows if r["arm"] == ACCELERATE and r["batch"] == row["batch"]), None)
        row["speedup_vs_accelerate"] = accelerate["s_per_token"] / row["s_per_token"] if accelerate else None
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    """Seconds and bytes per token per arm and batch; skipped without matplotlib (--plot-only redraws)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib; then --plot-only)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    batches = sorted({row["batch"] for row in rows})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    arms = [arm for arm in ALL_ARMS if any(row["arm"] == arm for row in rows)]
    width = 0.8 / len(arms)
    for offset, arm in enumerate(arms):
        mine = {row["batch"]: row for row in rows if row["arm"] == arm}
        xs = [position + offset * width for position in range(len(batches)) if batches[position] in mine]
        axes[0].bar(xs, [mine[b]["s_per_token"] for b in batches if b in mine], width, label=arm)
        axes[1].bar(xs, [mine[b]["bytes_per_token"] / 1e9 for b in batches if b in mine], width, label=arm)
    for axis, label in zip(axes, ("seconds per token (median)", "GB read per token")):
        axis.set_xticks([position + width * (len(arms) - 1) / 2 for position in range(len(batches))])
        axis.set_xticklabels([f"batch {b}" for b in batches])
        axis.set_ylabel(label)
    axes[0].legend()
    shaped = ("Mixtral-8x7B-shaped" if result["shape"] == SHAPE
              else f"hidden {result['shape']['hidden_size']}, intermediate {result['shape']['intermediate_size']}")
    figure.suptitle(f"{result['layers']} {shaped} layers, {result['values']}, cold disk, CPU "
                    f"(load {min(result['load_1min']):.1f}-{max(result['load_1min']):.1f})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def save(runs: list[dict[str, Any]], args: argparse.Namespace, manifest: dict[str, Any],
         shape: dict[str, int]) -> list[dict[str, Any]]:
    """The summary so far and every run, written to --output (after each round: a cut-short run keeps them)."""
    accelerate_agrees, decoded_agrees = {}, {}
    for batch in args.batches:  # every engine arm multiplying from the blocks generates the same tokens
        mine = [run["tokens"] for run in runs if run["batch"] == batch and run["arm"] in ARMS and ARMS[run["arm"]][3]]
        if any(tokens != mine[0] for tokens in mine):
            raise RuntimeError(f"the arms disagree on the tokens at batch {batch}")
        for agrees, other in ((accelerate_agrees, ACCELERATE), (decoded_agrees, "cached+prefetch-decoded")):
            theirs = [run["tokens"] for run in runs if run["batch"] == batch and run["arm"] == other]
            if mine and theirs:  # bf16-rounded weights against the INT8 store's values: not expected to be equal
                agrees[str(batch)] = theirs[0] == mine[0]
    summary = summarize(runs)
    expert_nbytes = manifest["layers"][0]["experts"][0]["nbytes"]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__},
        "layers": args.layers, "values": args.values, "compute_dtype": COMPUTE_DTYPE, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "shape": shape,
        "expert_file_nbytes": expert_nbytes, "expert_dense_nbytes": args.expert_dense_nbytes,
        "layer_unit_nbytes": manifest["layers"][0]["nbytes"],
        "cache_experts": args.cache_experts, "cache_bytes": args.cache_experts * expert_nbytes,
        "cache_bytes_decoded_arm": args.cache_experts * args.expert_dense_nbytes,
        "decoded_arm_tokens_equal": decoded_agrees,
        "load_1min": [run["load_before"][0] for run in runs],
        "same_tokens": True,
        "summary": summary,
        "runs": [{key: value for key, value in run.items() if key != "tokens"} for run in runs],
        "accelerate": "Accelerate's disk offload (transformers from_pretrained with every decoder layer on 'disk', "
                      "offload_folder for the experts transformers fuses on loading), bf16 checkpoint weights, each "
                      "layer's checkpoint ranges and offloaded files evicted after it runs; its tokens equal the "
                      f"engine's INT8 store's (by batch): {accelerate_agrees}",
        "notes": "random weights: router picks near uniform, so the cache's hit rate is about its share of the "
                 "experts; a real model's routing repeats more (arXiv 2312.17238). 'whole' = every expert of every "
                 "MoE layer fetched each pass with the next layer read ahead (ExpertStreamer.whole_layers), not a "
                 "store without the expert split (endor convert always splits experts).",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    plot(result, args.output.with_suffix(".png"))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/scratch/moe_bench"))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (each ~1.45G weights)")
    parser.add_argument("--values", choices=("int8", "int4"), default="int8")
    parser.add_argument("--hidden-size", type=int, default=SHAPE["hidden_size"], help="smaller for a smoke run")
    parser.add_argument("--intermediate-size", type=int, default=SHAPE["intermediate_size"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--arms", nargs="+", choices=ALL_ARMS, default=ALL_ARMS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=6, help="tokens per run (the first is the prefill's)")
    parser.add_argument("--cache-experts", type=int, default=None,
                        help="experts the cache holds (default: half the model's)")
    parser.add_argument("--output", type=Path, default=RESULTS / "moe_bench-cpu.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from --output's JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.output.read_text()), args.output.with_suffix(".png"))
        return
    torch.manual_seed(SEED)
    shape = {**SHAPE, "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size}
    store, checkpoint = prepare(args.workdir, args.layers, args.values, shape, keep_checkpoint=ACCELERATE in args.arms)
    from endor_ray.store.store import Store

    manifest = Store(str(store)).manifest
    # the experts as the compute dtype holds them (bf16: as on a GPU, and half the memory of the store's fp32)
    args.expert_dense_nbytes = sum(torch.Size(t["shape"]).numel() for t in manifest["layers"][0]["experts"][0]["tensors"]
                                   ) * getattr(torch, COMPUTE_DTYPE).itemsize
    args.expert_file_nbytes = manifest["layers"][0]["experts"][0]["nbytes"]  # its blocks (the cache counts a bit less)
    if args.cache_experts is None:
        args.cache_experts = args.layers * SHAPE["num_local_experts"] // 2
    runs: list[dict[str, Any]] = []
    for round_idx in range(args.rounds):
        for batch in args.batches:
            for arm in args.arms:
                result = run_accelerate(checkpoint, batch, args) if arm == ACCELERATE else run(store, arm, batch, args)
                runs.append({"round": round_idx, **result})
                print(f"round {round_idx} batch {batch} {arm:16s} {result['s_per_token']:7.3f} s/token "
                      f"{result['bytes_per_token'] / 1e6:8.1f} MB/token, disk {result['disk_read_bytes_per_pass'] / 1e6:.0f}"
                      f" MB/pass hit {result['hit_rate']} "
                      f"prefetch {result['prefetch_useful']}/{result['prefetched']} load {result['load_before'][0]:.1f}",
                      file=sys.stderr, flush=True)
        save(runs, args, manifest, shape)
    summary = save(runs, args, manifest, shape)
    for row in summary:
        print(json.dumps({key: row[key] for key in ("arm", "batch", "s_per_token", "bytes_per_token", "hit_rate",
                                                     "prefetch_hit_rate", "speedup_vs_whole",
                                                     "speedup_vs_accelerate")}))


if __name__ == "__main__":
    main()
