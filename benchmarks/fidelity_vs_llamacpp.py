"""Fidelity per byte beside llama.cpp: its quantizers and ours on the same model, text and perplexity code.

llama.cpp is a benchmark tool here, never a dependency of the package. The script

1. downloads the llama-cpp-python sdist (``pip download --no-deps``; llama.cpp is vendored under
   ``vendor/llama.cpp``) into ``--llamacpp-dir`` (default ``~/.cache/endor-ray/llamacpp``) and builds
   ``llama-quantize`` and ``llama-imatrix`` there (skipped when both exist);
2. converts the embedded SmolLM2-135M's cached HF folder to a bf16 GGUF (``convert_hf_to_gguf.py``,
   which needs ``sentencepiece`` in the venv), writes the project's calibration text (the model's own
   samples, `endor_ray.compress.calibration.self_calibration_ids` with ``endor convert``'s defaults
   for SparseGPT: 64 x 128 tokens, seed 0, decoded to text), runs ``llama-imatrix`` on it and
   quantizes with ``llama-quantize`` to every type in `LLAMACPP_TYPES`, with and without ``--imatrix``;
3. de-quantizes every tensor of each GGUF with gguf-py (undoing the converter's q/k row permutation)
   into transformers' model in float32 and scores it with benchmarks/fidelity.py's own code
   (`heldout_ids` and `perplexity`; with --questions also `question_accuracy` and `demo_answer`);
4. runs our conversions (`OURS`) through benchmarks/fidelity.py's `evaluate`, so both sides are
   scored identically.

The held-out text is used for scoring only, never for calibration or any choice. Every GGUF, the
build and the scratch files stay under ``--llamacpp-dir``. Results go to
benchmarks/results/fidelity-vs-llamacpp.json (rewritten after every row; a rerun skips rows already
there unless --fresh) and .png.

    .venv/bin/python benchmarks/fidelity_vs_llamacpp.py [--only NAME ...] [--skip-ours] [--fresh]
        [--redo] [--llamacpp-dir DIR] [--threads N] [--questions] [--out FILE] [--merge FILE ...]
        [--take FILE ...]

Rows scored since the per-window losses were kept (``sequence_nll``) get paired bootstrap intervals
against llama.cpp's in the table (see `NOISE`); `--only` with `--redo` rescores rows, `--take` brings in
rows rescored by another process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fidelity  # noqa: E402  (benchmarks/fidelity.py: the scoring both sides share)

from endor_ray.compress.calibration import perplexity, self_calibration_ids  # noqa: E402
from endor_ray.compress.convert import ConvertConfig  # noqa: E402
from endor_ray.compress.default_model import cache_dir, default_model_dir  # noqa: E402
from endor_ray.errors import ConfigError  # noqa: E402

RESULTS = HERE / "results"
OUT = RESULTS / "fidelity-vs-llamacpp.json"
LLAMACPP_TYPES = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "Q4_K_M", "Q5_K_M",
                  "Q6_K", "Q8_0")
NO_IMATRIX_EFFECT = ("Q8_0",)  # llama.cpp's Q8_0 quantizer takes no importance weights
TOOLS = ("llama-quantize", "llama-imatrix")
CALIB_SAMPLES, CALIB_SEQ_LEN, CALIB_SEED = 64, 128, 0  # endor convert's self-calibration for SparseGPT

# Our rows: the strongest settings the code has (benchmarks/results/fidelity.json), spread over
# 0.45-1.1 bytes per weight, in the order they are run (most informative first).
OURS = {
    # --bytes-per-weight alone at llama.cpp types' bytes: the whole-model budget's defaults (Q4_0,
    # Q2_K, Q3_K_M, IQ4_XS, IQ4_NL, Q5_0, Q4_K_M, Q5_K_M, Q5_1), and two lower budgets
    **{f"ours-budget-{budget}": dict(bytes_per_weight=budget)
       for budget in (0.5625, 0.5293, 0.579, 0.559, 0.566, 0.6875, 0.692, 0.754, 0.75, 0.45, 0.5)},
    "ours-gptq-int4-g32": dict(method="sparsegpt", sparsity=0.0, values="int4", group_size=32),
    "ours-kept-gguf": dict(method="magnitude", values="keep"),  # the embedded Q4_1 GGUF's own blocks
    "ours-mixed-0.65-g32": dict(method="sparsegpt", bytes_per_weight=0.65, group_size=32),
    "ours-gptq-int8-g128": dict(method="sparsegpt", sparsity=0.0, values="int8", group_size=128),
    "ours-gptq-int4-g64": dict(method="sparsegpt", sparsity=0.0, values="int4", group_size=64),
    "ours-mixed-0.55-g32": dict(method="sparsegpt", bytes_per_weight=0.55, group_size=32),
    "ours-mixed-0.75-g32": dict(method="sparsegpt", bytes_per_weight=0.75, group_size=32),
    "ours-mixed-0.45-g32": dict(method="sparsegpt", bytes_per_weight=0.45, group_size=32),
    "ours-mixed-0.85-g32": dict(method="sparsegpt", bytes_per_weight=0.85, group_size=32),
    "ours-gptq-int8-g32": dict(method="sparsegpt", sparsity=0.0, values="int8", group_size=32),
}

# GGUF tensor name (within blk.N) -> transformers' LlamaForCausalLM name (within model.layers.N)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}

BYTES_COUNTED = {
    "llama.cpp": "sum over the decoder Linear weights (blk.*.attn_q/k/v/output, ffn_gate/up/down) of "
                 "n_elements / block_elems * type_size for the tensor type llama-quantize wrote "
                 "(gguf.GGML_QUANT_SIZES), divided by those weights' count; token_embd and norms not counted",
    "ours": "benchmarks/fidelity.py: the decoder layers' files' bytes (Linear weights, their norms and "
            "headers) over the layers' weights (Store.summary layers_nbytes / (layers_dense_nbytes / 2)); "
            "the norms add under 0.001 bytes per weight; token embedding not counted",
}
NOISE = ("each row's sequence_nll: the mean next-token loss (nats) of each of the held-out text's 128-token windows "
         "(fidelity.sequence_nlls; exp of their mean is the row's perplexity); table entries *_minus_theirs: "
         "fidelity.paired_bootstrap, A - B in perplexity with a 95% percentile interval from 10,000 resamples of "
         "whole windows (seed 0, the same windows for both arms) and the exact sign-flip p over the 2^n sign "
         "patterns; significant: the interval excludes 0. The text has only 8 windows: the percentile interval "
         "is then somewhat too narrow and p cannot go below 2/256. Rows without sequence_nll were scored before "
         "it was kept: they have no intervals")


def run(command: list, cwd: Path | None = None, env: dict | None = None) -> None:
    """Run a tool at low priority; on failure show its last output lines."""
    started = time.perf_counter()
    done = subprocess.run(["nice", "-n", "15", *map(str, command)], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    print(f"  {Path(str(command[0])).name} ... {time.perf_counter() - started:.0f} s", flush=True)


def build_llamacpp(root: Path) -> Path:
    """llama.cpp's source folder under `root`, with llama-quantize and llama-imatrix built in build/bin."""
    root.mkdir(parents=True, exist_ok=True)
    if not list(root.glob("llama_cpp_python-*.tar.gz")):
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             "llama-cpp-python", "-d", root])
    sdist = sorted(root.glob("llama_cpp_python-*.tar.gz"))[-1]
    source = root / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not source.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(root, filter="data")
    gitlink = source / ".git"
    if gitlink.is_file():  # a submodule pointer to a .git that is not in the sdist: ninja would regenerate forever
        gitlink.unlink()
    if not all((source / "build" / "bin" / tool).is_file() for tool in TOOLS):
        run(["cmake", "-B", "build", "-G", "Ninja", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"], cwd=source)
        run(["cmake", "--build", "build", "-j2", "--target", *TOOLS], cwd=source)
    return source


def calibration_text(path: Path) -> dict:
    """Write the model's own calibration samples as text (endor convert's recipe); return how they were made."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not path.is_file():
        model = LlamaForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
        with torch.no_grad():  # the store's weights are bf16; calibrate on those, computed in float32
            for parameter in model.parameters():
                parameter.copy_(parameter.to(torch.bfloat16).float())
        ids = self_calibration_ids(model, CALIB_SAMPLES, CALIB_SEQ_LEN, CALIB_SEED)
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
        path.write_text("\n\n".join(tokenizer.batch_decode(ids, skip_special_tokens=True)))
    return {"source": "self-generated (endor_ray.compress.calibration.self_calibration_ids, bf16 weights)",
            "num_samples": CALIB_SAMPLES, "seq_len": CALIB_SEQ_LEN, "seed": CALIB_SEED,
            "joined_by": "two newlines", "chars": len(path.read_text())}


def make(path: Path, command: list, env: dict | None = None) -> None:
    """Run `command`, which writes {out}, into `path` unless it exists (written aside, then renamed: a killed
    run leaves nothing a rerun would take as finished)."""
    if path.is_file():
        return
    partial = path.with_name("partial-" + path.name)  # the same extension: llama-imatrix picks its format by it
    run([str(partial) if part == "{out}" else part for part in command], env=env)
    partial.rename(path)


def prepare_ggufs(source: Path, work: Path, names: list[str], threads: int) -> dict[str, Path]:
    """The GGUF of each name ("BF16", "Q4_0", "Q4_0+imatrix", ...), made once, beside the importance matrix."""
    bin_dir = source / "build" / "bin"
    bf16 = work / "smollm2-135m-bf16.gguf"
    make(bf16, [sys.executable, source / "convert_hf_to_gguf.py", default_model_dir(), "--outtype", "bf16",
                "--outfile", "{out}"], env={**os.environ, "PYTHONPATH": str(source / "gguf-py")})
    imatrix = work / "imatrix.gguf"
    if any(name.endswith("+imatrix") for name in names):
        make(imatrix, [bin_dir / "llama-imatrix", "-m", bf16, "-f", work / "calibration.txt", "-o", "{out}",
                       "--output-format", "gguf", "-c", CALIB_SEQ_LEN, "-t", threads, "--no-ppl"])
    files = {"BF16": bf16}
    for name in names:
        if name == "BF16":
            continue
        kind, _, weighted = name.partition("+")
        files[name] = work / f"smollm2-135m-{name}.gguf"
        make(files[name], [bin_dir / "llama-quantize", *(["--imatrix", imatrix] if weighted else []), bf16, "{out}",
                           kind, threads])
    return files


def unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's q/k row order (it interleaves each head's rotary halves)."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_gguf(path: Path, config) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of the GGUF de-quantized to float32 under transformers' names, and its byte count."""
    import gguf

    state, types, linear_nbytes, linear_numel = {}, {}, 0, 0
    for tensor in gguf.GGUFReader(path).tensors:
        kind = gguf.GGMLQuantizationType(tensor.tensor_type)
        shape = [int(n) for n in reversed(tensor.shape)]  # ggml lists ne0 (columns) first
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, kind).copy()).float().reshape(shape)
        if tensor.name in GLOBAL_NAMES:
            state[GLOBAL_NAMES[tensor.name]] = values
            types[tensor.name.removesuffix(".weight")] = kind.name
            continue
        _, layer_idx, role, _ = tensor.name.split(".")
        if role in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if role == "attn_q" else config.num_key_value_heads
            values = unpermute(values, heads)
        state[f"model.layers.{layer_idx}.{LAYER_NAMES[role]}.weight"] = values
        if role in LINEAR_ROLES:
            block_elems, type_size = gguf.GGML_QUANT_SIZES[kind]
            linear_nbytes += int(tensor.n_elements) // block_elems * type_size
            linear_numel += int(tensor.n_elements)
            counts = types.setdefault(role, {})
            counts[kind.name] = counts.get(kind.name, 0) + 1
    return state, {"bytes_per_weight": linear_nbytes / linear_numel, "tensor_types": types,
                   "linear_nbytes": linear_nbytes, "linear_weights": linear_numel}


