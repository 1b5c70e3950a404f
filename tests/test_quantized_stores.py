"""Quantized and mixed-precision stores, end to end: convert -> store -> engine and export ->
transformers. The engine's greedy tokens equal transformers' own generate on the exported weights."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from endor_ray.engine import Engine, EngineConfig
from endor_ray.engine.sampling import SamplingParams
from endor_ray.errors import ConfigError
from endor_ray.format import decode
from endor_ray.models.architecture import is_prunable
from endor_ray.store import Store
from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.store.export import export_checkpoint

from conftest import make_checkpoint, read_manifest
from test_engine import PLACEMENTS, PROMPTS

SETTINGS = {
    "int8-50": dict(method="magnitude", sparsity=0.5, values="int8"),
    "int4-dense": dict(method="magnitude", sparsity=0.0, values="int4", group_size=32),
    "mixed-0.6": dict(method="wanda", bytes_per_weight=0.6, calib_samples=4, calib_seq_len=16),
    "sparsegpt-int4-50": dict(method="sparsegpt", sparsity=0.5, values="int4", group_size=64, calib_samples=4,
                              calib_seq_len=16),
}


class _Stores(dict):
    """The GQA-Llama tiny checkpoint (with SmolLM2's tokenizer) under each setting, bf16, each
    converted the first time a test asks for it."""

    def __init__(self, checkpoint, root):
        super().__init__()
        self.checkpoint, self.root = checkpoint, root

    def __missing__(self, name):
        config = ConvertConfig(block_size=256, dtype="bfloat16", **SETTINGS[name])
        self[name] = convert(str(self.checkpoint), self.root / name, config, progress=False)
        return self[name]


@pytest.fixture(scope="module")
def quantized_stores(smollm2_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("quantized")
    checkpoint = make_checkpoint(root / "ckpt", "llama-gqa", vocab_size=49152)  # unpruned, random weights
    for path in smollm2_dir.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(path, checkpoint / path.name)
    return _Stores(checkpoint, root)


def exported_greedy(store, tmp_path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers' own generate on `endor export`'s checkpoint of the store (rows cut at EOS)."""
    folder = export_checkpoint(Store(str(store)), tmp_path / "hf", progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with Engine(str(store), EngineConfig(gpu_memory=0), progress=False) as engine:
        tokenizer, eos = engine.tokenizer, engine.eos_ids
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=engine.pad_id)
    rows = []
    for row in output[:, inputs.input_ids.shape[1]:].tolist():
        rows.append(row[: next((i for i, token in enumerate(row) if token in eos), len(row))])
    return rows


@pytest.mark.parametrize("name", list(SETTINGS))
def test_engine_matches_transformers_on_the_exported_weights(quantized_stores, name, tmp_path):
    store = quantized_stores[name]
    expected = exported_greedy(store, tmp_path, PROMPTS, max_new_tokens=6)
    for placement in ("all-streamed", "disk"):
        config = EngineConfig(**PLACEMENTS[placement], compute_dtype="float32")
        with Engine(str(store), config, progress=False) as engine:
            completions, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
        assert [c.token_ids for c in completions] == expected, placement
    assert any(expected)


def test_stores_record_their_settings(quantized_stores):
    encodings = {}
    for name in ("int8-50", "int4-dense"):
        manifest = read_manifest(quantized_stores[name])
        tensors = [t for layer in manifest["layers"] for t in layer["tensors"] if len(t["shape"]) == 2]
        encodings[name] = {t["values_encoding"] for t in tensors}
        assert manifest["format_version"] == 3
    assert encodings["int8-50"] == {"int8"} and encodings["int4-dense"] == {"int4"}
    int4_dense = read_manifest(quantized_stores["int4-dense"])
    assert {t["layout"] for t in int4_dense["layers"][0]["tensors"] if len(t["shape"]) == 2} == {"dense"}


def test_mixed_precision_meets_its_budget_and_mixes(quantized_stores):
    store = Store(str(quantized_stores["mixed-0.6"]))
    settings, nbytes, numel = set(), 0, 0
    for layer_idx in range(store.num_layers):  # one budget for all the decoder layers together
        tensors = store.layer_tensors(layer_idx)
        nbytes += sum(enc.nbytes for enc in tensors.values())
        numel += sum(enc.numel for enc in tensors.values())
        settings |= {(round(enc.sparsity, 1), enc.values_encoding) for name, enc in tensors.items()
                     if is_prunable(name, decode(enc))}
    assert nbytes <= 0.6 * numel
    assert len(settings) > 1, settings  # the budget is met by different settings, not one


def test_sparsegpt_alters_kept_weights_and_export_holds_them(quantized_stores):
    """SparseGPT updates the weights it keeps (by design); the store and export hold the updates."""
    pruned = Store(str(quantized_stores["sparsegpt-int4-50"])).layer_tensors(0)["mlp.down_proj.weight"]
    before = AutoModelForCausalLM.from_pretrained(quantized_stores.checkpoint).model.layers[0].mlp.down_proj.weight
    stored, before = decode(pruned).float(), before.detach().to(torch.bfloat16).float()
    kept = stored != 0
    assert 0.45 < 1 - kept.float().mean() < 0.75
    assert read_manifest(quantized_stores["sparsegpt-int4-50"])["compression"]["method"] == "sparsegpt"
    assert not torch.allclose(stored[kept], before[kept], atol=1e-2)


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="values encoding"):
        ConvertConfig(values="int3")
    with pytest.raises(ConfigError, match="group size"):
        ConvertConfig(values="int4", group_size=0)
    with pytest.raises(ConfigError, match="dense"):
        ConvertConfig(values="int8", store_format="dense")
    with pytest.raises(ConfigError, match="bytes-per-weight"):
        ConvertConfig(bytes_per_weight=-1)
    with pytest.raises(ConfigError, match="wanda or sparsegpt"):
        ConvertConfig(bytes_per_weight=0.6, method="magnitude")


