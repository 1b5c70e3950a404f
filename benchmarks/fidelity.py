"""Fidelity per byte: bytes per weight against perplexity and question accuracy, SmolLM2-135M.

For every setting (dense; magnitude, Wanda and SparseGPT at 30/50/70% with bf16/INT8/INT4 values;
GPTQ-style INT8/INT4 at 0%; mixed-precision budgets) this converts the embedded model with
`endor convert`'s own code (bf16, self-calibration with the defaults), then measures on the
store's decoded weights in transformers (the engine is token-identical to it, tests say so):

- bytes per weight: the layer files' bytes over the layers' weights (what the link moves);
- perplexity on `benchmarks/data/heldout.txt`, prose written for this project (not the
  calibration text, which the model writes itself), in windows of 128 tokens;
  with each window's mean next-token loss kept (`sequence_nlls`) for a paired bootstrap over windows
  (`paired_bootstrap`): whether two rows' perplexities differ by more than the text's noise;
- accuracy on `benchmarks/data/questions.json`, 40 questions written for this project (20
  capitals, 20 one-digit sums), 3-shot, greedy, right when the continuation starts with the answer;
- the README demo's answer to "What is the capital of France? Answer in one sentence." (chat).

Results go to benchmarks/results/fidelity.json (rewritten after every setting; a rerun skips the
settings already there unless --fresh) and fidelity.png. Run it alone: about 40 minutes on the
2-core development machine.

    .venv/bin/python benchmarks/fidelity.py [--only NAME ...] [--fresh] [--threads N] [--merge FILE ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from endor_ray.engine.reference import load_dense_model
from endor_ray.store import Store
from endor_ray.compress.calibration import perplexity
from endor_ray.compress.convert import ConvertConfig, needs_calibration, convert
from endor_ray.compress.default_model import default_model_dir

HERE = Path(__file__).parent
RESULTS = HERE / "results"
DEMO_QUESTION = "What is the capital of France? Answer in one sentence."


def settings() -> dict[str, dict]:
    """name -> ConvertConfig fields."""
    table = {"dense": dict(sparsity=0.0, method="magnitude")}
    for values in ("int8", "int4"):
        table[f"rtn-0-{values}"] = dict(sparsity=0.0, method="magnitude", values=values)
        table[f"gptq-0-{values}"] = dict(sparsity=0.0, method="sparsegpt", values=values)
    for method in ("magnitude", "wanda", "sparsegpt"):
        for sparsity in (0.3, 0.5, 0.7):
            for values in ("raw", "int8", "int4"):
                table[f"{method}-{int(sparsity * 100)}-{values}"] = dict(sparsity=sparsity, method=method, values=values)
    for budget in (0.45, 0.55, 0.65):
        table[f"mixed-{budget}-wanda"] = dict(method="wanda", bytes_per_weight=budget)
    for budget in (0.55, 0.65):
        table[f"mixed-{budget}-sparsegpt"] = dict(method="sparsegpt", bytes_per_weight=budget)
    return table


def heldout_ids(tokenizer, seq_len: int = 128) -> torch.Tensor:
    ids = tokenizer((HERE / "data" / "heldout.txt").read_text(), return_tensors="pt").input_ids[0]
    count = ids.numel() // seq_len
    return ids[: count * seq_len].view(count, seq_len)


def sequence_nlls(model, input_ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Each sequence's mean next-token cross-entropy (nats) on [samples, seq_len] ids.

    The same batches, logits and loss as `perplexity`; every sequence predicts seq_len - 1 tokens, so
    exp(mean of these) is `perplexity(model, input_ids)` up to float rounding.
    """
    values = []
    with torch.inference_mode():
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.shape[0], -1)  # [batch, seq_len - 1]
            values += (loss.double().sum(dim=1) / loss.shape[1]).tolist()
    return values