def evaluate_gguf(name: str, path: Path, model, tokenizer, questions: bool) -> dict:
    """Score one GGUF with benchmarks/fidelity.py's code on its de-quantized weights (all of `model`'s replaced)."""
    started = time.perf_counter()
    state, counted = read_gguf(path, model.config)
    missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}  # lm_head is tied to the embedding
    if missing:
        sys.exit(f"{path.name} has no tensor for {sorted(missing)[:4]}...; is it the SmolLM2 conversion?")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    kind, _, imatrix = name.partition("+")
    row = {
        "name": name, "side": "llama.cpp", "type": kind, "imatrix": bool(imatrix), "gguf_nbytes": path.stat().st_size,
        **counted,
        "perplexity": perplexity(model, fidelity.heldout_ids(tokenizer)),
        "sequence_nll": [round(value, 8) for value in fidelity.sequence_nlls(model, fidelity.heldout_ids(tokenizer))],
    }
    if questions:
        row["accuracy"] = fidelity.question_accuracy(model, tokenizer)
        row["demo_answer"] = fidelity.demo_answer(model, tokenizer)
        row["demo_correct"] = "paris" in row["demo_answer"].lower()
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def evaluate_ours(name: str, fields: dict, work: Path) -> dict | None:
    """benchmarks/fidelity.py's `evaluate` on one of our settings; None if this code has no such setting."""
    try:
        ConvertConfig(dtype="bfloat16", **fields)
    except (ConfigError, TypeError) as exc:
        print(f"{name}: skipped, this code cannot make it ({exc})", flush=True)
        return None
    try:
        return {**fidelity.evaluate(name, fields, work), "side": "ours"}
    except Exception:  # one failing conversion (code in progress) should not end the others' measurements
        traceback.print_exc()
        print(f"{name}: failed, not recorded", flush=True)
        return None


