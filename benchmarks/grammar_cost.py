"""What a grammar costs per token: llguidance, xgrammar and outlines-core, against a pass over the weights.

For each tokenizer (the embedded SmolLM2's 49k vocabulary; DeepSeek-V3's 129k and OpenAI's o200k,
the two vocabularies over 100k at hand offline, bracketing Qwen2.5's 151k) and each library:

  setup      building the library's view of the tokenizer (once per engine)
  compile    turning a JSON schema into a matcher (per request): 40 seeded random schemas (nested
             objects, arrays, enums, numbers, booleans, strings) and a 12-field flat one (outlines-core:
             the first 8, its index over the whole vocabulary takes seconds per schema)
  mask       computing the allowed-token mask for one position, walked over a valid instance of each
             schema token by token (the instance tokenized by the tokenizer itself): median, p99, max

and for llguidance as the engine runs it (`engine.grammar.GrammarState`): mask + unpacking to a
[vocab] bool + applying it to the logits + consuming the token. Against: the median time of an
engine step (one pass over the weights) on the demo store (`make demo`: SmolLM2 Q4_1 kept) at
batch 1 and batch 8 on this machine, greedy without a grammar. Fixed seeds, a warm-up walk,
medians; the machine's load is recorded (other work shares its cores).

    PYTHONPATH=<xgrammar and outlines-core, installed aside> python benchmarks/grammar_cost.py \\
        [--store stores/smollm2-135m-q4_1]  ->  benchmarks/results/grammar-cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
SEPARATORS = (", ", ": ")  # the engine's compact JSON (engine.grammar.JSON_OPTIONS)
NOTES = [
    "No tokenizer of ~150k tokens (Qwen2.5's 151,665) is available offline; DeepSeek-V3's 129,280-token "
    "tokenizer.json and OpenAI's o200k_base (199,998), both shipped inside litellm, bracket it.",
    "xgrammar and outlines-core were installed aside (pip --target) for this measurement only; the engine "
    "uses llguidance.",
    "engine_path_us: one row's grammar work per token in the engine (mask, unpack, masked_fill on the "
    "[vocab] float64 logits, argmax, consume); most of it is torch's full-vocabulary ops on a loaded host.",
    "engine_cost_fraction_of_pass: batch size x engine_path median / the median step (all rows constrained).",
]


# -- schemas and instances --------------------------------------------------------------------------

def random_schema(rng: random.Random, depth: int = 0, kind: str | None = None) -> dict:
    kinds = ["integer", "number", "boolean", "enum", "string"] + (["object", "array"] if depth < 2 else [])
    kind = kind or rng.choice(kinds)
    if kind == "integer":
        return {"type": "integer"}
    if kind == "number":
        return {"type": "number"}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "amber", "violet"], rng.randint(2, 4))}
    if kind == "string":
        return {"type": "string"}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1)}
    names = rng.sample(["id", "name", "size", "tags", "ok", "score", "kind", "child", "note", "owner"], rng.randint(2, 5))
    return {"type": "object", "properties": {name: random_schema(rng, depth + 1) for name in names},
            "required": names, "additionalProperties": False}


def instance(schema: dict, rng: random.Random):
    """A value valid against one of the schemas above (all properties given, in order)."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema["type"]
    if kind == "integer":
        return rng.randint(-5000, 5000)
    if kind == "number":
        return round(rng.uniform(-100, 100), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string":
        return rng.choice(["Ada Lovelace", "blue whale", "x", "a longer note about the weather", "Zürich"])
    if kind == "array":
        return [instance(schema["items"], rng) for _ in range(rng.randint(1, 3))]
    return {name: instance(sub, rng) for name, sub in schema["properties"].items()}


def schemas() -> list[dict]:
    rng = random.Random(0)
    flat = {"type": "object", "additionalProperties": False, "required": [f"field_{i}" for i in range(12)],
            "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"][i % 3]} for i in range(12)}}
    return [random_schema(rng, kind="object") for _ in range(40)] + [flat]


# -- tokenizers ---------------------------------------------------------------------------------------

LITELLM_TOKENIZERS = "litellm/litellm_core_utils/tokenizers"


def tokenizers() -> dict:
    """name -> (HF fast tokenizer or tiktoken Encoding, kind)."""
    import site

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from endor_ray.compress.default_model import default_model_dir

    found = {"smollm2-49k": (AutoTokenizer.from_pretrained(default_model_dir()), "hf")}
    for root in site.getsitepackages():
        folder = Path(root) / LITELLM_TOKENIZERS
        if (folder / "deepseek_tokenizer.json").exists():
            deepseek = PreTrainedTokenizerFast(tokenizer_file=str(folder / "deepseek_tokenizer.json"),
                                               eos_token="<｜end▁of▁sentence｜>")
            found["deepseek-v3-129k"] = (deepseek, "hf")
            os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(folder))  # litellm ships tiktoken's cached files
            try:
                import tiktoken

                found["o200k-200k"] = (tiktoken.get_encoding("o200k_base"), "tiktoken")
            except Exception as exc:  # noqa: BLE001 - not cached here: measured without it
                print(f"o200k_base not available offline: {exc}", file=sys.stderr)
    return found