def paired_bootstrap(nll_a: list[float], nll_b: list[float], resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Arm A against arm B on the same sequences (their `sequence_nlls`): the perplexity difference A - B,
    the log-perplexity difference and the ratio, each with a percentile interval from resampling whole
    sequences with replacement (both arms draw the same sequences), and an exact sign-flip p-value.

    Significant when the interval of the difference excludes 0. With few sequences the percentile
    interval is narrower than the truth (it cannot see variation the sample lacks), so read it beside p.
    """
    import numpy as np

    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"need two equal lists of at least 2 per-sequence values, got {a.shape} and {b.shape}")
    picks = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))  # [resamples, n]
    mean_a, mean_b = a[picks].mean(axis=1), b[picks].mean(axis=1)
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    log_diff = np.percentile(mean_a - mean_b, tails)
    ppl_diff = np.percentile(np.exp(mean_a) - np.exp(mean_b), tails)
    return {
        "sequences": int(a.size), "resamples": resamples, "seed": seed, "level": level,
        "perplexity_a": math.exp(a.mean()), "perplexity_b": math.exp(b.mean()),
        "perplexity_diff": math.exp(a.mean()) - math.exp(b.mean()),
        "perplexity_diff_interval": [float(ppl_diff[0]), float(ppl_diff[1])],
        "log_perplexity_diff": float(a.mean() - b.mean()),
        "log_perplexity_diff_interval": [float(log_diff[0]), float(log_diff[1])],
        "perplexity_ratio_interval": [math.exp(log_diff[0]), math.exp(log_diff[1])],
        "sign_flip_p": sign_flip_p(a - b),
        "significant": bool(ppl_diff[0] > 0 or ppl_diff[1] < 0),
    }


def sign_flip_p(differences) -> float:
    """Two-sided p of the paired differences' mean under "A and B are exchangeable": the share of the
    2^n sign patterns whose |mean| reaches the observed one (exact; n <= 20)."""
    import numpy as np

    d = np.asarray(differences, dtype=np.float64)
    if d.size > 20:
        raise ValueError(f"{d.size} differences: 2^n sign patterns is too many to enumerate")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))  # [2^n, n]
    observed = abs(d.mean())
    return float(np.mean(np.abs(signs @ d) / d.size >= observed * (1 - 1e-12)))


def question_accuracy(model, tokenizer) -> dict[str, float]:
    data = json.loads((HERE / "data" / "questions.json").read_text())
    prompts = []
    for item in data["items"]:
        shots = "".join(f"Q: {shot['question']}\nA: {shot['answer']}\n\n" for shot in data["shots"][item["kind"]])
        prompts.append(f"{shots}Q: {item['question']}\nA:")
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(output[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    right = {"capital": [], "sum": []}
    for item, text in zip(data["items"], texts):
        right[item["kind"]].append(text.strip().lower().startswith(item["answer"].lower()))
    scores = {kind: sum(marks) / len(marks) for kind, marks in right.items()}
    scores["all"] = sum(sum(marks) for marks in right.values()) / len(data["items"])
    return scores


def demo_answer(model, tokenizer) -> str:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": DEMO_QUESTION}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        output = model.generate(**chat, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, chat["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def evaluate(name: str, fields: dict, work: Path) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    config = ConvertConfig(dtype="bfloat16", force=True, **fields)
    store_dir = convert("smollm2-135m", work / name, config, progress=False)
    convert_s = time.perf_counter() - started
    store = Store(str(store_dir))
    summary = store.summary()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    model = load_dense_model(store, dtype=torch.float32).eval()
    row = {
        "name": name, **fields,
        "budget_bytes_per_weight": fields.get("bytes_per_weight"),  # the mixed budget, if any
        "bytes_per_weight": summary["layers_nbytes"] / (summary["layers_dense_nbytes"] / 2),
        "perplexity": perplexity(model, heldout_ids(tokenizer)),
        "sequence_nll": [round(value, 8) for value in sequence_nlls(model, heldout_ids(tokenizer))],
        "accuracy": question_accuracy(model, tokenizer),
        "demo_answer": demo_answer(model, tokenizer),
        "convert_seconds": round(convert_s, 1),
        "calib_samples": config.calib_samples if needs_calibration(config) else None,
        "settings": settings_count(summary),
    }
    row["demo_correct"] = "paris" in row["demo_answer"].lower()
    shutil.rmtree(store_dir)
    return row


def settings_count(summary: dict) -> dict[str, int]:
    """How many Linear weights the store holds in each setting ("0%/q4_0": 150, ...)."""
    counts: dict[str, int] = {}
    for layer in summary["layers"]:
        for tensor in layer["tensors"]:
            key = f"{tensor['sparsity']:.0%}/{tensor['values']}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"magnitude": "tab:gray", "wanda": "tab:blue", "sparsegpt": "tab:red"}
    markers = {"raw": "o", "int8": "s", "int4": "^"}
    for row in rows:
        method = row.get("method", "magnitude")
        mixed = row.get("budget_bytes_per_weight") is not None
        color = "tab:green" if mixed else ("black" if row["name"] == "dense" else colors[method])
        marker = "*" if mixed else markers[row.get("values", "raw")]
        for axis, value in zip(axes, (row["perplexity"], row["accuracy"]["all"])):
            axis.scatter(row["bytes_per_weight"], value, color=color, marker=marker, s=60)
            axis.annotate(row["name"], (row["bytes_per_weight"], value), fontsize=6, alpha=0.7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("perplexity on held-out text (log)")
    axes[1].set_ylabel("accuracy, 40 questions (3-shot)")
    for axis in axes:
        axis.set_xlabel("bytes per weight moved (decoder layers)")
        axis.axvline(0.65, color="tab:orange", linestyle=":", linewidth=1)
    fig.suptitle("SmolLM2-135M: fidelity per byte (gray magnitude, blue Wanda, red SparseGPT, green mixed; "
                 "o bf16, s INT8, ^ INT4)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="settings to run (default: all)")
    parser.add_argument("--fresh", action="store_true", help="rerun settings already in the results")
    parser.add_argument("--out", type=Path, default=RESULTS / "fidelity.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 when two runs share 2 cores)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="add the rows of these result files")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = settings()
    unknown = set(args.only or []) - set(table)
    if unknown:
        sys.exit(f"unknown settings {sorted(unknown)}; known: {', '.join(table)}")
    document = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {"rows": []}
    for other in args.merge:
        merged = {row["name"] for row in document["rows"]}
        document["rows"] += [row for row in json.loads(other.read_text())["rows"] if row["name"] not in merged]
    done = {row["name"] for row in document["rows"]}
    document["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="endor-fidelity-") as work:
        for name in args.only or table:
            if name in done and not args.fresh:
                continue
            load = os.getloadavg()[0]
            row = evaluate(name, table[name], Path(work))
            row["load_average"] = round(load, 2)
            document["rows"] = [r for r in document["rows"] if r["name"] != name] + [row]
            document["rows"].sort(key=lambda r: list(table).index(r["name"]))
            args.out.write_text(json.dumps(document, indent=1))
            print(f"{name:24} {row['bytes_per_weight']:.3f} B/w  ppl {row['perplexity']:8.2f}  "
                  f"acc {row['accuracy']['all']:.2f}  demo {'ok ' if row['demo_correct'] else 'bad'} "
                  f"{row['demo_answer'][:50]!r}  ({row['convert_seconds']} s)", flush=True)
    document["rows"].sort(key=lambda r: list(table).index(r["name"]))
    args.out.write_text(json.dumps(document, indent=1))
    plot(document["rows"], args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