def compare(a: dict | None, b: dict | None) -> dict | None:
    """Row `a` against row `b` on the held-out windows: fidelity.paired_bootstrap of their per-window losses,
    rounded; None when either row lacks them (scored before they were kept)."""
    if not (a and b and a.get("sequence_nll") and b.get("sequence_nll")):
        return None
    test = fidelity.paired_bootstrap(a["sequence_nll"], b["sequence_nll"])
    return {"a": a["name"], "b": b["name"], "perplexity_diff": round(test["perplexity_diff"], 4),
            "perplexity_diff_interval": [round(value, 4) for value in test["perplexity_diff_interval"]],
            "perplexity_ratio_interval": [round(value, 5) for value in test["perplexity_ratio_interval"]],
            "sign_flip_p": round(test["sign_flip_p"], 4), "significant": test["significant"]}


def summary_table(rows: list[dict]) -> list[dict]:
    """Per llama.cpp type: its bytes and perplexities, our --bytes-per-weight row at no more bytes (the
    largest; picked by bytes alone: choosing among our rows by their held-out perplexity would tune to the
    held-out text), and the paired bootstrap of it and of dense (BF16) against the type (with its
    importance matrix where llama.cpp has one)."""
    by_name = {row["name"]: row for row in rows}
    ours = [row for row in rows if row["side"] == "ours"]
    table = []
    for kind in LLAMACPP_TYPES:
        if kind not in by_name:
            continue
        plain, weighted = by_name[kind], by_name.get(kind + "+imatrix")
        fitting = [row for row in ours if row["bytes_per_weight"] <= plain["bytes_per_weight"] + 1e-9]
        budgeted = max((row for row in fitting if row["name"].startswith("ours-budget-")),
                       key=lambda row: row["bytes_per_weight"], default=None)
        theirs = weighted or plain
        table.append({
            "type": kind, "bytes_per_weight": round(plain["bytes_per_weight"], 4),
            "perplexity": round(plain["perplexity"], 3),
            "perplexity_imatrix": round(weighted["perplexity"], 3) if weighted else None,
            "bytes_per_weight_imatrix": round(weighted["bytes_per_weight"], 4) if weighted else None,
            "ours_budget_within": budgeted and {"name": budgeted["name"],
                                                "bytes_per_weight": round(budgeted["bytes_per_weight"], 4),
                                                "perplexity": round(budgeted["perplexity"], 3)},
            "ours_budget_minus_theirs": compare(budgeted, theirs),
            "dense_minus_theirs": compare(by_name.get("BF16"), theirs),
            "dense_minus_plain": compare(by_name.get("BF16"), plain) if weighted else None,
        })
    return table