def token_bytes(tokenizer, kind: str) -> list[bytes]:
    """Every token id's bytes (special tokens: their text)."""
    if kind == "tiktoken":
        out = []
        for token_id in range(tokenizer.n_vocab):
            try:
                out.append(tokenizer.decode_single_token_bytes(token_id))
            except KeyError:  # ids o200k leaves unassigned
                out.append(b"")
        return out
    to_byte = {char: byte for byte, char in byte_level_alphabet().items()}
    vocab = tokenizer.get_vocab()
    out = [b""] * len(tokenizer)
    for token, token_id in vocab.items():
        if token_id >= len(out):
            continue
        if all(char in to_byte for char in token):
            out[token_id] = bytes(to_byte[char] for char in token)
        else:
            out[token_id] = token.encode()
    return out


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies spell tokens in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def encode(tokenizer, kind: str, text: str) -> list[int]:
    return tokenizer.encode(text) if kind == "tiktoken" else tokenizer(text, add_special_tokens=False).input_ids


def eos_of(tokenizer, kind: str) -> int:
    return tokenizer.eot_token if kind == "tiktoken" else tokenizer.eos_token_id


def vocab_size(tokenizer, kind: str) -> int:
    return tokenizer.n_vocab if kind == "tiktoken" else len(tokenizer)


# -- the three libraries: setup, compile, a matcher's (mask, consume) -----------------------------------