def test_choose_meets_the_budget_with_the_least_error():
    """The knapsack against brute force on random options: within budget and exactly the optimum;
    the best settings when everything fits."""
    import itertools
    import random

    from endor_ray.compress.mixed import CANDIDATES, Option, choose

    rng = random.Random(0)
    for _ in range(30):
        options = {f"t{i}": [Option(setting, rng.randint(100, 1000), rng.random()) for setting in CANDIDATES[:5]]
                   for i in range(3)}
        least = sum(min(o.nbytes for o in opts) for opts in options.values())
        most = sum(max(o.nbytes for o in opts) for opts in options.values())
        for budget in (least, (least + most) / 2, most):
            chosen = choose(options, budget)
            picked = [next(o for o in options[name] if o.setting == chosen[name]) for name in options]
            assert sum(o.nbytes for o in picked) <= budget
            best = min(sum(o.error for o in combo) for combo in itertools.product(*options.values())
                       if sum(o.nbytes for o in combo) <= budget)
            assert sum(o.error for o in picked) == pytest.approx(best, abs=1e-12)
            if budget == most:
                assert [o.error for o in picked] == [min(o.error for o in opts) for opts in options.values()]
    with pytest.raises(ConfigError, match="raise --bytes-per-weight"):
        choose(options, least - 1)


def test_a_budget_too_small_for_any_setting_is_refused(quantized_stores, tmp_path):
    checkpoint = quantized_stores.checkpoint
    config = ConvertConfig(block_size=256, bytes_per_weight=0.1, calib_samples=2, calib_seq_len=8)
    with pytest.raises(ConfigError, match=r"the decoder layers need at least 0\.\d+ bytes per weight"):
        convert(str(checkpoint), tmp_path / "tiny-budget", config, progress=False)
    assert not (tmp_path / "tiny-budget").exists()