def print_table(table: list[dict]) -> None:
    """The summary as text: per type, theirs (with importance matrix where it has one), ours, dense, and
    the paired 95% intervals of the perplexity differences (* where they exclude 0)."""
    def cell(test: dict | None) -> str:
        if test is None:
            return f"{'(no per-window losses)':>34}"
        low, high = test["perplexity_diff_interval"]
        mark = "*" if test["significant"] else " "
        return f"{test['perplexity_diff']:+8.3f} [{low:+7.3f}, {high:+7.3f}] p={test['sign_flip_p']:.3f}{mark}"

    print(f"{'type':8} {'B/w':>6} {'theirs':>7} | {'ours (budget within)':24} {'ppl':>7} {'ours - theirs, 95%':>34} | "
          f"{'dense - theirs, 95%':>34}")
    for entry in table:
        theirs = entry["perplexity_imatrix"] if entry["perplexity_imatrix"] is not None else entry["perplexity"]
        ours = entry["ours_budget_within"] or {"name": "-", "perplexity": float("nan")}
        print(f"{entry['type']:8} {entry['bytes_per_weight']:6.4f} {theirs:7.3f} | {ours['name']:24} "
              f"{ours['perplexity']:7.3f} {cell(entry['ours_budget_minus_theirs'])} | "
              f"{cell(entry['dense_minus_theirs'])}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(10, 6))
    styles = {("llama.cpp", False): ("tab:blue", "o", "llama.cpp"),
              ("llama.cpp", True): ("tab:orange", "s", "llama.cpp + importance matrix"),
              ("ours", False): ("tab:red", "^", "endor-ray")}
    dense = next((row["perplexity"] for row in rows if row["name"] == "BF16"), None)
    for (side, imatrix), (color, marker, label) in styles.items():
        picked = sorted((row for row in rows if row["side"] == side and row.get("imatrix", False) == imatrix
                         and row["name"] != "BF16" and row["bytes_per_weight"] <= 1.2),
                        key=lambda row: row["bytes_per_weight"])
        if not picked:
            continue
        axis.scatter([row["bytes_per_weight"] for row in picked], [row["perplexity"] for row in picked],
                     color=color, marker=marker, s=50, label=label)
        for row in picked:
            axis.annotate(row.get("type", row["name"].removeprefix("ours-")), (row["bytes_per_weight"], row["perplexity"]),
                          fontsize=6, color=color, alpha=0.8, xytext=(3, 3), textcoords="offset points")
    if dense is not None:
        axis.axhline(dense, color="black", linestyle=":", linewidth=1, label=f"bf16 ({dense:.2f})")
    axis.set_yscale("log")
    axis.set_xlabel("bytes per weight (decoder Linear weights)")
    axis.set_ylabel("perplexity on benchmarks/data/heldout.txt (log)")
    axis.set_title("SmolLM2-135M: llama.cpp's quantizers and endor-ray at equal bytes", fontsize=10)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="rows to run, e.g. Q4_0 Q4_0+imatrix ours-gptq-int4-g32")
    parser.add_argument("--skip-ours", action="store_true", help="llama.cpp's rows only")
    parser.add_argument("--fresh", action="store_true", help="rerun rows already in the results")
    parser.add_argument("--redo", action="store_true",
                        help="rerun the rows named by --only even if present, keeping the others")
    parser.add_argument("--llamacpp-dir", type=Path, default=cache_dir() / "llamacpp",
                        help="where llama.cpp is downloaded and built and the GGUFs are written")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and the llama.cpp tools")
    parser.add_argument("--questions", action="store_true",
                        help="llama.cpp rows also get fidelity.py's question accuracy and demo answer (ours always do)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="add the rows of these result files")
    parser.add_argument("--take", type=Path, nargs="*", default=[],
                        help="replace rows by these files' rows of the same name (rows redone in another process)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf_names = ["BF16"] + [kind + suffix for kind in LLAMACPP_TYPES for suffix in ("", "+imatrix")
                             if not (suffix and kind in NO_IMATRIX_EFFECT)]
    known = gguf_names + list(OURS)
    unknown = set(args.only or []) - set(known)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; known: {', '.join(known)}")
    wanted = [name for name in known if (not args.only or name in args.only)
              and not (args.skip_ours and name in OURS)]

    document = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {"rows": []}
    for other in args.merge:  # e.g. the llama.cpp rows of a run beside this one (--skip-ours --out FILE)
        merged = json.loads(other.read_text())
        present = {row["name"] for row in document["rows"]}
        document["rows"] += [row for row in merged["rows"] if row["name"] not in present]
        document.update({key: value for key, value in merged.items() if key not in document})
    for other in args.take:  # its calibration and llama.cpp notes too: they describe its rows
        redone = json.loads(other.read_text())
        taken = {row["name"]: row for row in redone["rows"]}
        document["rows"] = [row for row in document["rows"] if row["name"] not in taken] + list(taken.values())
        document.update({key: value for key, value in redone.items() if key not in ("rows", "table")})
    done = {row["name"] for row in document["rows"]}
    todo = [name for name in wanted if name not in done or (args.redo and args.only)]

    def save(row: dict | None = None) -> None:
        if row is not None:
            row["load_average"] = round(os.getloadavg()[0], 2)
            document["rows"] = [r for r in document["rows"] if r["name"] != row["name"]] + [row]
        document["rows"].sort(key=lambda r: known.index(r["name"]) if r["name"] in known else len(known))
        args.out.write_text(json.dumps(document, indent=1))

    todo_ggufs = [name for name in todo if name in gguf_names]
    if todo_ggufs:
        work = args.llamacpp_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        if any(name.endswith("+imatrix") for name in todo_ggufs):
            document["calibration"] = calibration_text(work / "calibration.txt")  # needs no llama.cpp
        source = build_llamacpp(args.llamacpp_dir)
        sys.path.insert(0, str(source / "gguf-py"))  # the gguf-py that wrote the files reads them
        import gguf

        document["llamacpp"] = {"sdist": source.parents[1].name, "gguf_py": str(Path(gguf.__file__).parent),
                                "imatrix_args": f"-c {CALIB_SEQ_LEN} --no-ppl",
                                "gguf_source": "convert_hf_to_gguf.py --outtype bf16 on the cached HF folder"}
        files = prepare_ggufs(source, work, todo_ggufs, args.threads)
        from transformers import AutoTokenizer, LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
        for name in todo_ggufs:
            row = evaluate_gguf(name, files[name], model, tokenizer, args.questions)
            save(row)
            print(f"{name:20} {row['bytes_per_weight']:.3f} B/w  ppl {row['perplexity']:8.2f}  ({row['seconds']} s)",
                  flush=True)
    document["bytes_counted"] = BYTES_COUNTED
    document["evaluation"] = ("benchmarks/fidelity.py: perplexity(model, heldout_ids(tokenizer)) in float32, windows "
                              "of 128 tokens; llama.cpp rows: every GGUF tensor (token embedding included) "
                              "de-quantized by gguf-py into transformers' LlamaForCausalLM")
    document["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    save()
    with tempfile.TemporaryDirectory(prefix="endor-vs-llamacpp-") as scratch:
        for name in todo:
            if name not in OURS:
                continue
            row = evaluate_ours(name, OURS[name], Path(scratch))
            if row is None:
                continue
            save(row)
            print(f"{name:20} {row['bytes_per_weight']:.3f} B/w  ppl {row['perplexity']:8.2f}  "
                  f"acc {row['accuracy']['all']:.2f}  ({row['convert_seconds']} s)", flush=True)
    save()
    document["table"] = summary_table(document["rows"])
    document["noise"] = NOISE
    args.out.write_text(json.dumps(document, indent=1))
    print_table(document["table"])
    plot(document["rows"], args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