class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, kind: str):
        import llguidance
        import llguidance.hf
        import llguidance.tiktoken

        self.llguidance = llguidance
        size = vocab_size(tokenizer, kind)
        self.tokenizer = (llguidance.tiktoken.lltokenizer_from_encoding(tokenizer, n_vocab=size) if kind == "tiktoken"
                          else llguidance.hf.from_tokenizer(tokenizer, n_vocab=size))
        self.bits = np.zeros((size + 31) // 32, dtype=np.int32)

    def compile(self, schema: dict):
        from endor_ray.engine.grammar import JSON_OPTIONS

        grammar = self.llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        matcher = self.llguidance.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def mask(self, matcher) -> None:
        matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)

    def allowed(self, token_id: int) -> bool:
        return bool((self.bits[token_id // 32] >> (token_id % 32)) & 1)

    def consume(self, matcher, token_id: int) -> bool:
        return matcher.consume_token(token_id)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, kind: str):
        import torch
        import xgrammar

        self.xgrammar = xgrammar
        size = vocab_size(tokenizer, kind)
        if kind == "tiktoken":
            info = xgrammar.TokenizerInfo(token_bytes(tokenizer, kind), xgrammar.VocabType.RAW, vocab_size=size,
                                          stop_token_ids=[eos_of(tokenizer, kind)])
        else:
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.bitmask = xgrammar.allocate_token_bitmask(1, size)
        self.torch = torch

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
        return self.xgrammar.GrammarMatcher(compiled)

    def mask(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.bitmask)

    def allowed(self, token_id: int) -> bool:
        return bool((int(self.bitmask[0, token_id // 32]) >> (token_id % 32)) & 1)

    def consume(self, matcher, token_id: int) -> bool:
        return matcher.accept_token(token_id)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, kind: str):
        import outlines_core

        self.outlines = outlines_core
        eos = eos_of(tokenizer, kind)
        by_bytes: dict[bytes, list[int]] = {}
        for token_id, raw in enumerate(token_bytes(tokenizer, kind)):
            if raw and token_id != eos:
                by_bytes.setdefault(raw, []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(eos, by_bytes)
        self.size = vocab_size(tokenizer, kind)
        self.mask_buffer = np.zeros((self.size + 31) // 32, dtype=np.int32)

    def compile(self, schema: dict):
        regex = self.outlines.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        regex = regex.replace(r'[ ]?', "")  # no optional spaces either; separators handled by the instance text
        index = self.outlines.Index(regex, self.vocabulary)
        return self.outlines.Guide(index)

    def mask(self, guide) -> None:
        guide.write_mask_into(self.mask_buffer.ctypes.data, self.mask_buffer.size, 4)

    def allowed(self, token_id: int) -> bool:
        return bool((self.mask_buffer[token_id // 32] >> (token_id % 32)) & 1)

    def consume(self, guide, token_id: int) -> bool:
        guide.advance(token_id)
        return True


LIBRARIES = (LLGuidance, XGrammar, OutlinesCore)


def instance_text(schema: dict, seed: int, library: str) -> str:
    # outlines-core's regex has no spaces after separators (its whitespace pattern emptied): the others'
    # compact form keeps json.dumps's ", " and ": "
    separators = (",", ":") if library == "outlines-core" else SEPARATORS
    return json.dumps(instance(schema, random.Random(seed)), separators=separators, ensure_ascii=False)


def measure_library(cls, tokenizer, kind: str, schema_list: list[dict]) -> dict:
    started = time.perf_counter()
    library = cls(tokenizer, kind)
    setup_s = time.perf_counter() - started
    compile_s, first_s, mask_s, refused = [], [], [], 0
    for round_idx in range(2):  # the first round warms up; the second is measured
        for seed, schema in enumerate(schema_list):
            started = time.perf_counter()
            matcher = library.compile(schema)
            compiled = time.perf_counter() - started
            for position, token_id in enumerate(encode(tokenizer, kind, instance_text(schema, seed, cls.name))):
                started = time.perf_counter()
                library.mask(matcher)
                elapsed = time.perf_counter() - started
                if not library.allowed(token_id):  # a tokenization the library does not allow: stop this walk
                    refused += 1
                    break
                if round_idx:  # the first mask of a matcher apart: the engine computes it with the compile
                    (mask_s if position else first_s).append(elapsed)
                library.consume(matcher, token_id)
            if round_idx:
                compile_s.append(compiled)
    return {"setup_s": setup_s, "compile_ms": summary_ms(compile_s), "first_mask_ms": summary_ms(first_s),
            "mask_us": summary_us(mask_s),
            "masks_measured": len(mask_s), "walks_cut_short": refused // 2}


def engine_path_cost(tokenizer, schema_list: list[dict]) -> dict:
    """llguidance as the engine runs it: GrammarState's mask + unpack + apply_mask + advance."""
    import torch

    from endor_ray.engine.grammar import GrammarState, apply_mask, grammar_tokenizer, json_schema_grammar

    lltokenizer = grammar_tokenizer(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    logits = torch.randn(len(tokenizer), dtype=torch.float64)
    per_token = []
    for seed, schema in enumerate(schema_list):
        state = GrammarState(lltokenizer, json_schema_grammar(schema, strict=True))
        for token_id in encode(tokenizer, "hf", instance_text(schema, seed, "llguidance")):
            started = time.perf_counter()
            masked = apply_mask(logits, state.disallowed)
            int(torch.argmax(masked))
            ok = state.advance(token_id)  # consume + the next mask
            per_token.append(time.perf_counter() - started)
            if not ok or state.finished:
                break
    return summary_us(per_token)


def pass_time(store: str, batch_sizes=(1, 8), steps: int = 12) -> dict:
    """Median engine step (one pass over the weights for the batch), greedy, no grammar."""
    from endor_ray.engine import Engine, EngineConfig
    from endor_ray.engine.sampling import SamplingParams

    out = {}
    with Engine(store, EngineConfig(gpu_memory=0), progress=False) as engine:
        for batch in batch_sizes:
            sequences = engine.new_sequences(["Once upon a time"] * batch, SamplingParams(max_new_tokens=steps + 2,
                                                                                        ignore_eos=True))
            engine.add(sequences)
            engine.step()  # the prefill
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - started)
            while engine.has_work:
                engine.step()
            out[f"batch_{batch}_ms"] = statistics.median(times) * 1e3
    return out


def summary_us(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {"median": statistics.median(ordered) * 1e6, "p99": ordered[int(0.99 * (len(ordered) - 1))] * 1e6,
            "max": ordered[-1] * 1e6}


def summary_ms(values: list[float]) -> dict:
    return {key: value / 1e3 for key, value in summary_us(values).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", default=str(ROOT / "stores" / "smollm2-135m-q4_1"))
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "grammar-cost.json")
    args = parser.parse_args()
    from kernel_bench import machine_info

    import torch

    # The host-side torch ops of the engine path on a 2-core machine shared with other work: a
    # 2-thread pool spins against the load (a 49k masked_fill took 15-30 ms, 0.8 ms on one thread)
    torch.set_num_threads(1)
    schema_list = schemas()
    results: dict = {"machine": machine_info(), "load_before": os.getloadavg(), "schemas": len(schema_list),
                     "notes": NOTES, "tokenizers": {}}
    for name, (tokenizer, kind) in tokenizers().items():
        entry = {"vocab_size": vocab_size(tokenizer, kind)}
        for cls in LIBRARIES:
            try:
                # outlines-core builds a whole-vocabulary index per schema (seconds each): 8 schemas of the 41
                entry[cls.name] = measure_library(cls, tokenizer, kind,
                                                  schema_list[:8] if cls is OutlinesCore else schema_list)
            except Exception as exc:  # noqa: BLE001 - a library missing or failing here is recorded, not fatal
                entry[cls.name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(name, cls.name, json.dumps(entry[cls.name]), flush=True)
        if kind == "hf":
            entry["engine_path_us"] = engine_path_cost(tokenizer, schema_list)
            print(name, "engine path", json.dumps(entry["engine_path_us"]), flush=True)
        results["tokenizers"][name] = entry
    if Path(args.store).exists():
        results["pass"] = {"store": args.store, **pass_time(args.store)}
        smol = results["tokenizers"]["smollm2-49k"]
        # every row of the batch constrained: each row's mask, apply and advance, one after another
        results["engine_cost_fraction_of_pass"] = {
            key: int(key.split("_")[1]) * smol["engine_path_us"]["median"] / 1e3 / value
            for key, value in results["pass"].items() if key.endswith("_ms")}
    results["load_after"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
